"""Hostile inputs to the fine-tuning jobs API (issue 21): request fields a YAML override or a caption would misread,
a progress line longer than one read, garbage in a job's progress and pipeline files, and a cancel that races the
create. The fake cluster and fixtures are tests/serving/test_finetune.py's."""

from __future__ import annotations

import json

import pytest

from serving.finetune.jobs import CreateJobBody, Hyperparameters, pipeline_overrides
from tests.serving import test_finetune as base
from tests.serving.test_finetune import KEY, make_job, write_summary
from tuning.progress import MAX_READ, read_progress

setup, http = base.setup, base.http
MINIMAL = {"model": "base", "training_file": "file-" + "0" * 24}


# ---- the request ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trigger", ["yes", "off", "123", "null", "~", "[a]", "a: b", "sks, {x}", "1e3"])
def test_a_trigger_reaches_the_pipeline_as_the_same_text(setup, trigger):
    """The trigger is a YAML value in a dotted override: unquoted, `yes` became True, `null` dropped it."""
    from cluster.config import PipelineConfig
    from training.configuration import apply_overrides

    s = setup
    record = make_job(s.store, s.queue, "acme")
    record.trigger = trigger
    overrides = pipeline_overrides(record, s.store.folder(record.id) / "data", None, [], "configs/tune.yaml")
    values, problems = apply_overrides({}, [o for o in overrides if o.startswith("trigger=")], PipelineConfig)
    assert problems == [] and values == {"trigger": trigger}


@pytest.mark.parametrize("field", ["trigger", "concept"])
@pytest.mark.parametrize("value", ["a\nb", "a\n", "a\tb", "a\x00b", "a\x1bb", "  ", "sks\u202e", "a\rb"])
def test_a_trigger_or_concept_with_control_characters_or_only_spaces_is_refused(field, value):
    """They go into every caption and prompt: a line break or an escape code there is never a word."""
    with pytest.raises(ValueError, match=field):
        CreateJobBody.model_validate({**MINIMAL, field: value})


def test_a_trigger_with_inner_spaces_and_unicode_letters_is_accepted():
    assert CreateJobBody.model_validate({**MINIMAL, "trigger": "ohwx café"}).trigger == "ohwx café"


@pytest.mark.parametrize(
    "metadata", [{"k": "v" * 513}, {"k" * 65: "v"}, {f"k{i}": "v" for i in range(17)}], ids=["value", "key", "count"]
)
def test_metadata_is_bounded_as_openai_bounds_it(metadata):
    """OpenAI: at most 16 pairs, keys up to 64 characters, values up to 512. Unbounded, one request stored (and every
    list of jobs returned) megabytes."""
    with pytest.raises(ValueError, match="metadata"):
        CreateJobBody.model_validate({**MINIMAL, "metadata": metadata})
    CreateJobBody.model_validate({**MINIMAL, "metadata": {"k" * 64: "v" * 512}})


@pytest.mark.parametrize("key", ["n_epochs", "batch_size", "rank"])
def test_a_boolean_hyperparameter_is_refused_as_the_seed_is(key):
    """`n_epochs: true` was read as 1 (seed: true is refused)."""
    with pytest.raises(ValueError, match=key):
        Hyperparameters.model_validate({key: True})


# ---- progress and pipeline files --------------------------------------------------------------------------------
def test_a_progress_line_longer_than_one_read_is_skipped_not_a_stall(tmp_path):
    """A line over MAX_READ bytes: the reader found no newline in its chunk and kept its offset, forever."""
    path = tmp_path / "progress.jsonl"
    good = {"event": "epoch", "trial_id": "a", "epoch": 1}
    path.write_bytes(b'{"x": "' + b"x" * (MAX_READ + 10) + b'"}\n' + json.dumps(good).encode() + b"\n")
    offset, seen = 0, []
    for _ in range(4):
        lines, offset = read_progress(path, offset)
        seen += lines
    assert seen == [good] and offset == path.stat().st_size


def test_garbage_progress_lines_neither_stop_the_poller_nor_other_jobs(setup):
    """A `time` that is no number (text, a list, NaN, 1e400) raised in the poller's event, so no job was refreshed
    again, other tenants' jobs included."""
    s = setup
    bad, other = make_job(s.store, s.queue, "a"), make_job(s.store, s.queue, "b")
    s.queue.tick()
    s.cluster.jobs[bad.id] = s.cluster.jobs[other.id] = "RUNNING"
    search = s.store.folder(bad.id) / "runs" / bad.id / "search"
    search.mkdir(parents=True)
    lines = [
        {"event": "epoch", "trial_id": "t", "epoch": 1, "time": "soon"},
        {"event": "epoch", "trial_id": "t", "epoch": 2, "time": [1]},
        {"event": "start", "trial_id": ["x"], "time": 1e400, "params": "p", "n": None},
        {"event": "end", "trial_id": "t", "status": {"s": 1}, "metric": None, "time": float("nan")},
        {"event": "epoch", "trial_id": "t", "epoch": 3, "loss": "low", "val_loss": True, "time": -5},
        {"event": "epoch", "trial_id": "t", "epoch": 4, "loss": 1e400},
    ]
    raw = "\n".join(json.dumps(line) for line in lines) + "\n" + "not json\n[1, 2]\n\x00\xff\n"
    (search / "progress.jsonl").write_text(raw)
    s.queue.tick()
    assert s.store.load(other.id).status == "running"  # the other tenant's job was refreshed
    record = s.store.load(bad.id)
    assert record.status == "running" and sum("epoch" in (e.data or {}) for e in record.events) == 4
    assert all(isinstance(e.created_at, int) and e.created_at >= 0 for e in record.events)


