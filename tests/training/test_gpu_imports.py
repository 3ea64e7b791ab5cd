"""The GPU machine has torch/diffusers/peft/transformers but neither Ray nor MLflow: the gpu tests must not import
them (directly or through training.*). This test lives outside tests/gpu/ so that it runs everywhere: conftest
skips that folder without CUDA (its name is a keyword)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow  # a fresh interpreter imports torch + diffusers
def test_gpu_tests_import_neither_ray_nor_mlflow():
    code = (
        "import sys, tests.gpu.test_training_cuda\n"
        "print(','.join(sorted(m for m in ('ray', 'mlflow') if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1:] in ([], [""]), out.stdout
