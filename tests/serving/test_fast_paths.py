"""The engine's fast paths: which path each pass kind takes, and that every path draws the single-adapter images.

Exactness on CPU (fp32): a base-only pass is bit-identical to a plain base pipeline call; a single-adapter pass is
PEFT's own active-adapter forward; each image of a mixed pass (batched or PEFT-routed) is within 1/255 per channel
of its single-adapter run (the batched matmuls sum in another order than one sample's ``nn.Linear``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serving.engine import Engine, ImageRequest
from tests.serving.test_engine import PROMPT, pixels, run  # the engine tests' helpers


def make_adapter(pipe, base: Path, out: Path, seed: int, rank: int, alpha: float, targets: list[str], te: bool = False):
    """A random LoRA (non-zero B) on ``targets`` of the UNet (and the text encoder's q/v projections if ``te``)."""
    import copy

    import torch
    from peft import LoraConfig

    from training.adapter import AdapterMeta, save_adapter

    gen = torch.Generator().manual_seed(seed)
    unet, text_encoder = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder) if te else None
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian"))
    if te:
        text_encoder.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"]))
    for model in (unet, text_encoder):
        for name, param in model.named_parameters() if model is not None else []:
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=gen) * 0.3
    meta = AdapterMeta(base_model=str(base), rank=rank, alpha=float(alpha), target_modules=targets, text_encoder=te)
    return save_adapter(out, unet, meta, text_encoder=text_encoder)


@pytest.fixture(scope="module")
def varied_adapters(tiny_pipe, tiny_pipe_dir, tmp_path_factory) -> dict[str, Path]:
    """Different ranks and alphas (so scales differ), a text-encoder LoRA, and a Conv2d (LoCon) LoRA."""
    root = tmp_path_factory.mktemp("varied")
    attn = ["to_q", "to_k", "to_v", "to_out.0"]
    return {
        "r2": make_adapter(tiny_pipe, tiny_pipe_dir, root / "r2", 11, rank=2, alpha=1.0, targets=attn),
        "r8te": make_adapter(tiny_pipe, tiny_pipe_dir, root / "r8te", 12, rank=8, alpha=16.0, targets=attn, te=True),
        "r4q": make_adapter(tiny_pipe, tiny_pipe_dir, root / "r4q", 13, rank=4, alpha=3.0, targets=["to_q"]),
        "conv": make_adapter(tiny_pipe, tiny_pipe_dir, root / "conv", 14, rank=4, alpha=4.0, targets=["to_k", "conv1"]),
    }


@pytest.fixture
def varied_engine(tiny_pipe_dir, tiny_adapters, varied_adapters, tmp_path):
    from tests.serving.conftest import tiny_serve_args

    def make(**overrides) -> Engine:
        adapters = {**tiny_adapters, **varied_adapters}
        args = tiny_serve_args(tiny_pipe_dir, adapters, tmp_path / "cache", warmup=False, max_adapters=8, **overrides)
        return Engine.from_args(args)

    return make


@pytest.fixture
def peft_spy(monkeypatch):
    """Counts PEFT's per-sample routed forwards by layer class (``Linear``, ``Conv2d``)."""
    from peft.tuners.lora import layer

    counts = {"Linear": 0, "Conv2d": 0}
    for cls in (layer.Linear, layer.Conv2d):
        original = cls._mixed_batch_forward

        def spy(self, *args, _original=original, _name=cls.__name__, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "_mixed_batch_forward", spy)
    return counts


def test_each_pass_kind_takes_its_path(engine, peft_spy):
    seeds = iter(range(100))

    def one_pass(*models: str) -> tuple[str, dict]:
        before = dict(engine.lora.calls)
        [*results] = run(engine, *[ImageRequest(PROMPT, model=m, seed=next(seeds), steps=2) for m in models])
        assert len({r.pass_id for r in results}) == 1
        return {k: v - before.get(k, 0) for k, v in engine.lora.calls.items()}

    run(engine, ImageRequest(PROMPT, model="ad1", steps=1))  # adapters loaded: the base pass must disable them
    for models, kind in ((("base", "base"), "base"), (("ad0", "ad0"), "single"), (("ad1",), "single")):
        passes, merged = engine.lora.passes[kind], engine.lora.merged_layers
        assert one_pass(*models) == {} and engine.lora.passes[kind] == passes + 1, models  # no routed layer call
        assert (engine.lora.merged_layers > merged) == (kind == "single"), models  # single passes run merged
    assert peft_spy == {"Linear": 0, "Conv2d": 0}
    calls = one_pass("ad0", "base", "ad1")
    assert calls.get("batched", 0) > 0 and "peft_routed" not in calls and engine.lora.passes["mixed"] == 1
    assert peft_spy == {"Linear": 0, "Conv2d": 0}  # the mixed pass did not use PEFT's masked loop either


