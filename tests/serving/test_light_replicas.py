"""Only the Generator replicas need torch: the ingress (``Api``), the one-replica stores (``ImageUrls``, ``Feedback``),
the batch runner (``BatchWorker``) and the ``lorafleet`` CLIs that read MLflow must not import torch, diffusers,
transformers or peft — about 400 MB of memory per replica and seconds of start-up each. Checked in a fresh interpreter,
also along the error paths that import lazily (a registry error classified on the registry thread, an adapter
refused). ``tests/serving/test_app.py::test_only_the_generator_replicas_load_torch`` asks live replicas the same."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

HEAVY = ("torch", "diffusers", "transformers", "peft")

CODE = f"""
import sys
import serving.http, serving.shared_stores, serving.batches.deployment, serving.canary_cli, cluster.generations
from evaluation.registry import NotInRegistry, RegistryError
from serving.registry_watch import reached_registry
from training.adapter_meta import AdapterError, verify_adapter
from serving.image_request import ImageRequest

for exc in (NotInRegistry("m"), RegistryError("x"), AdapterError("a"), OSError("down"), LookupError("k")):
    reached_registry(exc)
try:
    verify_adapter(sys.argv[1])  # not an adapter folder: the AdapterError path
except AdapterError:
    pass
ImageRequest("a prompt", model="champion")
print(",".join(m for m in {HEAVY!r} if m in sys.modules))
"""


def test_the_ingress_stores_batch_runner_and_clis_import_no_torch(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", CODE, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1:] in ([], [""]), f"imported: {out.stdout}\n{out.stderr[-2000:]}"
