"""200 alternating adapter switches over 8 adapters with room for 3: memory stays bounded and every image comes
from the adapter it asked for (compared with that adapter's image from a fresh engine, same seed)."""

from __future__ import annotations

import gc

import numpy as np
import psutil
import pytest

from serving.engine import Engine, ImageRequest

PROMPT = "a red circle on a sks background"
SWITCHES = 200
RSS_BOUND_MB = 64  # after the first round has loaded every adapter once; measured growth is far below (see print)


@pytest.fixture(scope="module")
def eight_adapters(tiny_pipe, tiny_pipe_dir, tmp_path_factory):
    from training.toy_world.adapters import random_adapter

    root = tmp_path_factory.mktemp("eight")
    return {f"c{i}": random_adapter(tiny_pipe, tiny_pipe_dir, root / f"c{i}", seed=100 + i) for i in range(8)}


def lora_params(engine: Engine) -> int:
    return sum(p.numel() for n, p in engine.pipe.unet.named_parameters() if "lora_" in n)


@pytest.mark.slow
@pytest.mark.reliability  # 93 s: `make reliability`
def test_adapter_churn_keeps_memory_bounded_and_images_right(tiny_pipe_dir, eight_adapters, tmp_path):
    from tests.serving.conftest import tiny_serve_args

    args = tiny_serve_args(tiny_pipe_dir, eight_adapters, tmp_path / "cache", max_adapters=3, warmup=False)
    names = sorted(eight_adapters)
    # references: each adapter once, in an engine with room for all eight (nothing is ever evicted there)
    roomy = Engine.from_args(args.model_copy(update={"max_adapters": 8}))
    reference = {}
    for i, name in enumerate(names):
        [res] = roomy.generate([roomy.prepare(ImageRequest(PROMPT, model=name, seed=i, steps=2))])
        reference[name] = np.asarray(res.images[0], dtype=np.int16)
    assert len({r.tobytes() for r in reference.values()}) == 8  # eight adapters, eight different images
    del roomy
    gc.collect()

    engine = Engine.from_args(args)
    order = [names[(k * 3) % 8] for k in range(SWITCHES)]  # stride 3 over 8: every request switches adapter
    process = psutil.Process()
    wrong, rss, slots = [], [], set()
    for k, name in enumerate(order):
        [res] = engine.generate([engine.prepare(ImageRequest(PROMPT, model=name, seed=names.index(name), steps=2))])
        if np.abs(np.asarray(res.images[0], dtype=np.int16) - reference[name]).max() > 1:
            wrong.append((k, name))
        if k == 7:
            gc.collect()
            rss.append(process.memory_info().rss)
            params = lora_params(engine)
        slots.add(len(engine.pipe.unet.peft_config))
    gc.collect()
    rss.append(process.memory_info().rss)
    growth_mb = (rss[-1] - rss[0]) / 2**20
    stats = engine.stats()
    print(f"{SWITCHES} switches: RSS growth after the first round {growth_mb:+.1f} MB; {stats}")
    assert not wrong, f"images from the wrong adapter at requests {wrong[:5]}"
    assert stats["loaded"] == 3 and stats["misses"] == SWITCHES and stats["evictions"] == SWITCHES - 3
    assert slots == {1, 2, 3} and lora_params(engine) == params  # never more than 3 adapters in the UNet
    assert growth_mb < RSS_BOUND_MB