def test_a_base_pass_draws_what_a_plain_base_pipeline_draws(engine, tiny_pipe_dir):
    import torch
    from diffusers import StableDiffusionPipeline

    run(engine, ImageRequest(PROMPT, model="ad0", seed=1), ImageRequest(PROMPT, model="ad2", seed=1))  # loaded
    got = run(engine, ImageRequest(PROMPT, model="base", seed=7, n=2))[0].images
    plain = StableDiffusionPipeline.from_pretrained(str(tiny_pipe_dir))
    plain.set_progress_bar_config(disable=True)
    gens = [torch.Generator("cpu").manual_seed(7 + i) for i in range(2)]
    want = plain([PROMPT] * 2, width=64, height=64, num_inference_steps=4, guidance_scale=4.0, generator=gens).images
    for g, w in zip(got, want):
        assert np.array_equal(pixels(g), pixels(w))  # bit-identical: disabled LoRA layers return the base output


def _mixed_vs_alone(engine: Engine, models: list[str]) -> int:
    """Largest per-channel difference between each image of one mixed pass and its single-adapter run."""
    reqs = [ImageRequest(PROMPT, model=m, seed=20 + i) for i, m in enumerate(models)]
    mixed = run(engine, *reqs)
    assert len({r.pass_id for r in mixed}) == 1 and mixed[0].batch_images == len(models)
    worst = 0
    for req, got in zip(reqs, mixed):
        [alone] = run(engine, req)
        worst = max(worst, int(np.abs(pixels(got.images[0]) - pixels(alone.images[0])).max()))
    return worst


@pytest.mark.parametrize("lora_batching", ["batched", "peft"])
def test_mixed_ranks_alphas_and_text_encoder_lora_match_their_single_runs(varied_engine, lora_batching):
    engine = varied_engine(**{"speed.lora_batching": lora_batching})
    models = ["r2", "base", "r8te", "ad0", "r4q", "r2", "r8te"]
    assert _mixed_vs_alone(engine, models) <= 1
    kind = "batched" if lora_batching == "batched" else "peft_routed"
    assert engine.lora.calls[kind] > 0 and len(engine.lora.calls) == 1, engine.lora.calls
    # every adapter changes its images, so the comparison above could fail: same seed, other adapter, other image
    same_seed = [pixels(r.images[0]) for r in run(engine, *[ImageRequest(PROMPT, model=m, seed=3) for m in models[:5]])]
    assert all(np.abs(a - b).mean() > 1 for i, a in enumerate(same_seed) for b in same_seed[i + 1 :])


def test_conv_lora_layers_fall_back_to_peft_routing_in_the_same_pass(varied_engine, peft_spy):
    engine = varied_engine()
    assert _mixed_vs_alone(engine, ["conv", "ad0", "base", "conv"]) <= 1
    assert peft_spy["Conv2d"] > 0 and peft_spy["Linear"] == 0  # LoCon routed by PEFT, Linear LoRA batched
    assert engine.lora.calls["batched"] > 0 and engine.lora.calls["peft_routed"] == peft_spy["Conv2d"]


def test_batched_and_peft_routing_agree_on_one_mixed_pass(varied_engine):
    models = ["r8te", "ad1", "base", "r2"]
    reqs = [ImageRequest(PROMPT, model=m, seed=40 + i, steps=3) for i, m in enumerate(models)]
    batched = run(engine := varied_engine(), *reqs)
    peft = run(varied_engine(**{"speed.lora_batching": "peft"}), *reqs)
    assert engine.lora.passes["mixed"] == 1
    for a, b in zip(batched, peft):
        assert np.abs(pixels(a.images[0]) - pixels(b.images[0])).max() <= 1


