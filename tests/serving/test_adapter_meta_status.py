"""Case 6 through the Serve app's error mapping (serving.app.error_result, the one place statuses are chosen): no
adapter-metadata problem is ever a 500 — an extra key is served, a wrong type / broken JSON / missing weights is a
422 naming the problem; the replica keeps serving the others."""

from __future__ import annotations

import json
import shutil

import pytest

from serving.app import error_result
from serving.engine import Engine, ImageRequest
from training.adapter import META_NAME

PROMPT = "a red circle on a sks background"


def broken(folder, case: str) -> None:
    meta = json.loads((folder / META_NAME).read_text())
    if case == "extra_key":
        meta["license"] = "CC-BY-4.0"
    elif case == "wrong_type":
        meta["alpha"] = "eight"
    elif case == "invalid_json":
        (folder / META_NAME).write_text(json.dumps(meta)[:-3])
        return
    elif case == "missing_weights":
        (folder / meta["weights"]).unlink()
    (folder / META_NAME).write_text(json.dumps(meta))


def status_of(engine: Engine, model: str) -> tuple[int, str]:
    try:
        prepared = engine.prepare(ImageRequest(PROMPT, model=model, seed=1, steps=2))
        [out] = engine.generate([prepared])
    except Exception as exc:  # noqa: BLE001 - what the replica would answer
        out = exc
    if isinstance(out, Exception):
        error = error_result(out)["error"]
        return error["status"], error["message"]
    return 200, out.model


@pytest.fixture
def engine_with_cases(serve_args, tiny_adapters, tmp_path):
    cases = ("extra_key", "wrong_type", "invalid_json", "missing_weights")
    overrides = {}
    for case in cases:
        shutil.copytree(tiny_adapters["ad0"], tmp_path / case)
        broken(tmp_path / case, case)
        overrides[f"adapters.{case}"] = str(tmp_path / case)
    return Engine.from_args(serve_args(**overrides))


def test_no_metadata_problem_is_a_500(engine_with_cases):
    statuses = {case: status_of(engine_with_cases, case) for case in
                ("extra_key", "wrong_type", "invalid_json", "missing_weights")}  # fmt: skip
    assert statuses["extra_key"] == (200, "extra_key"), statuses
    expected = {"wrong_type": "key 'alpha'", "invalid_json": "is not valid JSON", "missing_weights": "is missing"}
    for case, words in expected.items():
        status, message = statuses[case]
        assert status == 422 and words in message, (case, status, message)
    assert status_of(engine_with_cases, "ad1")[0] == 200  # the others are unharmed
