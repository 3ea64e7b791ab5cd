"""The LoRA model and the plain training loop, called directly (no Ray)."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer

from training.data import validate_dataset
from training.dataset import make_source
from training.loop import denoising_loss, make_state, train_loop
from training.model import add_lora, load_parts
from training.worker import WorkerSpec, build_worker_parts, run_worker

CPU = torch.device("cpu")


def _spec(cfg):
    report = validate_dataset(cfg.data)
    report.raise_if_errors()
    return WorkerSpec(cfg, report.examples, report.fingerprint())


def _unet_out(unet, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    ctx = torch.randn(2, 32, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=ctx).sample


def test_only_lora_params_train(train_config):
    cfg = train_config(**{"lora.rank": 4})
    parts = build_worker_parts(cfg, CPU)
    trainable = {n for n, p in parts.raw_unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(p.requires_grad for p in parts.vae.parameters())
    assert not any(p.requires_grad for p in parts.raw_text_encoder.parameters())
    assert all(p.dtype == torch.float32 for p in parts.trainable)
    # rank 4 on q/k/v/out of every attention block: A is (4, d_in), B is (d_out, 4)
    for name, p in parts.raw_unet.named_parameters():
        if "lora_A" in name:
            assert p.shape[0] == 4
        if "lora_B" in name:
            assert p.shape[1] == 4


def test_zero_initialised_lora_leaves_outputs_unchanged(train_config):
    cfg = train_config()
    base = load_parts(cfg.base_model, CPU)
    expected = _unet_out(base.raw_unet)
    add_lora(base, cfg.lora)
    assert torch.equal(_unet_out(base.raw_unet), expected)
    # and a non-zero B does change them (the test could fail)
    for module in base.raw_unet.modules():
        if isinstance(module, LoraLayer):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    assert not torch.allclose(_unet_out(base.raw_unet), expected, atol=1e-4)


def test_bad_target_modules_name_the_key(train_config):
    cfg = train_config(**{"lora.target_modules": "[not_a_layer]"})
    with pytest.raises(ValueError, match="lora.target_modules"):
        build_worker_parts(cfg, CPU)


def test_loss_falls_over_twenty_steps(train_config):
    cfg = train_config(**{"train.epochs": 20, "train.batch_size": 8, "lora.rank": 8, "train.lr": 2e-3})
    spec = _spec(cfg)
    metrics = []
    run_worker(spec, sink=lambda m, ckpt: metrics.append(m))
    assert [m["step"] for m in metrics] == list(range(1, 21))  # 8 images / batch 8 = 1 step per epoch
    first, last = sum(m["loss"] for m in metrics[:5]) / 5, sum(m["loss"] for m in metrics[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert all(m["images_per_s"] > 0 and m["epoch_time_s"] > 0 for m in metrics)


def test_one_worker_is_reproducible(train_config):
    cfg = train_config(**{"train.epochs": 3})
    runs = [[], []]
    for out in runs:
        run_worker(_spec(cfg), sink=lambda m, ckpt, out=out: out.append(m["loss"]))
    assert runs[0] == runs[1]


def test_resume_continues_the_step_count_in_the_same_adapter(train_config, tmp_path):
    cfg = train_config(**{"train.epochs": 4, "ray.checkpoint_every_n_epochs": 2})
    spec = _spec(cfg)
    full, saved = [], {}

    def keep(m, ckpt):
        full.append(m)
        if ckpt is not None and m["epoch"] == 2:
            import shutil

            saved["dir"] = shutil.copytree(ckpt, tmp_path / "ckpt")

    parts_full, _ = run_worker(spec, sink=keep)
    resumed = []
    parts, state = run_worker(spec, resume_from=saved["dir"], sink=lambda m, c: resumed.append(m))
    assert [m["step"] for m in resumed] == [m["step"] for m in full[2:]]
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in full[2:]], rel=1e-5)
    assert list(parts.raw_unet.peft_config) == ["default"]  # loaded into the existing adapter, not a second one
    n_lora = sum(isinstance(m, LoraLayer) for m in parts.raw_unet.modules())
    assert n_lora == sum(isinstance(m, LoraLayer) for m in parts_full.raw_unet.modules())
    assert state.step == full[-1]["step"]
    for (n, a), b in zip(parts.raw_unet.named_parameters(), parts_full.raw_unet.parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_grad_accumulation_counts_optimizer_steps(train_config):
    cfg = train_config(**{"train.epochs": 2, "train.batch_size": 2, "train.grad_accum": 3})
    metrics = []
    run_worker(_spec(cfg), sink=lambda m, c: metrics.append(m))
    # 8 images / batch 2 = 4 micro-batches per epoch -> optimizer steps after micro-batch 3 and 4
    assert [m["step"] for m in metrics] == [2, 4]


def test_gradient_checkpointing_gives_the_same_gradients(train_config):
    grads = []
    for ckpt in (False, True):
        cfg = train_config(**{"train.gradient_checkpointing": ckpt})
        parts = build_worker_parts(cfg, CPU)
        spec = _spec(cfg)
        source = make_source(spec.examples, cfg.data, parts, cfg.use_cache)
        parts.raw_unet.train()
        batch = source.batch([0, 1, 2], torch.Generator().manual_seed(0))
        denoising_loss(parts, batch, cfg.train, torch.Generator().manual_seed(1)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in parts.trainable]))
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_text_encoder_lora_trains_through_uncached_embeddings(train_config):
    cfg = train_config(**{"lora.text_encoder": True, "train.epochs": 1})
    parts = build_worker_parts(cfg, CPU)
    spec = _spec(cfg)
    source = make_source(spec.examples, cfg.data, parts, cfg.use_cache)
    assert source.prompt_embeds is None  # the text encoder changes, so its output cannot be cached
    te_lora = [p for n, p in parts.raw_text_encoder.named_parameters() if p.requires_grad]
    trainable_ids = {id(p) for p in parts.trainable}
    assert te_lora and all(id(p) in trainable_ids for p in te_lora)
    before = [p.detach().clone() for p in te_lora]
    state = make_state(cfg, parts, source.batches_per_epoch(cfg.train.batch_size))
    train_loop(cfg, parts, source, state, report=lambda m, s: None)
    assert any(not torch.equal(a, b) for a, b in zip(before, te_lora))


def test_noise_offset_and_min_snr_change_the_loss(train_config):
    cfg = train_config()
    parts = build_worker_parts(cfg, CPU)
    source = make_source(_spec(cfg).examples, cfg.data, parts, True)
    batch = source.batch([0, 1, 2, 3], torch.Generator().manual_seed(0))

    def loss(**changes):
        args = cfg.train.model_copy(update=changes)
        with torch.no_grad():
            return denoising_loss(parts, batch, args, torch.Generator().manual_seed(5)).item()

    plain = loss(snr_gamma=None, noise_offset=0.0)
    assert loss(snr_gamma=None, noise_offset=0.0) == plain  # same generator -> same loss
    assert loss(snr_gamma=None, noise_offset=0.1) != plain
    assert loss(snr_gamma=1.0, noise_offset=0.0) < plain  # min(SNR, 1)/SNR <= 1 down-weights low-noise steps
