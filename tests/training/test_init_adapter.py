"""Continuing an adapter (``lora.init_adapter``): training starts from its exact weights and its loss; a LoRA config
of another shape is refused before anything trains, naming the keys to set."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model_state_dict

from training.adapter import AdapterMeta, save_adapter
from training.data import validate_dataset
from training.heldout import HeldOut
from training.init_adapter import InitAdapterError, check_init_adapter
from training.tracking import NullTracker
from training.worker import WorkerSpec, build_worker_parts, run_worker


def lora_state(parts) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(parts.raw_unet).items()}


@pytest.fixture
def earlier(train_config, tmp_path):
    """An "earlier" adapter (rank 4, alpha 8) whose up weights are not zero, saved as training saves adapters; with
    the config, its in-memory weights and its held-out loss."""
    cfg = train_config(**{"lora.rank": 4, "lora.alpha": 8})
    parts = build_worker_parts(cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in parts.raw_unet.named_parameters():
            if "lora_B" in name:  # B is zero in a fresh LoRA: give it values, as training would
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    report = validate_dataset(cfg.data)
    meta = AdapterMeta(base_model=cfg.base_model, rank=4, alpha=8.0, target_modules=list(cfg.lora.target_modules))
    save_adapter(tmp_path / "earlier", parts.unet, meta, family=parts.family.name)
    held = report.examples[:3]
    return cfg, tmp_path / "earlier", lora_state(parts), HeldOut(held, cfg, parts).loss(parts), held, report


def test_the_lora_starts_from_the_adapters_weights_and_loss(earlier):
    cfg, folder, weights, loss, held, _ = earlier
    continued = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"init_adapter": str(folder)})})
    parts = build_worker_parts(continued, torch.device("cpu"))
    got = lora_state(parts)
    assert got.keys() == weights.keys()
    assert all(torch.equal(got[k], weights[k]) for k in weights)  # bit for bit, A and B
    assert all(p.dtype == torch.float32 and p.requires_grad for p in parts.trainable)
    fresh = build_worker_parts(cfg, torch.device("cpu"))  # the same seed without init_adapter: B is zero
    base_loss = HeldOut(held, cfg, fresh).loss(fresh)
    assert HeldOut(held, continued, parts).loss(parts) == pytest.approx(loss, rel=1e-6)
    assert abs(base_loss - loss) > 1e-4  # the adapter's loss is not the base model's: the check can fail


class Metrics(NullTracker):
    def __init__(self):
        self.logged: list[tuple[int, dict]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((step, dict(metrics)))


def test_a_continued_run_reports_the_adapters_loss_before_its_first_step(earlier):
    cfg, folder, _, loss, held, report = earlier
    over = {"init_adapter": str(folder)}
    continued = cfg.model_copy(update={"lora": cfg.lora.model_copy(update=over),
                                       "train": cfg.train.model_copy(update={"epochs": 1})})  # fmt: skip
    tracker = Metrics()
    spec = WorkerSpec(continued, report.examples[3:], report.fingerprint(), heldout=held)
    run_worker(spec, tracker=tracker)
    assert tracker.logged[0][0] == 0 and tracker.logged[0][1]["val_loss"] == pytest.approx(loss, rel=1e-6)
    assert tracker.logged[-1][1]["val_loss"] != tracker.logged[0][1]["val_loss"]  # and it trained on from there


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"lora.rank": 8}, "lora.rank=8 but the adapter in lora.init_adapter has 4: set lora.rank=4"),
        ({"lora.alpha": 4}, "set lora.alpha=8.0"),
        ({"lora.target_modules": '["to_q"]'}, "set lora.target_modules=['to_k', 'to_out.0', 'to_q', 'to_v']"),
        ({"lora.text_encoder": "true"}, "set lora.text_encoder=False"),
    ],
)
def test_another_lora_shape_is_refused_naming_the_key_and_value(earlier, train_config, override, named):
    _, folder, *_ = earlier
    cfg = train_config(**{"lora.rank": 4, "lora.alpha": 8, "lora.init_adapter": str(folder), **override})
    with pytest.raises(InitAdapterError, match="lora") as info:
        build_worker_parts(cfg, torch.device("cpu"))
    assert named in str(info.value)


def test_another_base_model_and_a_folder_that_is_no_adapter_are_refused(earlier, train_config, tiny_pipe_dir, tmp_path):
    _, folder, *_ = earlier
    other = train_config(**{"lora.rank": 4, "lora.alpha": 8, "lora.init_adapter": str(folder),
                            "base_model": str(tiny_pipe_dir)})  # fmt: skip
    with pytest.raises(InitAdapterError, match="set base_model to it"):
        check_init_adapter(other)
    missing = train_config(**{"lora.init_adapter": str(tmp_path / "nothing")})
    with pytest.raises(InitAdapterError, match="lora.init_adapter=.*no lorafleet_adapter.json"):
        check_init_adapter(missing)


def test_the_entry_points_preflight_names_the_problem_before_ray_starts(earlier, train_config):
    from training.train import preflight

    _, folder, *_ = earlier
    cfg = train_config(**{"lora.rank": 8, "lora.alpha": 8, "lora.init_adapter": str(folder)})
    assert any("set lora.rank=4" in p for p in preflight(cfg, resume=False))
    fits = train_config(**{"lora.rank": 4, "lora.alpha": 8, "lora.init_adapter": str(folder)})
    assert preflight(fits, resume=False) == []


@pytest.mark.slow
def test_a_real_run_continued_starts_at_the_loss_the_first_run_ended_with(train_config, toy_dataset, tmp_path):
    """Two real runs on the toy dataset (plain-PyTorch worker, what each Ray Train worker runs): the second, started
    from the first's saved adapter, reports before its first step the held-out loss the first reported at its end."""
    from training.worker import ADAPTER_DIR, adapter_meta, write_checkpoint

    held = validate_dataset(train_config().data.model_copy(update={"path": str(toy_dataset / "heldout")})).examples
    cfg = train_config(**{"lora.rank": 4, "train.epochs": 2, "train.lr": 5e-3})
    report = validate_dataset(cfg.data)
    spec = WorkerSpec(cfg, report.examples, report.fingerprint(), heldout=held)
    first = Metrics()
    parts, state = run_worker(spec, tracker=first)
    write_checkpoint(tmp_path / "first", parts, state, adapter_meta(spec, state))
    lora = cfg.lora.model_copy(update={"init_adapter": str(tmp_path / "first" / ADAPTER_DIR)})
    then = cfg.model_copy(update={"lora": lora, "train": cfg.train.model_copy(update={"epochs": 1})})
    second = Metrics()
    run_worker(WorkerSpec(then, report.examples, report.fingerprint(), heldout=held), tracker=second)
    before = {step: m["val_loss"] for step, m in first.logged if "val_loss" in m}
    after = {step: m["val_loss"] for step, m in second.logged if "val_loss" in m}
    assert after[0] == pytest.approx(before[2], rel=1e-6)  # where the first run ended, not the base model's loss
    assert abs(before[2] - before[0]) > 1e-3 and after[1] != after[0]


def test_a_relative_init_adapter_means_the_drivers_folder_on_a_worker(earlier, monkeypatch, tmp_path):
    cfg, folder, *_, report = earlier
    monkeypatch.chdir(folder.parent)
    spec = WorkerSpec(cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"init_adapter": folder.name})}),
                      report.examples, report.fingerprint())  # fmt: skip
    shipped = spec.to_dict()
    monkeypatch.chdir("/")  # the worker's own cwd: the relative name means nothing there
    assert WorkerSpec.from_dict(shipped).cfg.lora.init_adapter == str(folder)
