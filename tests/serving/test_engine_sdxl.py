"""The engine on an SDXL base (the tiny random SDXL pipeline, saved and loaded through from_pretrained): mixed-adapter
passes route the UNet and both text encoders, SDXL's zero negative embeddings stay per request, sizes follow the
model. Tolerances are the SD tests' (tests/serving/test_engine.py): each image within 1/255 of its single-adapter
run; base rows bit-identical to a base-only pass of the same batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from peft.tuners.lora import LoraLayer

from serving.engine import Engine, ImageRequest, RequestError
from tests.serving.conftest import tiny_serve_args
from tests.serving.test_engine import PROMPT, pixels, run


@pytest.fixture(scope="module")
def sdxl_adapters(tiny_sdxl_pipe, tiny_sdxl_dir, tmp_path_factory) -> dict[str, Path]:
    """xl0, xl1: UNet LoRA; xlte0, xlte1: UNet LoRA plus LoRA on both text encoders. Random, distinct."""
    from training.toy_world.adapters import random_adapter

    root = tmp_path_factory.mktemp("sdxl-adapters")
    out = {f"xl{i}": random_adapter(tiny_sdxl_pipe, tiny_sdxl_dir, root / f"xl{i}", seed=20 + i) for i in range(2)}
    for i in range(2):
        out[f"xlte{i}"] = random_adapter(
            tiny_sdxl_pipe, tiny_sdxl_dir, root / f"xlte{i}", seed=30 + i, text_encoders=True
        )
    return out


@pytest.fixture
def sdxl_args(tiny_sdxl_dir, sdxl_adapters, tmp_path):
    return lambda **overrides: tiny_serve_args(
        tiny_sdxl_dir, sdxl_adapters, tmp_path / "cache", **({"warmup": False, "defaults.steps": 2} | overrides)
    )


@pytest.fixture
def sdxl_engine(sdxl_args) -> Engine:
    return Engine.from_args(sdxl_args())


def test_the_router_covers_the_unet_and_both_text_encoders(sdxl_engine):
    pipe = sdxl_engine.pipe
    assert sdxl_engine.family.name == "sdxl" and sdxl_engine.size_multiple == 16  # VAE 8 x 2 UNet levels
    assert {id(p) for p in sdxl_engine.lora.parts} == {id(pipe.unet), id(pipe.text_encoder), id(pipe.text_encoder_2)}
    run(sdxl_engine, ImageRequest(PROMPT, model="xlte0", seed=1, steps=1))
    for part in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        layers = [m for m in part.modules() if isinstance(m, LoraLayer)]
        assert layers and all(any(m is r for r in sdxl_engine.lora.layers) for m in layers), type(part).__name__


@pytest.mark.slow  # about 10-30 s on 2 shared cores
@pytest.mark.parametrize("guidance", [4.0, 1.0])  # with guidance the UNet sees 2N rows, without it N
def test_a_mixed_sdxl_batch_draws_each_image_as_its_single_adapter_run(sdxl_engine, guidance):
    models = ["xl0", "base", "xlte0", "xl1", "xlte1", "base", "xlte0"]
    reqs = [ImageRequest(PROMPT, model=m, seed=40 + i, guidance=guidance) for i, m in enumerate(models)]
    mixed = run(sdxl_engine, *reqs)
    assert len({r.pass_id for r in mixed}) == 1 and mixed[0].batch_images == len(models)
    assert sdxl_engine.lora.passes["mixed"] == 1 and sdxl_engine.lora.calls["batched"] > 0
    for req, got in zip(reqs, mixed):
        [alone] = run(sdxl_engine, req)
        assert np.abs(pixels(got.images[0]) - pixels(alone.images[0])).max() <= 1, req.model
    # base rows: bit-identical to the same batch drawn by the base model alone
    base_only = run(sdxl_engine, *[ImageRequest(PROMPT, model="base", seed=r.seed, guidance=guidance) for r in reqs])
    for req, got, ref in zip(reqs, mixed, base_only):
        if req.model == "base":
            assert np.array_equal(pixels(got.images[0]), pixels(ref.images[0]))
        else:  # every adapter changes its image (text-encoder LoRA on both encoders included)
            assert np.abs(pixels(got.images[0]) - pixels(ref.images[0])).mean() > 2, req.model


@pytest.mark.slow  # about 10-30 s on 2 shared cores
def test_sdxl_negative_prompts_route_per_request(sdxl_engine):
    """SDXL zeroes the negative embeddings only when a pass has no negative prompt at all, so requests with and
    without one never share a pass: each image stays what it is alone."""
    reqs = [
        ImageRequest(PROMPT, model="xlte0", seed=3, negative_prompt="a blue square"),
        ImageRequest(PROMPT, model="xl1", seed=4),
        ImageRequest(PROMPT, model="base", seed=5, negative_prompt="a green circle"),
        ImageRequest(PROMPT, model="xlte1", seed=6),
    ]
    assert sdxl_engine.plan([sdxl_engine.prepare(r) for r in reqs]) == [[0, 2], [1, 3]]
    mixed = run(sdxl_engine, *reqs)
    for req, got in zip(reqs, mixed):
        [alone] = run(sdxl_engine, req)
        assert np.abs(pixels(got.images[0]) - pixels(alone.images[0])).max() <= 1, req.model
    # the negative prompt is used (not dropped for zeros): the same request without it draws otherwise
    [plain] = run(sdxl_engine, ImageRequest(PROMPT, model="xlte0", seed=3))
    assert np.abs(pixels(plain.images[0]) - pixels(mixed[0].images[0])).mean() > 1


def test_sdxl_sizes_are_multiples_of_the_models_and_inside_the_limits(sdxl_args, sdxl_engine):
    [drawn] = run(sdxl_engine, ImageRequest(PROMPT, model="xl0", seed=1, steps=1, width=48, height=96))
    assert drawn.images[0].size == (48, 96)
    for kwargs, field in (({"width": 40}, "width"), ({"height": 144}, "height"), ({"width": 16}, "width")):
        with pytest.raises(RequestError, match="multiple of 16 in 32..128") as err:
            sdxl_engine.prepare(ImageRequest(PROMPT, **kwargs))
        assert err.value.field == field
    with pytest.raises(ValueError, match=r"defaults.size 40 px: .* multiples of 16 px.*1024"):
        Engine.from_args(sdxl_args(**{"defaults.size": 40}))


def test_an_sd_adapter_is_refused_by_an_sdxl_replica_naming_both_bases(sdxl_args, tiny_adapters, tiny_pipe_dir):
    from serving.app import error_result
    from training.adapter import AdapterError, base_model_id

    engine = Engine.from_args(sdxl_args(**{"adapters.sd": str(tiny_adapters["ad0"])}))
    with pytest.raises(AdapterError) as err:
        engine.prepare(ImageRequest(PROMPT, model="sd"))
    assert base_model_id(str(tiny_pipe_dir)) in str(err.value), err.value
    assert error_result(err.value)["error"]["status"] == 422
    assert run(engine, ImageRequest(PROMPT, model="xlte1", seed=1, steps=1))  # the replica keeps serving