def test_speed_options_are_applied(serve_args):
    import torch

    args = serve_args(**{"speed.sdpa": False, "speed.vae_slicing": True, "speed.vae_tiling": True})
    engine = Engine.from_args(args)
    procs = {type(p).__name__ for p in engine.pipe.unet.attn_processors.values()}
    assert procs == {"AttnProcessor"} and engine.pipe.vae.use_slicing and engine.pipe.vae.use_tiling
    assert torch.get_float32_matmul_precision() == "highest"  # speed.tf32 is a no-op on CPU
    default = Engine.from_args(serve_args(**{"speed.channels_last": True}))
    assert {type(p).__name__ for p in default.pipe.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    conv = default.pipe.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    # the options change speed, not images (VAE tiling only matters beyond the VAE's sample size)
    a = run(engine, ImageRequest(PROMPT, model="ad0", seed=2, n=2))[0].images
    b = run(default, ImageRequest(PROMPT, model="ad0", seed=2, n=2))[0].images
    assert all(np.abs(pixels(x) - pixels(y)).max() <= 1 for x, y in zip(a, b))


def test_compile_with_mixed_batches_is_a_config_error_naming_both_keys(serve_args):
    from training.configuration import ConfigError

    with pytest.raises(ConfigError, match=r"speed.compile_unet needs batching.mixed_adapters: false"):
        serve_args(**{"speed.compile_unet": True})


@pytest.mark.slow  # ~11 s: a fresh process loads the toy model
def test_the_gpu_test_helper_runs_without_ray_or_mlflow(tiny_pipe_dir, tmp_path):
    """tests/gpu/test_engine_gpu.py runs where neither ray nor mlflow is installed: its helper must not import them
    (checked in a fresh process: nothing under ray or mlflow was imported)."""
    code = (
        "import sys\n"
        "from tests.gpu.test_engine_gpu import mixed_batch_error\n"
        f"worst = mixed_batch_error('cpu', 'float32', {str(tmp_path)!r}, steps=3)\n"
        "print('worst', worst)\n"
        "assert worst <= 1, worst\n"
        "imported = sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow'})\n"
        "assert not imported, f'imported {imported}'\n"
    )
    repo = Path(__file__).resolve().parents[2]
    env = os.environ | {"PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_compiled_unet_hot_swaps_adapters_into_fixed_slots(serve_args, engine, monkeypatch):
    """speed.compile_unet: adapters after the first go into the same slot in place (no new PEFT adapter, no new
    module: the compiled graph stays valid). The compile itself is replaced by a recorder here (minutes on CPU)."""
    import torch

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    args = serve_args(**{"speed.compile_unet": True, "batching.mixed_adapters": False, "max_adapters": 1})
    swapped = Engine.from_args(args)
    assert compiled == ["UNet2DConditionModel"]
    modules = None
    for model in ("ad0", "ad1", "base", "ad2", "ad0"):
        req = ImageRequest(PROMPT, model=model, seed=5)
        [got], [want] = run(swapped, req), run(engine, req)
        assert np.abs(pixels(got.images[0]) - pixels(want.images[0])).max() <= 1, model
        assert set(swapped.pipe.unet.peft_config) == {"slot0"}
        names = [n for n, _ in swapped.pipe.unet.named_modules()]
        assert modules is None or names == modules  # the same modules after every swap
        modules = names
    assert swapped.stats()["evictions"] == 3


def test_a_merged_single_adapter_pass_draws_the_unmerged_images_and_leaves_the_base_weights_alone(varied_engine):
    """Single-adapter passes run on merged weights (W + scale·BA in a copy): the same images as PEFT's unmerged
    forward within 1/255, the base layers get their own weight tensors back (a base pass after them is bit-identical
    to one before), and an adapter with text-encoder LoRA or only some layers merges too."""
    merged = varied_engine()
    unmerged = varied_engine(**{"speed.merge_single_adapter": False})
    base_before = pixels(run(merged, ImageRequest(PROMPT, model="base", seed=5, steps=3))[0].images[0])
    weights = {id(m): m.weight for m in merged.pipe.unet.modules() if type(m).__name__ == "Linear"}
    for model in ("r8te", "r4q", "r8te", "ad0"):  # r8te twice: the second pass reuses the kept merged copies
        reqs = [ImageRequest(PROMPT, model=model, seed=s, steps=3) for s in (1, 2)]
        a, b = run(merged, *reqs), run(unmerged, *reqs)
        for x, y in zip(a, b):
            assert np.abs(pixels(x.images[0]) - pixels(y.images[0])).max() <= 1, model
    assert merged.lora.merged_layers > 0 and unmerged.lora.merged_layers == 0
    assert merged.lora.passes["single"] == 4 and not merged.lora.calls  # nothing routed per sample
    after = {id(m): m.weight for m in merged.pipe.unet.modules() if type(m).__name__ == "Linear"}
    assert all(after[k] is w for k, w in weights.items())  # every base layer holds its own tensor again
    base_after = pixels(run(merged, ImageRequest(PROMPT, model="base", seed=5, steps=3))[0].images[0])
    assert np.array_equal(base_before, base_after)
    # the merged images differ from the base: the adapter is really in the merged weights
    assert (
        np.abs(pixels(run(merged, ImageRequest(PROMPT, model="ad0", seed=5, steps=3))[0].images[0]) - base_after).mean()
        > 1
    )


@pytest.mark.parametrize("fails_in", ["get_delta_weight", "_stack"])
def test_a_pass_whose_set_up_fails_half_way_leaves_every_weight_as_it_was(engine, monkeypatch, fails_in):
    """Out of memory while merging (single pass) or stacking (mixed pass), after some layers were already set up:
    that request fails, and every later pass draws exactly what it drew before."""
    import torch
    from peft.tuners.lora import Linear as LoraLinear

    from serving.lora_batch import LoraRouter

    def image(model: str):
        return pixels(run(engine, ImageRequest(PROMPT, model=model, seed=5, steps=3))[0].images[0])

    before = {m: image(m) for m in ("base", "ad0")}
    owner = LoraLinear if fails_in == "get_delta_weight" else LoraRouter
    original, calls = getattr(owner, fails_in), {"n": 0}

    def fails_on_the_fifth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise torch.OutOfMemoryError("simulated: out of memory")
        return original(*args, **kwargs)

    monkeypatch.setattr(
        owner, fails_in, fails_on_the_fifth if owner is LoraLinear else staticmethod(fails_on_the_fifth)
    )
    models = ["ad1"] if fails_in == "get_delta_weight" else ["ad1", "ad0", "base"]
    results = engine.generate([engine.prepare(ImageRequest(PROMPT, model=m, seed=9, steps=2)) for m in models])
    assert all(isinstance(r, torch.OutOfMemoryError) for r in results) and calls["n"] >= 5, results
    monkeypatch.undo()
    for _ in range(2):  # every later pass, not only the next one
        for model in ("base", "ad0"):
            assert np.array_equal(image(model), before[model]), model


def test_hot_swap_refuses_a_rank_above_the_slots_and_text_encoder_lora_naming_the_fix(
    tiny_pipe, tiny_pipe_dir, tiny_adapters, varied_adapters, tmp_path, monkeypatch
):
    """A compiled UNet's slots are padded to speed.hotswap_max_rank: a bigger adapter (or one with text-encoder LoRA,
    which diffusers cannot hot-swap) is refused before loading, with the setting to change; the slot keeps serving."""
    import torch

    from serving.adapters import AdapterError
    from tests.serving.conftest import tiny_serve_args

    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: None)
    from training.toy_world.adapters import random_adapter

    r8 = random_adapter(tiny_pipe, tiny_pipe_dir, tmp_path / "r8", seed=9, rank=8)
    adapters = {**tiny_adapters, **varied_adapters, "r8": r8}
    overrides = {"speed.compile_unet": True, "batching.mixed_adapters": False, "max_adapters": 1}
    args = tiny_serve_args(tiny_pipe_dir, adapters, tmp_path / "c", warmup=False, **overrides)
    args = args.model_copy(update={"speed": args.speed.model_copy(update={"hotswap_max_rank": 4})})
    engine = Engine.from_args(args)
    run(engine, ImageRequest(PROMPT, model="r2", seed=1))  # rank 2 <= 4: loads into slot0
    for model, words in (("r8te", "text-encoder LoRA"), ("r8", "rank 8 > speed.hotswap_max_rank 4")):
        [result] = engine.generate([engine.prepare(ImageRequest(PROMPT, model=model, seed=1))])
        assert isinstance(result, AdapterError) and words in str(result), (model, result)
    assert "raise speed.hotswap_max_rank" not in str(result)
    run(engine, ImageRequest(PROMPT, model="ad0", seed=1))  # rank 4: swaps in
    assert set(engine.pipe.unet.peft_config) == {"slot0"}
