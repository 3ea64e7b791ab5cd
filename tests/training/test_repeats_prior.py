"""kohya repeats as a sampling weight, and DreamBooth prior preservation (class images), on the training side."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from training.buckets import assign_buckets
from training.data import DatasetError, validate_dataset
from training.dataset import epoch_batches, make_source, planned_batches
from training.loop import denoising_loss, make_state, weighted_loss
from training.tracking import NullTracker
from training.training_set import (
    balance_class_examples,
    build_worker_spec,
    describe_epoch,
    epoch_counts,
    validate_class_images,
)
from training.worker import WorkerSpec, build_worker_parts, run_worker

CPU = torch.device("cpu")
REPEATS = [3, 1, 2, 1, 1, 4, 1, 2]  # the toy set's 8 images: 15 samples per epoch


@pytest.fixture(scope="module")
def parts(repo):
    """The toy model with a LoRA (frozen weights are all a source needs)."""
    from training.config import TrainConfig

    cfg = TrainConfig.model_validate({"base_model": str(repo / "models" / "toy-sd"), "data": {"path": "."}})
    return build_worker_parts(cfg, CPU)


@pytest.fixture
def mixed_config(train_config, tmp_path):
    """6 images in 3 buckets at 64 px, step 16: 80x48, 48x80, 64x64 (2 each); batch 2."""
    root = tmp_path / "mixed"
    root.mkdir()
    for i, size in enumerate([(96, 64), (96, 64), (64, 96), (64, 96), (80, 80), (80, 80)]):
        Image.new("RGB", size, (30 * i, 90, 160)).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"a sks photo {i}")

    def make(**overrides):
        return train_config(**{"data.path": str(root), "data.bucket_step": 16, "train.batch_size": 2} | overrides)

    return make


def _repeated(cfg, repeats=REPEATS):
    examples = validate_dataset(cfg.data).examples
    return [replace(e, repeats=r) for e, r in zip(examples, repeats, strict=True)]


def _class_dir(tmp_path, n=3, captions=False, size=64):
    """``n`` plain-coloured images (a 'class' without the dotted concept), optionally with .txt captions."""
    root = tmp_path / "class"
    root.mkdir()
    for i in range(n):
        Image.new("RGB", (size, size), (40 * i, 120, 200 - 30 * i)).save(root / f"c{i}.png")
        if captions:
            (root / f"c{i}.txt").write_text(f"a plain picture number {i}\n")
    return root


def _recorded(source):
    """``source`` whose batches are the example indices they hold (epoch_batches calls ``batch(idx, gen)``)."""
    source.batch = lambda idx, gen: list(idx)
    return source


# -- repeats --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_cache", [True, False])
def test_an_epoch_draws_each_image_its_repeats_times_and_caches_it_once(train_config, parts, use_cache):
    cfg = train_config()
    examples = _repeated(cfg)
    source = make_source(examples, cfg.data, parts, use_cache)
    assert source.num_images == 8 and len(source) == sum(REPEATS) == 15
    if use_cache:
        (mean,) = source.mean.values()
        assert mean.shape[0] == 8  # one latent per image, not one per repeat
    assert source.batches_per_epoch(4) == math.ceil(15 / 4)
    for epoch in (0, 1):
        drawn = Counter(i for b in epoch_batches(_recorded(source), 4, seed=0, epoch=epoch) for i in b)
        got = {source.examples[i].path.name: n for i, n in drawn.items()}
        assert got == {e.path.name: e.repeats for e in examples}, f"epoch {epoch}: draws per image {got}"


def test_repeats_with_buckets_and_ranks_keep_equal_batch_counts(mixed_config, parts):
    cfg = mixed_config()  # 6 images in 3 buckets: 80x48, 48x80, 64x64 (2 each); batch 2
    examples = [replace(e, repeats=r) for e, r in zip(validate_dataset(cfg.data).examples, [3, 1, 1, 1, 2, 1])]
    assigned = assign_buckets([e.path for e in examples], cfg.data, 16)
    for world_size in (1, 2, 3):
        sources = [
            make_source(examples, cfg.data, parts, False, rank=r, world_size=world_size) for r in range(world_size)
        ]
        counts = [s.batches_per_epoch(2) for s in sources]
        assert len(set(counts)) == 1, f"world_size={world_size}: batches per rank {counts}"
        assert counts[0] == planned_batches(assigned, examples, 2, world_size)
        drawn = Counter()
        for r, s in enumerate(sources):
            for batch in epoch_batches(_recorded(s), 2, 0, 0, r):
                assert len({s.buckets[i] for i in batch}) == 1  # one bucket per batch
                drawn.update(s.examples[i].path.name for i in batch)
        for e in examples:  # padding wraps around: at least its repeats, at most one more per rank
            assert e.repeats <= drawn[e.path.name] <= e.repeats + world_size - 1, (e.path.name, drawn)
        if world_size == 1:
            assert drawn == Counter({e.path.name: e.repeats for e in examples})
    assert planned_batches(assigned, examples, 2, 1) == 2 + 1 + 2  # 80x48: 4 slots, 48x80: 2, 64x64: 3


def test_the_schedule_and_max_steps_count_repeats(train_config, parts):
    cfg = train_config(**{"train.epochs": 3, "train.grad_accum": 2})
    source = make_source(_repeated(cfg), cfg.data, parts, True)
    batches = source.batches_per_epoch(cfg.train.batch_size)  # 15 samples at batch 4: 4
    assert batches == 4
    assert make_state(cfg, parts, batches).total_steps == 3 * 2  # 3 epochs × ceil(4 / 2)
    text = describe_epoch(cfg, source.examples, batches)
    assert "an epoch is 15 samples: 8 images × repeats = 15" in text and "6 in all" in text, text
    capped = train_config(**{"train.max_steps": 5})
    assert make_state(capped, parts, batches).total_steps == 5


def test_a_heldout_split_sees_each_image_once_and_repeats_stay_with_training(train_config):
    cfg = train_config(**{"validation.holdout": 2})
    report = validate_dataset(cfg.data)
    report.examples[:] = [replace(e, repeats=r) for e, r in zip(report.examples, REPEATS)]
    spec = build_worker_spec(cfg, report)
    assert len(spec.heldout) == 2 and len(spec.examples) == 6
    assert not {e.path for e in spec.heldout} & {e.path for e in spec.examples}
    assert spec.dataset_hash == report.fingerprint()  # no class images: the dataset's own fingerprint
    assert epoch_counts(spec.examples)["samples_per_epoch"] == sum(e.repeats for e in spec.examples)


# -- prior preservation: balancing, loss, configuration ------------------------------------------------------
def _kohya_balance(train_repeats: list[int], reg_repeats: list[int]) -> list[int]:
    """kohya-ss sd-scripts train_util.DreamBoothDataset's loop, transcribed (registered reg images' repeats)."""
    num_train_images = sum(train_repeats)
    registered: list[int] = []
    n, first_loop = 0, True
    while n < num_train_images:
        for i, r in enumerate(reg_repeats):
            if first_loop:
                registered.append(r)
                n += r
            else:
                registered[i] += 1
                n += 1
            if n >= num_train_images:
                break
        first_loop = False
    return registered


@pytest.mark.parametrize(
    ("train", "reg", "want"),
    [
        ([10] * 2, [1, 1, 1], [7, 7, 6]),  # 20 instance samples over 3 class images
        ([1] * 4, [1] * 10, [1] * 4),  # more class images than samples: the first 4, once each
        ([5, 5], [2, 5], [4, 6]),  # class folders' own repeats count first
        ([3], [1], [3]),
    ],
)
def test_class_images_are_balanced_as_kohya_does(train_config, train, reg, want):
    examples = validate_dataset(train_config().data).examples
    instance = [replace(examples[i % 8], repeats=r) for i, r in enumerate(train)]
    classes = [replace(examples[i % 8], repeats=r, prior=True) for i, r in enumerate(reg)]
    got = [e.repeats for e in balance_class_examples(instance, classes)]
    assert got == want == _kohya_balance(train, reg)
    assert sum(got) >= sum(train)


def test_weighted_loss_arithmetic():
    per_sample = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    prior = torch.tensor([False, True, False, True])
    # (1 + 0.5·2 + 3 + 0.5·4) / 4
    assert weighted_loss(per_sample, prior, 0.5).item() == 7.0 / 4
    snr = torch.tensor([1.0, 0.5, 2.0, 0.25])  # (1 + 0.5·2·0.5 + 3·2 + 0.5·4·0.25) / 4
    assert weighted_loss(per_sample, prior, 0.5, snr).item() == 8.0 / 4
    assert weighted_loss(per_sample, None, 0.5).item() == 10.0 / 4  # no class image: the plain mean
    weighted_loss(per_sample, prior, 0.0).backward()
    assert per_sample.grad.tolist() == [0.25, 0.0, 0.25, 0.0]  # class images: exactly no gradient


def test_prior_preservation_configuration_errors_name_the_field(train_config, tmp_path):
    with pytest.raises(ValidationError, match="data.class_data_dir"):
        train_config(**{"train.with_prior_preservation": True})
    with pytest.raises(ValidationError, match="prior_loss_weight"):
        train_config(**{"train.prior_loss_weight": -1})
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, state in ((empty, "holds no images"), (tmp_path / "missing", "does not exist")):
        with pytest.raises(DatasetError, match=f"data.class_data_dir .* {state}.*does not generate them") as exc:
            validate_class_images(train_config(**{"data.class_data_dir": str(folder), "data.class_prompt": "a dog"}))
        assert "data.path" not in str(exc.value)
    uncaptioned = _class_dir(tmp_path)
    with pytest.raises(DatasetError, match="data.class_prompt") as exc:
        validate_class_images(train_config(**{"data.class_data_dir": str(uncaptioned)}))
    assert "data.instance_prompt" not in str(exc.value)
    with pytest.raises(DatasetError, match="data.class_prompt 'a sks thing' contains the trigger 'sks'"):
        validate_class_images(
            train_config(**{"data.class_data_dir": str(uncaptioned), "data.class_prompt": "a sks thing"})
        )
    off = train_config(**{"data.class_data_dir": str(uncaptioned), "train.with_prior_preservation": False})
    assert validate_class_images(off) is None and not off.prior_preservation


def test_class_images_join_after_the_split_and_change_the_run_hash(train_config, tmp_path):
    root = _class_dir(tmp_path, n=3, captions=True)
    cfg = train_config(**{"data.class_data_dir": str(root), "validation.holdout": 2})
    assert cfg.prior_preservation  # null: on because data.class_data_dir is set
    report = validate_dataset(cfg.data)
    spec = build_worker_spec(cfg, report)
    instance = [e for e in spec.examples if not e.prior]
    classes = [e for e in spec.examples if e.prior]
    assert len(instance) == 6 and len(spec.heldout) == 2 and not any(e.prior for e in spec.heldout)
    assert [e.caption for e in classes] == [f"a plain picture number {i}" for i in range(3)]
    assert [e.repeats for e in classes] == [2, 2, 2]  # balanced to the 6 instance samples
    assert spec.dataset_hash != report.fingerprint()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(root / "c0.png")  # another class image: another run
    assert build_worker_spec(cfg, validate_dataset(cfg.data)).dataset_hash != spec.dataset_hash
    text = describe_epoch(cfg, spec.examples)
    assert "3 class images (weight train.prior_loss_weight=1) balanced to 6" in text, text
    back = WorkerSpec.from_dict(spec.to_dict())  # what a Ray worker receives
    assert [(e.prior, e.repeats) for e in back.examples] == [(e.prior, e.repeats) for e in spec.examples]


def test_mlflow_params_hold_the_prior_loss_weight_and_the_class_counts(train_config, tmp_path, monkeypatch):
    import training.train as train_mod

    logged = {}

    class Recorder(NullTracker):
        def __init__(self, uri, run_id, **kwargs):
            pass

        def log_params(self, params):
            logged.update(params)

    monkeypatch.setattr(train_mod, "start_run", lambda *a, **k: "run-1")
    monkeypatch.setattr(train_mod, "MlflowTracker", Recorder)
    root = _class_dir(tmp_path, n=2, captions=True)
    cfg = train_config(
        **{"data.class_data_dir": str(root), "train.prior_loss_weight": 0.25, "mlflow.enabled": True}
        | {"mlflow.tracking_uri": "http://127.0.0.1:9"}
    )
    spec = build_worker_spec(cfg, validate_dataset(cfg.data))
    (tmp_path / "out").mkdir()  # run() makes output_dir before it opens the run
    assert train_mod.open_run(cfg, spec, resume=False) == ("http://127.0.0.1:9", "run-1")
    assert logged["train.prior_loss_weight"] == "0.25" and logged["train.with_prior_preservation"] == "None"
    assert logged["data.class_data_dir"] == str(root)
    assert (logged["data.num_images"], logged["data.samples_per_epoch"]) == ("8", "8")
    assert (logged["data.num_class_images"], logged["data.class_samples_per_epoch"]) == ("2", "8")


# -- training ------------------------------------------------------------------------------------------------
def test_training_with_class_images_and_zero_weight_gives_them_no_gradient(train_config, tmp_path):
    root = _class_dir(tmp_path, n=4)
    cfg = train_config(
        **{"data.class_data_dir": str(root), "data.class_prompt": "a plain picture", "train.epochs": 1}
        | {"train.prior_loss_weight": 0.0, "lora.rank": 2, "data.max_images": 4}
    )
    spec = build_worker_spec(cfg, validate_dataset(cfg.data))
    assert sum(e.prior for e in spec.examples) == 4 and len(spec.examples) == 8
    got = []
    parts, state = run_worker(spec, sink=lambda metrics, ckpt: got.append(metrics))
    steps = planned_batches([(64, 64)] * len(spec.examples), spec.examples, 4)  # 4 + 4 samples at batch 4
    assert state.step == steps == 2 and got[0]["step"] == 2
    assert math.isfinite(got[0]["loss"]), got

    # the same LoRA, a batch of class images only: weight 0 -> every LoRA gradient exactly zero; 1 -> not
    source = make_source(spec.examples, cfg.data, parts, True)
    classes = [i for i, e in enumerate(source.examples) if e.prior]
    for weight, zero in ((0.0, True), (1.0, False)):
        parts.unet.zero_grad(set_to_none=True)
        args = cfg.train.model_copy(update={"prior_loss_weight": weight})
        batch = source.batch(classes, torch.Generator().manual_seed(0))
        assert batch.prior is not None and batch.prior.all()
        denoising_loss(parts, batch, args, torch.Generator().manual_seed(1)).backward()
        grads = [p.grad for p in parts.trainable]
        nonzero = sum(int(g.count_nonzero()) for g in grads if g is not None)
        assert (nonzero == 0) == zero, f"prior_loss_weight={weight}: {nonzero} non-zero LoRA gradient entries"
