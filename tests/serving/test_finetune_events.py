"""A running job's events: live per-epoch progress from the search's progress.jsonl (written here by the real
writer, ``tuning.tune.TrialProgress``, driven with stand-in Tune trials), the caption stage's captions, stable ids
and bounds; and the create request's captioning and concept fields over HTTP (the official openai client)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from serving.finetune import queue as queue_module
from serving.finetune.queue import JobQueue
from tests.serving import test_finetune as base
from tests.serving.test_finetune import KEY, make_job, write_summary
from tuning.progress import PROGRESS, ProgressLog, read_progress

setup, http = base.setup, base.http  # the fixtures: a job store + queue on a fake cluster; the app over HTTP


def search_dir(store, job_id: str) -> Path:
    folder = store.folder(job_id) / "runs" / job_id / "search"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def running_job(s):
    job = make_job(s.store, s.queue, "acme")
    s.queue.tick()
    s.cluster.jobs[job.id] = "RUNNING"
    s.queue.tick()
    return job


class Trial(SimpleNamespace):
    """What TrialProgress reads of a Tune trial: its id and config."""


def trial_progress(tune_cfg, folder: Path):
    from tuning.tune import TrialProgress

    return TrialProgress(tune_cfg, [], 2, folder / PROGRESS)


@pytest.fixture
def tune_cfg(repo):
    from training.configuration import load_config
    from tuning.config import TuneConfig

    return load_config(TuneConfig, str(repo / "configs" / "tune.yaml"), ["trial.train.epochs=3"])


def test_each_epoch_becomes_one_event_while_the_search_runs(setup, tune_cfg):
    s = setup
    job = running_job(s)
    progress = trial_progress(tune_cfg, search_dir(s.store, job.id))
    t = Trial(trial_id="a1b2c3d4", config={"lora.rank": 8}, local_path=None)
    progress.on_trial_start(0, [], t)
    progress.on_trial_result(0, [], t, {"epoch": 1, "loss": 0.2, "val_loss": 0.3, "time_total_s": 5.0})
    s.queue.tick()
    record = s.store.load(job.id)
    [start, epoch1] = record.events[-2:]
    assert start.message.startswith("trial a1b2c3d4 started (1 of 2)") and '"lora.rank": 8' in start.message
    assert epoch1.message == "trial a1b2c3d4: epoch 1/3, train loss 0.2, val_loss 0.3" and epoch1.type == "metrics"
    assert epoch1.data == {"trial_id": "a1b2c3d4", "epoch": 1, "total_epochs": 3, "train_loss": 0.2, "val_loss": 0.3,
                           "time_total_s": 5.0}  # fmt: skip
    s.queue.tick()  # nothing new: nothing added
    assert len(s.store.load(job.id).events) == len(record.events)

    for epoch in (2, 3):
        progress.on_trial_result(0, [], t, {"epoch": epoch, "loss": 0.1, "val_loss": 0.25, "time_total_s": 9.0})
    progress.on_trial_complete(0, [], t)
    with open(search_dir(s.store, job.id) / PROGRESS, "a") as f:
        f.write('{"event": "epoch", "trial_id": "half')  # a line being written: left for the next tick
    restarted = JobQueue(s.store, s.cluster, None, per_tenant=1, clock=s.clock)  # the offset is in job.json
    restarted.tick()
    events = s.store.load(job.id).events
    assert [e.message for e in events[-3:]] == [
        "trial a1b2c3d4: epoch 2/3, train loss 0.1, val_loss 0.25",
        "trial a1b2c3d4: epoch 3/3, train loss 0.1, val_loss 0.25",
        "trial a1b2c3d4: completed after 3/3 epoch(s), val_loss 0.25",
    ]
    assert len({e.id for e in events}) == len(events)

    # when the search ends, results.json's event for the same trial is the one already shown (same key)
    trial = {"trial_id": "a1b2c3d4", "status": "completed", "epochs": 3, "planned_epochs": 3, "metric": 0.25}
    (search_dir(s.store, job.id) / "results.json").write_text(json.dumps([trial]))
    s.queue.tick()
    assert len(s.store.load(job.id).events) == len(events)


def test_epoch_events_are_bounded_and_a_failed_trial_says_so(setup, tune_cfg, monkeypatch):
    s = setup
    monkeypatch.setattr(queue_module, "MAX_EPOCH_EVENTS", 2)
    job = running_job(s)
    progress = trial_progress(tune_cfg, search_dir(s.store, job.id))
    t = Trial(trial_id="t1", config={}, local_path=None)
    for epoch in range(1, 5):
        progress.on_trial_result(0, [], t, {"epoch": epoch, "loss": 0.1})
    progress.on_trial_error(0, [], t)
    s.queue.tick()
    messages = [e.message for e in s.store.load(job.id).events]
    assert sum("epoch" in m and m.startswith("trial t1: epoch") for m in messages) == 2
    assert any(m.startswith("more than 2 epochs") for m in messages)
    assert messages[-1].startswith("trial t1 failed")


def test_read_progress_takes_whole_lines_and_starts_over_on_a_new_file(tmp_path):
    path = tmp_path / PROGRESS
    assert read_progress(path, 0) == ([], 0)
    log = ProgressLog(path, clock=lambda: 1.0)
    log.write({"event": "epoch", "trial_id": "a", "epoch": 1, "loss": float("nan")})
    lines, offset = read_progress(path, 0)
    assert lines == [{"event": "epoch", "trial_id": "a", "epoch": 1, "loss": None, "time": 1.0}]
    with open(path, "a") as f:
        f.write('not json\n{"event": ')
    assert read_progress(path, offset) == ([], offset + len("not json\n"))
    path.write_text('{"event": "start", "trial_id": "b"}\n')  # a search started over: a shorter file
    assert [line["trial_id"] for line in read_progress(path, offset)[0]] == ["b"]


def test_the_caption_stage_shows_each_caption_once(setup):
    s = setup
    job = running_job(s)
    rows = [{"file": f"img{i}.png", "caption": f"a red circle on a sks background {i}"} for i in range(3)]
    caption = {"status": "done", "seconds": 2.0, "captioner": "toy", "captioned": 5, "kept": 0, "captions": rows}
    write_summary(s.store, job.id, {"caption": caption}, "running")
    s.queue.tick()
    s.queue.tick()
    events = s.store.load(job.id).events
    messages = [e.message for e in events]
    assert "stage caption: done (2.0 s)" in messages
    assert [m for m in messages if m.startswith("caption ")] == [f"caption img{i}.png: {r['caption']}"
                                                                for i, r in enumerate(rows)]  # fmt: skip
    assert messages[-1] == "and 2 more image(s) captioned (not shown)"
    stage = next(e for e in events if e.message.startswith("stage caption"))
    assert stage.data == {"seconds": 2.0, "captioner": "toy", "captioned": 5, "kept": 0}


# ---- the create request over HTTP ----------------------------------------------------------------------------------
def images_only_tar(toy_dataset: Path) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for p in sorted(toy_dataset.glob("*.png")):
            tar.add(p, arcname=f"photos/{p.name}")
    return buf.getvalue()


def test_an_upload_without_captions_is_captioned_by_its_job_and_a_concept_reaches_the_evaluation(http, toy_dataset):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http.client, max_retries=0)
    file = client.files.create(file=("photos.tar.gz", images_only_tar(toy_dataset)), purpose="fine-tune")
    assert file.model_extra["dataset"]["captions"] is False and file.model_extra["dataset"]["layout"] == "images"
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(model="base", training_file=file.id)
    assert refused.value.body["param"] == "trigger" and "without captions" in refused.value.body["message"]

    job = client.fine_tuning.jobs.create(model="base", training_file=file.id,
                                         extra_body={"trigger": "sks", "concept": "dotted"})  # fmt: skip
    record = http.ft.store.load(job.id)
    assert record.caption and record.concept == "dotted" and "caption.enabled=true" in record.overrides
    [evaluation] = [o for o in record.overrides if o.startswith("evaluation.overrides=")]
    assert 'auto_suite.concept="dotted"' in json.loads(evaluation.split("=", 1)[1])
    assert "captions them first" in record.events[0].message

    for bad in (5, " dotted", ""):
        with pytest.raises(openai.BadRequestError) as refused:
            client.fine_tuning.jobs.create(model="base", training_file=file.id,
                                           extra_body={"trigger": "sks", "concept": bad})  # fmt: skip
        assert refused.value.body["param"] == "concept"
