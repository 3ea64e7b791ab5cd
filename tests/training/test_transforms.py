"""Image transforms, sharding and the latent/text cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from training.config import DataConfig, TrainConfig
from training.data import Example, validate_dataset
from training.dataset import EncodedSource, PixelSource, epoch_batches, load_image, make_source, shard
from training.worker import build_worker_parts

CPU = torch.device("cpu")


@pytest.fixture
def wide_image(tmp_path):
    """192x64: left third red, middle green, right third blue."""
    arr = np.zeros((64, 192, 3), np.uint8)
    arr[:, :64, 0] = arr[:, 64:128, 1] = arr[:, 128:, 2] = 255
    path = tmp_path / "wide.png"
    Image.fromarray(arr).save(path)
    return path


def _channel_means(t):
    return t.mean(dim=(1, 2))


def test_center_crop_keeps_the_middle(wide_image):
    t = load_image(wide_image, 32)  # resized to 96x32, then the middle 32 columns
    assert t.shape == (3, 32, 32) and t.min() >= -1 and t.max() <= 1
    r, g, b = _channel_means(t)
    assert g > 0.9 and r < -0.5 and b < -0.5  # the green middle third


def test_random_crop_moves_and_flip_mirrors(wide_image):
    crops = {
        tuple(load_image(wide_image, 64, "random", gen=torch.Generator().manual_seed(s))[:, 0, 0]) for s in range(8)
    }
    assert len(crops) > 1  # different offsets for different draws
    plain, flipped = load_image(wide_image, 64), load_image(wide_image, 64, flip=True)
    assert torch.equal(flipped, plain.flip(-1))


def test_shards_are_equal_and_cover_everything():
    examples = [Example(f"{i}.png", "x") for i in range(7)]
    shards = [shard(examples, r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    assert {e.path for s in shards for e in s} == {e.path for e in examples}


def test_epoch_order_depends_on_epoch_and_is_replayable(train_config):
    cfg = train_config()
    parts = build_worker_parts(cfg, CPU)
    source = make_source(validate_dataset(cfg.data).examples, cfg.data, parts, True)
    ids = lambda epoch: [b.input_ids.tolist() for b in epoch_batches(source, 4, 0, epoch)]  # noqa: E731
    assert ids(0) == ids(0) and ids(0) != ids(1)


def test_cache_matches_the_uncached_path(train_config):
    cfg = train_config()
    parts = build_worker_parts(cfg, CPU)
    examples = validate_dataset(cfg.data).examples
    cached = make_source(examples, cfg.data, parts, use_cache=True)
    raw = make_source(examples, cfg.data, parts, use_cache=False)
    assert isinstance(cached, EncodedSource) and isinstance(raw, PixelSource)
    gen = torch.Generator()
    b_cached, b_raw = cached.batch([0, 3], gen), raw.batch([0, 3], gen)
    assert torch.equal(b_cached.prompt_embeds, b_raw.prompt_embeds)
    dist = parts.vae.encode(b_raw.pixels).latent_dist
    assert torch.allclose(b_cached.latent_mean, dist.mean, atol=1e-5)


def test_random_flip_caches_both_views(train_config):
    cfg = train_config(**{"data.random_flip": True})
    parts = build_worker_parts(cfg, CPU)
    source = make_source(validate_dataset(cfg.data).examples, cfg.data, parts, cfg.use_cache)
    (mean,) = source.mean.values()  # square toy images: one bucket
    assert mean.shape[1] == 2
    assert not torch.allclose(mean[:, 0], mean[:, 1])


def test_random_crop_turns_the_cache_off_and_refuses_forcing_it(toy_dataset):
    cfg = TrainConfig.model_validate({"data": {"path": str(toy_dataset), "crop": "random"}})
    assert cfg.use_cache is False
    with pytest.raises(ValueError, match="cache_latents=true cannot be combined with data.crop=random"):
        TrainConfig.model_validate(
            {"data": {"path": str(toy_dataset), "crop": "random"}, "train": {"cache_latents": True}}
        )


def test_data_config_rejects_unknown_crop():
    with pytest.raises(ValueError, match="crop"):
        DataConfig.model_validate({"path": ".", "crop": "edge"})
