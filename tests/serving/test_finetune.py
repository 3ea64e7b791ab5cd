"""The fine-tuning jobs API (serving/finetune): the queue and its state machine against a fake cluster, the dotted
overrides a request becomes (validated by the real TuneConfig), and the routes driven by the official openai client
in process (as tests/serving/test_files.py does). The Ray side, end to end, is tests/cluster/test_finetune_e2e.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from serving.finetune.jobs import CreateJobBody, Hyperparameters, JobRecord, JobStore, search_overrides
from serving.finetune.queue import JobQueue
from serving.tenants import NotFound

PASSED = {"validate": {"status": "done", "images": 8, "seconds": 1.0}, "tune": {"status": "done", "seconds": 9.0,
          "best": {"value": 0.25, "epochs": 4}}, "evaluate": {"status": "done", "passed": True},
          "gate": {"status": "done"}, "register": {"status": "done", "model": "acme--x", "version": "3"}}  # fmt: skip


class FakeCluster:
    """A Submitter: Ray jobs as a dict of statuses the test moves along."""

    def __init__(self, capacity: int = 2):
        self.jobs: dict[str, str] = {}
        self.submitted: list[str] = []
        self.stopped: list[str] = []
        self.refuse: dict[str, str] = {}
        self.cap = capacity
        self.most_active = 0

    def submit(self, job_id: str, overrides: list[str]) -> str:
        if job_id in self.refuse:
            raise RuntimeError(self.refuse[job_id])
        assert job_id not in self.jobs, f"{job_id} submitted twice"
        self.jobs[job_id] = "PENDING"
        self.submitted.append(job_id)
        self.most_active = max(self.most_active, sum(s in ("PENDING", "RUNNING") for s in self.jobs.values()))
        return job_id

    def status(self, submission_id: str) -> str:
        return self.jobs[submission_id]

    def stop(self, submission_id: str) -> None:
        self.stopped.append(submission_id)

    def capacity(self) -> int:
        return self.cap


class Clock:
    def __init__(self):
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        self.t += 1
        return self.t


def make_job(store: JobStore, queue: JobQueue, tenant: str) -> JobRecord:
    record = JobRecord(id=store.new_id(), tenant=tenant, created_at=int(store.clock()), order=store.clock(),
                       model="base",
                       base_model="models/toy-sd", training_file="file-" + "0" * 24,
                       hyperparameters=Hyperparameters(), seed=0, fine_tuned_model=f"{tenant}--x",
                       overrides=[])  # fmt: skip
    store.save(record)
    queue.enqueue(record)
    return record


def write_summary(store: JobStore, job_id: str, stages: dict, status: str = "finished") -> None:
    folder = store.folder(job_id) / "runs" / job_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pipeline.json").write_text(json.dumps({"name": job_id, "stages": stages, "status": status}))


@pytest.fixture
def setup(tmp_path):
    clock = Clock()
    store = JobStore(tmp_path / "jobs", clock=clock)
    cluster = FakeCluster(capacity=2)
    return SimpleNamespace(store=store, cluster=cluster, clock=clock,
                           queue=JobQueue(store, cluster, None, per_tenant=1, clock=clock))  # fmt: skip


def status(s, job: JobRecord) -> str:
    return s.store.load(job.id).status


def test_queued_jobs_start_in_order_within_the_bound_from_cluster_capacity(setup):
    s = setup
    jobs = [make_job(s.store, s.queue, f"t{i}") for i in range(5)]
    s.queue.tick()
    assert s.cluster.submitted == [jobs[0].id, jobs[1].id]  # capacity 2, oldest first
    assert [status(s, j) for j in jobs] == ["queued"] * 5  # PENDING in Ray is still queued
    s.cluster.jobs[jobs[0].id] = "RUNNING"
    s.queue.tick()
    assert status(s, jobs[0]) == "running" and s.cluster.submitted == [jobs[0].id, jobs[1].id]
    s.cluster.jobs[jobs[1].id] = "FAILED"
    s.queue.tick()
    assert s.cluster.submitted == [j.id for j in jobs[:3]]
    for _ in jobs:  # each tick: everything submitted so far ends, the next ones start
        s.cluster.jobs = dict.fromkeys(s.cluster.jobs, "SUCCEEDED")
        s.queue.tick()
    assert s.cluster.submitted == [j.id for j in jobs] and s.cluster.most_active == 2


def test_the_per_tenant_limit_lets_other_tenants_pass_and_max_running_overrides_capacity(setup):
    s = setup
    s.queue.max_running = 3
    a1, a2, a3, b1 = (make_job(s.store, s.queue, t) for t in ("a", "a", "a", "b"))
    s.queue.tick()
    assert s.cluster.submitted == [a1.id, b1.id]  # a2 waits for a1 although a slot is free
    s.cluster.jobs[a1.id] = "SUCCEEDED"
    s.queue.tick()
    assert s.cluster.submitted == [a1.id, b1.id, a2.id]
    assert status(s, a1) == "failed"  # SUCCEEDED without a registered model: not a success
    assert "before the pipeline recorded a stage" in s.store.load(a1.id).error["message"]
    assert status(s, a3) == "queued"


def test_a_passing_pipeline_succeeds_with_its_registered_name_events_and_checkpoint(setup):
    s = setup
    job = make_job(s.store, s.queue, "acme")
    s.queue.tick()
    s.cluster.jobs[job.id] = "RUNNING"
    write_summary(s.store, job.id, {"validate": PASSED["validate"], "tune": {"status": "running"}}, "running")
    s.queue.tick()
    s.queue.tick()  # nothing new: no event twice
    record = s.store.load(job.id)
    assert record.status == "running" and record.to_openai()["fine_tuned_model"] is None
    messages = [e.message for e in record.events]
    assert messages[-3:] == ["the pipeline is running", "stage validate: done (1.0 s)", "stage tune: running"]
    assert len({e.id for e in record.events}) == len(record.events) and messages.count("stage tune: running") == 1
    write_summary(s.store, job.id, PASSED)
    trials = [
        {
            "trial_id": "a1",
            "status": "completed",
            "epochs": 4,
            "planned_epochs": 4,
            "metric": 0.25,
            "params": {"lora.rank": 16},
        },
        {"trial_id": "b2", "status": "failed", "epochs": 0, "error": "OOM"},
    ]
    (s.store.folder(job.id) / "runs" / job.id / "search").mkdir()
    (s.store.folder(job.id) / "runs" / job.id / "search" / "results.json").write_text(json.dumps(trials))
    s.cluster.jobs[job.id] = "SUCCEEDED"
    s.queue.tick()
    record = s.store.load(job.id)
    trial_events = [e for e in record.events if e.message.startswith("trial ")]
    assert [(e.level, e.data["epochs"]) for e in trial_events] == [("info", 4), ("error", 0)]
    assert "metric 0.25" in trial_events[0].message and "OOM" in trial_events[1].message
    job_object = record.to_openai()
    assert job_object["status"] == "succeeded" and job_object["fine_tuned_model"] == "acme--x"
    assert job_object["finished_at"] and job_object["error"] is None and job_object["object"] == "fine_tuning.job"
    [ckpt] = record.checkpoints
    assert ckpt["fine_tuned_model_checkpoint"] == "acme--x/3" and ckpt["metrics"]["valid_loss"] == 0.25
    assert ckpt["step_number"] == 4
    validate = next(e for e in record.events if e.message.startswith("stage validate"))
    assert validate.type == "metrics" and validate.data["images"] == 8
    assert "served now" in record.events[-1].message


def test_a_gate_refusal_fails_the_job_with_the_gates_reasons(setup):
    s = setup
    job = make_job(s.store, s.queue, "acme")
    s.queue.tick()
    reasons = "no adapter passed the gate — candidate 1 (trial 0): concept_gain 0.02 < 0.11"
    stages = {
        **{k: PASSED[k] for k in ("validate", "tune", "evaluate")},
        "gate": {"status": "failed", "error": reasons},
    }
    write_summary(s.store, job.id, stages, "failed")
    s.cluster.jobs[job.id] = "FAILED"
    s.queue.tick()
    record = s.store.load(job.id)
    assert record.status == "failed" and record.error["code"] == "gate_failed"
    assert reasons in record.error["message"] and record.to_openai()["fine_tuned_model"] is None
    assert any(e.level == "error" and reasons in e.message for e in record.events)


def test_a_gate_refusal_says_what_an_api_client_can_do_and_no_server_paths(setup):
    s = setup
    job = make_job(s.store, s.queue, "acme")
    s.queue.tick()
    folder = s.store.folder(job.id)
    checks = "gate FAILED: concept_gain >= 0.11: 0.0008846, short by 0.1091; latency_p95_s <= 2: 3.17, over by 1.17"
    operator = (f"no adapter passed the gate — candidate 1 (trial t1): {checks}; the champion is unchanged. Report: "
                f"{folder}/runs/{job.id}/search/eval/x/report.html. A rerun with evaluation.candidates=2 evaluates the "
                f"next-best trial; `lorafleet promote acme--x --trial ID --epoch N` one you picked")  # fmt: skip
    evaluate = {**PASSED["evaluate"], "passed": False, "candidates": [{"trial_id": "t1", "passed": False,
                                                                        "gate": checks}]}  # fmt: skip
    stages = {"validate": PASSED["validate"], "tune": PASSED["tune"], "evaluate": evaluate,
              "gate": {"status": "failed", "error": operator}}  # fmt: skip
    write_summary(s.store, job.id, stages, "failed")
    s.cluster.jobs[job.id] = "FAILED"
    s.queue.tick()
    message = s.store.load(job.id).error["message"]
    assert message.startswith("gate: no adapter passed the gate — candidate 1 (trial t1): concept_gain >= 0.11: ")
    assert "latency_p95_s <= 2: 3.17, over by 1.17" in message and "n_epochs" in message
    assert "try again when the queue is shorter" in message  # a latency miss: the cluster was busy
    for operator_only in ("lorafleet promote", "evaluation.candidates", str(folder), "report.html"):
        assert operator_only not in message, operator_only


def test_a_failed_stage_names_files_relative_to_the_job_not_the_servers_folders(setup):
    s = setup
    job = make_job(s.store, s.queue, "acme")
    s.queue.tick()
    where = f"{s.store.folder(job.id)}/runs/{job.id}/search/results.csv"
    write_summary(s.store, job.id, {"validate": PASSED["validate"], "tune": {
        "status": "failed", "error": f"no trial finished with a finite val_loss; see {where}"}}, "failed")  # fmt: skip
    s.cluster.jobs[job.id] = "FAILED"
    s.queue.tick()
    error = s.store.load(job.id).error
    assert error["code"] == "pipeline_failed"
    assert error["message"] == f"tune: no trial finished with a finite val_loss; see runs/{job.id}/search/results.csv"


def test_cancel_in_every_state(setup):
    s = setup
    s.cluster.cap = 1
    running, queued = make_job(s.store, s.queue, "a"), make_job(s.store, s.queue, "b")
    s.queue.tick()
    s.cluster.jobs[running.id] = "RUNNING"
    s.queue.tick()
    # queued: never submitted
    assert s.queue.cancel(queued.id, "b").status == "cancelled"
    # running: Jobs.stop, cancelled at once, but it holds its slot until Ray says it ended
    later = make_job(s.store, s.queue, "c")
    assert s.queue.cancel(running.id, "a").status == "cancelled" and s.cluster.stopped == [running.id]
    s.queue.tick()
    assert s.cluster.submitted == [running.id]
    s.cluster.jobs[running.id] = "STOPPED"
    s.queue.tick()
    assert s.cluster.submitted == [running.id, later.id] and status(s, running) == "cancelled"
    # ended: as it was; another tenant's id: not found
    assert s.queue.cancel(running.id, "a").status == "cancelled" and s.cluster.stopped == [running.id]
    with pytest.raises(NotFound):
        s.queue.cancel(later.id, "a")


def test_a_restarted_queue_picks_up_submitted_and_queued_jobs_from_disk(setup):
    s = setup
    s.cluster.cap = 1
    first, second = make_job(s.store, s.queue, "a"), make_job(s.store, s.queue, "b")
    s.queue.tick()
    s.cluster.jobs[first.id] = "RUNNING"
    s.queue.tick()
    # the Serve app restarts: a new store and queue over the same folder; Ray kept running the job
    store = JobStore(s.store.root, clock=s.clock)
    queue = JobQueue(store, s.cluster, None, per_tenant=1, clock=s.clock)
    queue.tick()
    assert s.cluster.submitted == [first.id]  # still running: the second waits, nothing is submitted twice
    write_summary(store, first.id, PASSED)
    s.cluster.jobs[first.id] = "SUCCEEDED"
    queue.tick()
    assert store.load(first.id).status == "succeeded" and s.cluster.submitted == [first.id, second.id]


def test_a_refused_submission_fails_the_job_and_the_queue_moves_on(setup):
    s = setup
    bad, good = make_job(s.store, s.queue, "a"), make_job(s.store, s.queue, "b")
    s.cluster.refuse[bad.id] = "ConfigError: trial.train.optimizer: adamw8bit needs CUDA"
    s.queue.tick()
    record = s.store.load(bad.id)
    assert (
        record.status == "failed" and record.error["code"] == "submit_failed" and "adamw8bit" in record.error["message"]
    )
    assert s.cluster.submitted == [good.id]


# ---- what a request becomes -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tune_cfg(repo):
    from training.configuration import load_config
    from tuning.config import TuneConfig

    return load_config(TuneConfig, str(repo / "configs" / "tune.yaml"), [])


def load_tune(repo, overrides):
    from training.configuration import load_config
    from tuning.config import TuneConfig

    return load_config(TuneConfig, str(repo / "configs" / "tune.yaml"), overrides)


def test_fixed_hyperparameters_are_one_trial_with_exactly_those_values(repo, tune_cfg):
    hp = Hyperparameters(n_epochs=3, learning_rate_multiplier=2.0, batch_size=2, rank=8, optimizer="adamw")
    cfg = load_tune(repo, search_overrides(hp, tune_cfg, auto_trials=4, seed=7))
    assert cfg.search.algorithm == "grid" and cfg.search.num_samples == 1 and cfg.search.seed == 7
    assert cfg.grid == {"train.epochs": [3], "train.lr": [2.0 * tune_cfg.trial.train.lr], "lora.rank": [8],
                        "train.optimizer": ["adamw"]}  # fmt: skip
    t = cfg.trial
    assert (t.train.epochs, t.train.batch_size, t.lora.rank, t.train.seed) == (3, 2, 8, 7)


def test_auto_hyperparameters_are_searched_and_fixed_ones_leave_the_space(repo, tune_cfg):
    cfg = load_tune(repo, search_overrides(Hyperparameters(optimizer="prodigy", n_epochs=4), tune_cfg, 3, 0))
    assert cfg.search.num_samples == 3 and cfg.search.algorithm == "optuna"
    assert set(cfg.space) == {"lora.rank", "train.d_coef"}  # train.lr is only searched for adamw
    assert cfg.space["train.d_coef"].when is None and cfg.trial.train.optimizer == "prodigy"
    assert cfg.search.points_to_evaluate == []  # the known-good point is adamw: it does not fit
    everything = load_tune(repo, search_overrides(Hyperparameters(), tune_cfg, 5, 0))
    assert set(everything.space) == set(tune_cfg.space) and everything.search.num_samples == 5
    assert everything.search.points_to_evaluate == tune_cfg.search.points_to_evaluate


# ---- HTTP, with the official openai client ----------------------------------------------------------------------
KEY_ENV, KEY = "LORAFLEET_TEST_FT_KEY", "ft-test-key"


@pytest.fixture
def http(monkeypatch, tmp_path):
    from fastapi.testclient import TestClient
    from ray import serve

    from serving.config import ServeArgs
    from serving.http import Api, web
    from tests.serving.test_http import FakeGenerator, Remote

    monkeypatch.setenv(KEY_ENV, KEY)
    args = ServeArgs(champion={"model": None}, default_model="base", api_key_env=KEY_ENV,
                     files={"root": str(tmp_path / "files")}, finetune={"poll_s": 3600})  # fmt: skip
    api = Api.func_or_class.__mro__[1](Remote(FakeGenerator()), args, Remote(SimpleNamespace()))
    api.finetune.stop()
    cluster = FakeCluster()
    api.finetune._submitter = cluster
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=api))
    with TestClient(web, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield SimpleNamespace(client=client, api=api, cluster=cluster, ft=api.finetune)


def test_the_openai_client_creates_follows_and_cancels_jobs(http, toy_dataset):
    import asyncio
    import io

    openai = pytest.importorskip("openai")
    from tests.serving.test_files import tar_bytes

    client = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http.client, max_retries=0)
    file = client.files.create(file=("toy.tar.gz", tar_bytes(toy_dataset)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="base", training_file=file.id, suffix="my-style", seed=3,
                                         hyperparameters={"n_epochs": 2}, extra_body={"trigger": "sks"})  # fmt: skip
    assert (
        job.status == "queued" and job.seed == 3 and job.hyperparameters.n_epochs == 2 and job.fine_tuned_model is None
    )
    record = http.ft.store.load(job.id)
    assert record.fine_tuned_model == "default--my-style" and 'trigger="sks"' in record.overrides
    assert client.files.delete(file.id).deleted  # the job holds its own copy of the dataset
    assert (http.ft.store.folder(job.id) / "data" / "metadata.jsonl").is_file()

    http.ft.queue.tick()
    assert http.cluster.submitted == [job.id]
    http.cluster.jobs[job.id] = "RUNNING"
    http.ft.queue.tick()
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running"
    write_summary(http.ft.store, job.id, {**PASSED, "register": {**PASSED["register"], "model": "default--my-style"}})
    http.cluster.jobs[job.id] = "SUCCEEDED"
    http.ft.queue.tick()
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded" and done.fine_tuned_model == "default--my-style"
    events = client.fine_tuning.jobs.list_events(job.id, limit=2)
    assert len(events.data) == 2 and events.has_more and "served now" in events.data[0].message  # newest first
    rest = client.fine_tuning.jobs.list_events(job.id, after=events.data[-1].id, limit=100)
    assert rest.data[-1].message.startswith("fine-tuning job created") and not rest.has_more
    [ckpt] = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert ckpt.fine_tuned_model_checkpoint == "default--my-style/3" and ckpt.fine_tuning_job_id == job.id

    # a second job: listed newest first, paginated, cancelled while queued
    other_file = client.files.create(file=("toy.tar.gz", tar_bytes(toy_dataset)), purpose="fine-tune")
    second = client.fine_tuning.jobs.create(model="base", training_file=other_file.id)
    assert [j.id for j in client.fine_tuning.jobs.list()] == [second.id, job.id]
    page = client.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in page.data] == [second.id] and page.has_more
    assert client.fine_tuning.jobs.cancel(second.id).status == "cancelled"

    # refusals: another tenant's adapter (tests/serving/test_finetune_continue.py), an unknown file, another
    # tenant's job
    with pytest.raises(openai.NotFoundError, match="GET /v1/models"):
        client.fine_tuning.jobs.create(model="someone--adapter", training_file=other_file.id)
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model="base", training_file="file-" + "a" * 24)
    with pytest.raises(openai.BadRequestError, match="is not a field"):
        client.fine_tuning.jobs.create(model="base", training_file=other_file.id, extra_body={"colour": "x"})
    theirs = asyncio.run(http.api.files.create(io.BytesIO(tar_bytes(toy_dataset)), "t.tar.gz", "fine-tune", "globex"))
    theirs_job = http.ft.build(CreateJobBody(model="base", training_file=theirs.id), "globex")
    for call in (lambda: client.fine_tuning.jobs.retrieve(theirs_job.id), lambda: client.fine_tuning.jobs.cancel(
            theirs_job.id), lambda: client.fine_tuning.jobs.list_events(theirs_job.id)):  # fmt: skip
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.NotFoundError):  # another tenant's file
        client.fine_tuning.jobs.create(model="base", training_file=theirs.id)
    assert theirs_job.id not in [j.id for j in client.fine_tuning.jobs.list()]


def test_records_are_written_whole(setup):
    s = setup
    job = make_job(s.store, s.queue, "a")
    assert [p.name for p in s.store.folder(job.id).iterdir()] == ["job.json"]  # no temporary file left behind
    assert s.store.load(job.id) == JobRecord.model_validate_json(Path(s.store.folder(job.id) / "job.json").read_text())


def test_null_for_an_optional_field_of_a_job_request_means_not_given():
    minimal = {"model": "base", "training_file": "file-" + "0" * 24}
    nulled = {**minimal, **dict.fromkeys(CreateJobBody.optional_keys())}
    assert CreateJobBody.model_validate(nulled) == CreateJobBody.model_validate(minimal)
    hp = dict.fromkeys(Hyperparameters.optional_keys())
    assert CreateJobBody.model_validate({**minimal, "hyperparameters": hp}).hyperparameters == Hyperparameters()
    with pytest.raises(ValueError, match="training_file"):
        CreateJobBody.model_validate({**minimal, "training_file": None})


def test_a_job_cut_off_while_its_dataset_was_held_fails_after_a_restart(setup):
    s = setup
    record = JobRecord(id=s.store.new_id(), tenant="a", created_at=int(s.clock()), order=s.clock(), model="base",
                       base_model="models/toy-sd", training_file="file-" + "0" * 24, seed=0,
                       hyperparameters=Hyperparameters(), fine_tuned_model="a--x", overrides=[])  # fmt: skip
    s.store.save(record)  # status validating_files, never queued: the server stopped here
    s.queue.tick()
    assert status(s, record) == "validating_files"  # holding a dataset takes seconds; give it an hour
    s.clock.t += 3601
    s.queue.tick()
    assert status(s, record) == "failed" and s.store.load(record.id).error["code"] == "interrupted"
    assert s.cluster.submitted == []