def test_a_malformed_pipeline_summary_fails_no_poll(setup):
    """pipeline.json with stages that are not objects raised AttributeError in every tick."""
    s = setup
    bad, other = make_job(s.store, s.queue, "a"), make_job(s.store, s.queue, "b")
    s.queue.tick()
    s.cluster.jobs[bad.id] = s.cluster.jobs[other.id] = "RUNNING"
    write_summary(s.store, bad.id, {"validate": "done", "caption": {"captions": [{"file": 1}], "captioned": 9}})
    s.queue.tick()
    assert s.store.load(bad.id).status == s.store.load(other.id).status == "running"
    write_summary(s.store, bad.id, ["not", "a", "dict"])  # type: ignore[arg-type]
    s.cluster.jobs[bad.id] = "FAILED"
    s.queue.tick()
    assert s.store.load(bad.id).status == "failed"


# ---- races -------------------------------------------------------------------------------------------------------
def test_a_cancel_while_the_dataset_is_held_is_not_undone(http, toy_dataset, monkeypatch):
    """The job is listed (validating_files) while its dataset is held; a cancel then was overwritten by the
    create's enqueue (status queued), and the cancelled job ran."""
    from tests.serving.test_files import tar_bytes

    c, ft = http.client, http.ft
    file = c.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("t.tar.gz", tar_bytes(toy_dataset))})
    hold = ft.store.hold_dataset

    def hold_then_cancel(source, job_id, name="data"):
        out = hold(source, job_id, name)
        [listed] = c.get("/v1/fine_tuning/jobs").json()["data"]
        assert listed["status"] == "validating_files"
        assert c.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] == "cancelled"
        return out

    monkeypatch.setattr(ft.store, "hold_dataset", hold_then_cancel)
    r = c.post("/v1/fine_tuning/jobs", json={**MINIMAL, "training_file": file.json()["id"], "trigger": "sks"})
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    ft.queue.tick()
    assert http.cluster.submitted == [] and ft.store.load(r.json()["id"]).status == "cancelled"


def test_hostile_request_bodies_are_400s_naming_the_field(http):
    c = http.client
    for body, param in [
        ({**MINIMAL, "model": "../../etc/passwd"}, "model"),
        ({**MINIMAL, "suffix": "../x"}, "suffix"),
        ({**MINIMAL, "suffix": "a" * 65}, "suffix"),
        ({**MINIMAL, "hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ({**MINIMAL, "hyperparameters": {"learning_rate_multiplier": -1}}, "hyperparameters.learning_rate_multiplier"),
        ({**MINIMAL, "hyperparameters": "auto"}, "hyperparameters"),
        ({**MINIMAL, "trigger": "a\nb"}, "trigger"),
    ]:
        r = c.post("/v1/fine_tuning/jobs", json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code in (400, 404), (body, r.status_code, r.text)
        assert r.json()["error"]["param"] == param or r.status_code == 404, (body, r.text)


@pytest.mark.parametrize("trigger", ["yes", "123", "null"])
def test_the_pipeline_hands_its_trigger_on_as_the_same_text(repo, tmp_path, monkeypatch, trigger):
    """The pipeline passed its trigger to the trials and the evaluation unquoted too (`trial.data.trigger=yes`)."""
    from cluster.config import PipelineConfig
    from cluster.pipeline import Pipeline
    from training.configuration import load_config

    monkeypatch.setenv("LORAFLEET_WORKDIR", str(tmp_path))
    cfg = load_config(PipelineConfig, repo / "configs" / "pipeline.yaml", ["name=p", "dataset=gs://bucket/toy"])
    pipeline = Pipeline(cfg)
    pipeline.derived["trigger"] = trigger
    tcfg = pipeline.tune_config()
    assert tcfg.trial.data.trigger == trigger and f"trigger={json.dumps(trigger)}" in tcfg.evaluation.overrides


# ---- uploads ----------------------------------------------------------------------------------------------------
def test_an_sdk_upload_of_a_folder_with_a_file_name_that_is_not_utf8_is_a_400_not_a_500(http, toy_dataset, tmp_path):
    """Linux file names are bytes: the SDK's tar carries b'\\xff' in a PAX header, tarfile reads it back as a
    surrogate, and the refusal that named the entry could not be encoded as JSON (UnicodeEncodeError: a 500)."""
    import os
    import shutil

    from serving.client_files import upload_body

    folder = tmp_path / "odd"
    shutil.copytree(toy_dataset, folder)
    shutil.copy(next(folder.glob("*.png")), os.path.join(os.fsencode(folder), b"caf\xe9.png"))
    os.mkfifo(folder / "fifo.png")  # left out by the SDK, as are links
    os.symlink("/etc/passwd", folder / "passwd.txt")
    body = upload_body(folder, "fine-tune")
    r = http.client.post("/v1/files", content=b"".join(body.chunks()), headers=body.headers)
    assert r.status_code == 400, r.text
    assert "not UTF-8" in r.json()["error"]["message"] and "caf\\xe9.png" in r.json()["error"]["message"]
