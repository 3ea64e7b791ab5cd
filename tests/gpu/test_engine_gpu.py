"""The engine's mixed-adapter pass on CUDA in fp16 and bf16: each image within 1/255 of its single-adapter run.

Runs wherever CUDA exists (``gpu`` marker; tests/conftest.py skips it elsewhere). Imports neither ray nor mlflow
(the GPU machine has neither): ``tests/serving/test_fast_paths.py`` runs ``mixed_batch_error`` on CPU with both
imports blocked, so this file cannot rot where CI has no GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
PROMPT = "a red circle on a sks background"
MODELS = ["ad0", "ad1", "base", "ad2", "ad0", "ad3", "base", "ad1"]


def mixed_batch_error(device: str, dtype: str, tmp: str, lora_batching: str = "batched", steps: int = 10) -> int:
    """Draw ``MODELS`` as one mixed pass on the shipped toy model, then each alone; returns the largest per-channel
    difference (0-255) between an image of the pass and its single-adapter run.

    Raises:
        AssertionError: the pass was not one mixed pass, or the adapters do not change the images (then the
            comparison could not fail).
    """
    import torch

    from serving.config import ServeArgs
    from serving.engine import Engine, ImageRequest
    from training.configuration import validate_values
    from training.families import load_pipeline
    from training.toy_world.adapters import random_adapter

    base = REPO / "models" / "toy-sd"
    pipe = load_pipeline(base, device="cpu", dtype=torch.float32)
    adapters = {
        f"ad{i}": str(random_adapter(pipe, base, Path(tmp) / f"ad{i}", seed=i, rank=8, std=0.05)) for i in range(4)
    }
    values = {
        "base_model": str(base), "device": device, "dtype": dtype, "adapters": adapters, "adapter_roots": [tmp],
        "champion": {"model": None}, "default_model": "base", "adapter_cache_dir": str(Path(tmp) / "cache"),
        "defaults": {"steps": steps, "guidance": 4.0, "size": 64}, "limits": {"max_n": 1}, "warmup": False,
        "speed": {"lora_batching": lora_batching}, "api_key_env": "LORAFLEET_GPU_TEST_UNSET",
    }  # fmt: skip
    engine = Engine.from_args(validate_values(ServeArgs, values))
    reqs = [ImageRequest(PROMPT, model=m, seed=100 + i) for i, m in enumerate(MODELS)]
    mixed = engine.generate([engine.prepare(r) for r in reqs])
    assert len({r.pass_id for r in mixed}) == 1 and engine.lora.passes["mixed"] == 1
    worst, alone = 0, {}
    for req, got in zip(reqs, mixed):
        [one] = engine.generate([engine.prepare(req)])
        a, b = (np.asarray(r.images[0], dtype=np.int16) for r in (got, one))
        worst = max(worst, int(np.abs(a - b).max()))
        alone[req.model] = b
    differ = [np.abs(alone["base"] - alone[m]).mean() for m in ("ad0", "ad1", "ad2", "ad3")]
    assert min(differ) > 0.5, f"the adapters barely change the images ({differ}): the comparison proves nothing"
    return worst


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("lora_batching", ["batched", "peft"])
def test_mixed_pass_matches_single_adapter_runs_on_cuda(dtype, lora_batching, tmp_path):
    worst = mixed_batch_error("cuda", dtype, str(tmp_path), lora_batching)
    print(f"{dtype} {lora_batching}: largest difference {worst}/255")
    assert worst <= 1
