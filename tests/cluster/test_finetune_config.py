"""A fine-tuning job's overrides (serving/finetune) are a valid pipeline config that trains and registers what the
request asked for: checked by the same ``cluster.jobs.validate_config`` that ``Jobs.submit`` runs (no cluster)."""

from __future__ import annotations

from pathlib import Path

from serving.finetune.jobs import Hyperparameters, JobRecord, pipeline_overrides, search_overrides


def job_config(repo: Path, hp: Hyperparameters, tmp_path: Path, operator: list[str] = (), **fields):
    from cluster.jobs import validate_config
    from cluster.pipeline import Pipeline
    from training.configuration import load_config
    from tuning.config import TuneConfig

    tune = load_config(TuneConfig, str(repo / "configs" / "tune.yaml"), [])
    record = JobRecord(id="ftjob-" + "a" * 24, tenant="acme", created_at=1, order=1.0, model="base",
                       base_model="models/toy-sd", training_file="file-" + "0" * 24, hyperparameters=hp, seed=5,
                       fine_tuned_model="acme--my-style", overrides=[], trigger="sks", **fields)  # fmt: skip
    overrides = pipeline_overrides(
        record, tmp_path / "data", None, search_overrides(hp, tune, 2, 5), "configs/tune.yaml"
    )
    cfg = validate_config("pipeline", str(repo / "configs" / "pipeline.yaml"), [*overrides, *operator])
    pipeline = Pipeline(cfg)
    return cfg, pipeline, pipeline.tune_config()


def test_a_job_registers_under_its_tenants_name_and_stops_before_deploying(repo, tmp_path):
    operator = ['evaluation.overrides=["gate.checks.latency_p95_s={max: 600}"]']
    cfg, pipeline, tune = job_config(repo, Hyperparameters(n_epochs=3, rank=8), tmp_path, operator)
    assert cfg.until == "register" and not cfg.serve.enabled and cfg.trigger == "sks"
    assert cfg.dataset == str(tmp_path / "data") and pipeline.run_dir == tmp_path / "runs" / ("ftjob-" + "a" * 24)
    registry = [o for o in tune.evaluation.overrides if o.startswith("registry.model_name=")]
    assert registry[-1] == "registry.model_name=acme--my-style"  # the last one wins over the pipeline's own
    assert "gate.checks.latency_p95_s={max: 600}" in tune.evaluation.overrides
    assert (tune.trial.train.epochs, tune.trial.lora.rank, tune.trial.train.seed) == (3, 8, 5)
    assert tune.search.num_samples == 2 and set(tune.space) == {"train.optimizer", "train.lr", "train.d_coef"}


def test_fixed_hyperparameters_make_a_one_trial_pipeline(repo, tmp_path):
    hp = Hyperparameters(n_epochs=16, learning_rate_multiplier=3.0, rank=16, optimizer="adamw", batch_size=4)
    _, _, tune = job_config(repo, hp, tmp_path)
    assert tune.search.algorithm == "grid" and tune.search.num_samples == 1
    assert tune.grid["train.lr"] == [3.0 * 1e-3] and tune.trial.base_model == "models/toy-sd"


def test_a_job_on_bare_images_captions_them_and_its_concept_reaches_the_evaluation_config(repo, tmp_path):
    from tuning.handoff import eval_config

    cfg, pipeline, tune = job_config(repo, Hyperparameters(n_epochs=2), tmp_path, caption=True, concept="yes")
    assert cfg.caption.enabled and pipeline.caption_config(tune).resolved_captioner() == "toy"
    enabled = tune.model_copy(update={"evaluation": tune.evaluation.model_copy(update={"enabled": True})})
    ecfg = eval_config(enabled, tmp_path / "search", None, None, fetch=False)
    assert ecfg.auto_suite.concept == "yes"  # quoted in the override: YAML's `yes` stays the word, not True
    plain, _, _ = job_config(repo, Hyperparameters(n_epochs=2), tmp_path)
    assert not plain.caption.enabled


def test_the_ray_submitter_takes_a_job_already_submitted_under_its_id_as_submitted(monkeypatch):
    import pytest

    import cluster.finetune as finetune
    from cluster.jobs import JobError

    class FakeJobs:
        def __init__(self, address, tracking_uri):
            self.calls = []

        def submit(self, kind, config, overrides, submission_id):
            self.calls.append((kind, config, submission_id))
            if submission_id == "ftjob-dup":
                raise JobError(f"submitting failed: Job with submission_id {submission_id} already exists. Please "
                               "use a different submission_id.")  # fmt: skip
            raise JobError("submitting failed: the dashboard is down")

    monkeypatch.setattr(finetune, "Jobs", FakeJobs)
    submitter = finetune.RaySubmitter(None, None, "configs/pipeline.yaml", cpus_per_job=2, gpus_per_job=1)
    assert submitter.submit("ftjob-dup", []) == "ftjob-dup"
    assert submitter.jobs.calls[0][:1] == ("pipeline",) and submitter.jobs.calls[0][1].endswith("configs/pipeline.yaml")
    with pytest.raises(JobError, match="dashboard is down"):
        submitter.submit("ftjob-new", [])
