"""Aspect-ratio bucketing: bucket sizes, assignment, per-bucket batches and shards, caches, held-out, validation."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from training.adapter import verify_adapter
from training.buckets import (
    assign_buckets,
    default_step,
    granularity,
    histogram,
    make_buckets,
    model_granularity,
    nearest_bucket,
    resolve_bucket_step,
    shard_by_bucket,
)
from training.config import DataConfig, PreflightError
from training.data import Example, validate_dataset
from training.dataset import EncodedSource, PixelSource, epoch_batches, load_image, make_source, shard
from training.heldout import HeldOut
from training.worker import WorkerSpec, build_worker_parts, run_worker

CPU = torch.device("cpu")
MIXED = [(96, 64), (96, 64), (64, 96), (64, 96), (80, 80), (80, 80)]  # -> buckets 80x48, 48x80, 64x64


def _image(path, size, seed):
    """Smooth random colours with a red left edge and a blue right edge (4 px each)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)).copy()
    img[:, :4] = (255, 0, 0)
    img[:, -4:] = (0, 0, 255)
    Image.fromarray(img).save(path)


@pytest.fixture
def mixed_dataset(tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    rows = []
    for i, size in enumerate(MIXED):
        _image(root / f"{i:02d}.png", size, i)
        rows.append({"file_name": f"{i:02d}.png", "text": f"a {'wide' if size[0] > size[1] else 'tall'} sks photo"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture
def mixed_config(train_config, mixed_dataset):
    def make(**overrides):
        values = {"data.path": str(mixed_dataset), "data.bucket_step": 16, "train.batch_size": 2} | overrides
        return train_config(**values)

    return make


# -- bucket sizes and assignment ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "resolution, step, max_aspect", [(512, 64, 2.0), (64, 16, 2.0), (1024, 64, 4.0), (100, 8, 1.5)]
)
def test_buckets_fill_the_area_on_the_step_within_the_aspect_limit(resolution, step, max_aspect):
    buckets = make_buckets(resolution, step, max_aspect)
    area = resolution * resolution
    assert (resolution // step * step,) * 2 in buckets
    for w, h in buckets:
        assert w % step == 0 and h % step == 0 and w * h <= area
        assert max(w, h) / min(w, h) <= max_aspect
        if (w, h) != (resolution // step * step,) * 2:
            assert w * (h + step) > area  # the largest height that fits this width (kohya)
    assert any(w > h for w, h in buckets) and any(w < h for w, h in buckets)


def test_bucket_examples_and_limits():
    assert make_buckets(64, 16) == [(48, 80), (64, 64), (80, 48)]
    assert make_buckets(512, 64, 1.0) == [(512, 512)]
    with pytest.raises(ValueError, match="data.resolution=32 is below data.bucket_step=64"):
        make_buckets(32, 64)
    with pytest.raises(ValueError, match="data.bucket_step"):
        DataConfig(path=".", resolution=32, bucket_step=64)


def test_a_600x400_photo_goes_to_a_landscape_bucket_and_keeps_its_full_width(tmp_path):
    path = tmp_path / "photo.png"
    _image(path, (600, 400), 0)
    bucket = nearest_bucket((600, 400), make_buckets(512, 64))
    assert bucket == (640, 384)  # 1.67:1, the nearest ratio to 1.5 of 512² px at step 64
    assert assign_buckets([path], DataConfig(path=".", resolution=512), 64) == [bucket]
    t = load_image(path, bucket)
    assert t.shape == (3, 384, 640)
    assert t[0, :, 0].mean() > 0.9 and t[2, :, 0].mean() < -0.9  # the red left edge is still there
    assert t[2, :, -1].mean() > 0.9 and t[0, :, -1].mean() < -0.9  # and the blue right edge
    square = load_image(path, 512)  # what data.buckets=false does: the edges are cropped away
    assert square.shape == (3, 512, 512) and square[0, :, 0].mean() < 0.9


def test_granularity_from_model_configs(repo, tiny_pipe_dir):
    sd15_unet = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]}
    assert granularity(sd15_unet, {"block_out_channels": [128, 256, 512, 512]}) == 64
    assert model_granularity(str(repo / "models" / "toy-sd")) == 16
    assert model_granularity(str(tiny_pipe_dir)) == 16


def test_resolve_bucket_step_reads_the_model_and_names_a_bad_step(train_config, caplog):
    assert resolve_bucket_step(train_config()).data.bucket_step == 16
    assert resolve_bucket_step(train_config(**{"data.bucket_step": 32})).data.bucket_step == 32
    with pytest.raises(PreflightError, match="data.bucket_step=24 is not a multiple of 16"):
        resolve_bucket_step(train_config(**{"data.bucket_step": 24}))
    assert resolve_bucket_step(train_config(**{"data.buckets": False})).data.bucket_step is None
    with caplog.at_level(logging.WARNING, logger="training.buckets"):
        unreadable = resolve_bucket_step(train_config(base_model="/nonexistent/model"))
    assert unreadable.data.bucket_step is None and "set data.bucket_step" in caplog.text


# -- sharding and batches ------------------------------------------------------------------------------------
class _Indices:
    """A source stand-in whose batches are their indices (epoch_batches only needs groups, len and batch)."""

    def __init__(self, assigned):
        self.buckets = assigned
        self.groups = [[i for i, b in enumerate(assigned) if b == key] for key in sorted(set(assigned))]

    def __len__(self):
        return len(self.buckets)

    def batch(self, idx, gen):
        return idx


def test_batches_never_mix_buckets_and_cover_each_image_once():
    assigned = [(80, 48)] * 5 + [(48, 80)] * 3 + [(64, 64)] * 4
    source = _Indices(assigned)
    epoch = list(epoch_batches(source, 2, seed=0, epoch=0))
    assert all(len({assigned[i] for i in b}) == 1 for b in epoch)
    assert sorted(i for b in epoch for i in b) == list(range(len(assigned)))
    assert len(epoch) == 3 + 2 + 2
    assert epoch == list(epoch_batches(source, 2, seed=0, epoch=0))  # replayable
    assert epoch != list(epoch_batches(source, 2, seed=0, epoch=1))
    # buckets interleave instead of running one after another
    order = [assigned[b[0]] for b in epoch]
    assert any(a != b for a, b in zip(order, order[1:])) and order != sorted(order)


def test_ranks_get_equal_per_bucket_counts_and_batch_counts():
    assigned = [(80, 48)] * 5 + [(48, 80)] * 2 + [(64, 64)] * 1
    items = list(range(len(assigned)))
    shards = [shard_by_bucket(assigned, r, 2) for r in range(2)]
    per_rank = [histogram([assigned[i] for i in s]) for s in shards]
    assert per_rank[0] == per_rank[1] == {"80x48": 3, "64x64": 1, "48x80": 1}
    assert set(shards[0]) | set(shards[1]) == set(items)
    counts = [len(list(epoch_batches(_Indices([assigned[i] for i in s]), 2, 0, 0, r))) for r, s in enumerate(shards)]
    assert counts[0] == counts[1] == 2 + 1 + 1
    one_bucket = [(64, 64)] * 7  # one bucket: exactly the plain shard
    assert [shard_by_bucket(one_bucket, r, 3) for r in range(3)] == [shard(list(range(7)), r, 3) for r in range(3)]


@pytest.mark.parametrize("use_cache", [True, False])
def test_square_data_batches_are_bit_identical_to_the_unbucketed_path(train_config, use_cache):
    cfg = train_config(**{"data.random_flip": True})
    parts = build_worker_parts(cfg, CPU)
    examples = validate_dataset(cfg.data).examples
    flat = cfg.data.model_copy(update={"buckets": False})
    for rank in (0, 1):
        bucketed = make_source(examples, cfg.data, parts, use_cache, rank=rank, world_size=2)
        plain = make_source(examples, flat, parts, use_cache, rank=rank, world_size=2)
        assert len(bucketed.groups) == 1 and bucketed.batches_per_epoch(3) == 2
        # the pre-bucketing order: this rank's shard, one randperm per epoch, chunked in order
        old = shard(examples, rank, 2)
        assert bucketed.examples == old
        gen = torch.Generator().manual_seed(0 * 1_000_003 + 1 * 1_009 + rank)
        order = torch.randperm(len(old), generator=gen).tolist()
        got, want = list(epoch_batches(bucketed, 3, 0, 1, rank)), list(epoch_batches(plain, 3, 0, 1, rank))
        assert len(got) == len(want) == 2
        for a, b, start in zip(got, want, (0, 3)):
            assert torch.equal(a.input_ids, bucketed.input_ids[order[start : start + 3]])
            for field in ("input_ids", "pixels", "latent_mean", "latent_std", "prompt_embeds"):
                x, y = getattr(a, field), getattr(b, field)
                assert (x is None and y is None) or torch.equal(x, y), field


# -- sources, held-out, validation, training on mixed aspect ratios -----------------------------------------
def test_cached_latents_are_kept_per_bucket(mixed_config):
    cfg = mixed_config(**{"data.random_flip": True})
    parts = build_worker_parts(cfg, CPU)
    examples = validate_dataset(cfg.data).examples
    cached = make_source(examples, cfg.data, parts, use_cache=True)
    raw = make_source(examples, cfg.data, parts, use_cache=False)
    assert isinstance(cached, EncodedSource) and isinstance(raw, PixelSource)
    assert set(cached.mean) == {(80, 48), (48, 80), (64, 64)}
    for (w, h), mean in cached.mean.items():
        assert mean.shape == (2, 2, 4, h // 8, w // 8)  # two images, two flips each
    wide = [i for i, b in enumerate(cached.buckets) if b == (80, 48)]
    batch = cached.batch(wide, torch.Generator().manual_seed(0))
    assert batch.latent_mean.shape == (2, 4, 6, 10)
    pixels = raw.batch(wide, torch.Generator().manual_seed(0)).pixels
    assert pixels.shape == (2, 3, 48, 80)
    no_flip = torch.stack([load_image(cached.examples[i].path, (80, 48)) for i in wide])
    assert torch.allclose(cached.mean[(80, 48)][:, 0], parts.vae.encode(no_flip).latent_dist.mean, atol=1e-5)
    with pytest.raises(ValueError, match="one bucket"):
        cached.batch([wide[0], cached.buckets.index((64, 64))], torch.Generator())


def test_make_source_deals_each_bucket_out_to_the_ranks(mixed_config):
    cfg = mixed_config()
    parts = build_worker_parts(cfg, CPU)
    examples = validate_dataset(cfg.data).examples[:5]  # 80x48: 2, 48x80: 2, 64x64: 1 (padded to 2)
    sources = [make_source(examples, cfg.data, parts, use_cache=False, rank=r, world_size=2) for r in range(2)]
    assert [s.histogram() for s in sources] == [{"80x48": 1, "64x64": 1, "48x80": 1}] * 2
    assert [s.batches_per_epoch(2) for s in sources] == [3, 3]
    assert {e.path for s in sources for e in s.examples} == {e.path for e in examples}
    batches = list(epoch_batches(sources[1], 2, 0, 0, rank=1))
    assert sorted(tuple(b.pixels.shape[-2:]) for b in batches) == [(48, 80), (64, 64), (80, 48)]


def test_heldout_scores_mixed_buckets_the_same_for_any_rank_count(mixed_config):
    cfg = mixed_config(**{"validation.loss_timesteps": 2})
    parts = build_worker_parts(cfg, CPU)
    examples = validate_dataset(cfg.data).examples
    held = HeldOut(examples, cfg, parts)
    assert held.buckets == {"80x48": 2, "64x64": 2, "48x80": 2} and len(held.chunks) == 3
    assert held.chunks[0].latents.shape[-2:] != held.chunks[1].latents.shape[-2:]
    whole = held.loss(parts)
    assert 0 < whole < 2 and held.loss(parts) == whole
    # three ranks: each misses a bucket (0, 3 | 1, 4 | 2, 5), whose noise it must still draw to stay in step
    shares = [HeldOut(examples, cfg, parts, rank=r, world_size=3).loss(parts) for r in range(3)]
    assert sum(shares) == pytest.approx(whole, rel=1e-5)


def test_validation_speaks_of_the_short_side_and_reports_the_buckets(mixed_dataset):
    Image.new("RGB", (96, 40)).save(mixed_dataset / "07.png")  # 2.4:1 -> bucket 80x48, short side 40 < 48
    with open(mixed_dataset / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "07.png", "text": "a sks photo"}) + "\n")
    report = validate_dataset(DataConfig(path=str(mixed_dataset), bucket_step=16))
    (problem,) = report.errors
    assert problem.file == "07.png" and problem.message == (
        "96x40: short side 40 px is below 48 px, the short side of its bucket 80x48 for data.resolution=64; "
        "use a larger image or lower data.resolution"
    )
    assert report.buckets == {"80x48": 2, "64x64": 2, "48x80": 2}
    assert "buckets (data.resolution=64, bucket step 16, max aspect 2): 80x48: 2, 64x64: 2, 48x80: 2" in (
        report.summary()
    )
    flat = validate_dataset(DataConfig(path=str(mixed_dataset), buckets=False))
    assert "short side 40 px is below data.resolution=64" in flat.errors[0].message
    assert flat.buckets == {"64x64": 6}
    # no model at hand (`lorafleet validate`): a step guessed from the resolution, said so
    loose = validate_dataset(DataConfig(path=str(mixed_dataset), resolution=64))
    assert "bucket step 16 (no model at hand)" in loose.summary() and loose.buckets == report.buckets
    assert [default_step(r) for r in (64, 128, 512, 1024)] == [16, 32, 64, 64]


def test_run_worker_trains_a_mixed_aspect_dataset_and_saves_an_adapter(mixed_config, tmp_path):
    cfg = resolve_bucket_step(mixed_config(**{"data.bucket_step": "null", "train.epochs": 2}))
    assert cfg.data.bucket_step == 16
    report = validate_dataset(cfg.data)
    report.raise_if_errors()
    held = [Example(e.path, e.caption, e.sha256) for e in report.examples[::2]]
    spec = WorkerSpec(cfg, report.examples, report.fingerprint(), held)
    seen, saved = [], []

    def sink(metrics, ckpt):
        seen.append(metrics)
        if ckpt is not None:
            saved.append(verify_adapter(ckpt / "adapter"))

    _, state = run_worker(spec, sink=sink)
    assert [m["step"] for m in seen] == [3, 6]  # three one-bucket batches of 2 per epoch
    assert all(np.isfinite(m["loss"]) and np.isfinite(m["val_loss"]) for m in seen)
    assert saved and saved[-1].trigger == "sks" and state.step == 6


def test_an_unbounded_aspect_ratio_is_refused_not_looped_on(tmp_path):
    """max_aspect=inf made make_buckets loop forever; the config bounds it and the function checks it."""
    from pydantic import ValidationError

    from training.buckets import make_buckets
    from training.config import DataConfig

    with pytest.raises(ValidationError, match="max_aspect"):
        DataConfig(path=str(tmp_path), max_aspect=float("inf"))
    for step, aspect in ((16, float("inf")), (16, 1e9), (0, 2.0), (-16, 2.0)):
        with pytest.raises(ValueError, match="max_aspect|bucket_step"):
            make_buckets(64, step, aspect)
