"""The pipeline's configuration and preflight, without a cluster: paths, stage configs, storage, MLflow."""

from __future__ import annotations

import json

import pytest

from cluster.config import PipelineConfig
from cluster.jobs import JobError, Jobs
from cluster.pipeline import Pipeline, resolve
from training.config import PreflightError
from training.configuration import ConfigError, load_config


@pytest.fixture
def pipeline_cfg(repo):
    def make(*overrides: str) -> PipelineConfig:
        return load_config(PipelineConfig, repo / "configs" / "pipeline.yaml", list(overrides))

    return make


def test_relative_paths_mean_the_submitting_checkout(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFLEET_WORKDIR", str(tmp_path))
    assert resolve("data/toy-sks") == str(tmp_path / "data" / "toy-sks")
    assert resolve("/abs/x") == "/abs/x" and resolve("s3://b/x") == "s3://b/x" and resolve(None) is None
    monkeypatch.delenv("LORAFLEET_WORKDIR")
    monkeypatch.chdir(tmp_path / "..")
    assert resolve("runs") == str(tmp_path.parent / "runs")


def test_the_tune_stage_gets_the_pipelines_data_output_and_evaluation(pipeline_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLEET_WORKDIR", str(tmp_path))
    cfg = pipeline_cfg("name=p1", 'tune.overrides=["search.num_samples=3"]', "evaluation.candidates=3",
                       'evaluation.overrides=["generation.steps=5"]', "dataset=gs://bucket/toy")  # fmt: skip
    tcfg = Pipeline(cfg).tune_config()
    assert tcfg.name == "search" and tcfg.output_dir == str(tmp_path / "runs" / "pipeline" / "p1")
    assert tcfg.trial.data.path == "gs://bucket/toy"
    assert tcfg.trial.validation.data_path == str(tmp_path / "data" / "toy-sks" / "heldout")
    assert tcfg.search.num_samples == 3 and not tcfg.evaluation.enabled  # the pipeline runs it as its own stage
    assert tcfg.evaluation.candidates == 3 and tcfg.evaluation.overrides == ["generation.steps=5"]


def test_every_stage_config_problem_is_reported_before_anything_runs(pipeline_cfg, toy_dataset, tmp_path):
    cfg = pipeline_cfg(
        f"dataset={toy_dataset}", f"heldout={toy_dataset}", f"output_dir={tmp_path / 'runs'}",
        'evaluation.overrides=["gate.checks.clip_t.min=high"]',
        'serve.overrides=["deployment.num_gpus=0.3", "max_adapters=0"]',
    )  # fmt: skip
    pipeline = Pipeline(cfg)
    with pytest.raises(ConfigError) as err:
        pipeline.check_configs(pipeline.tune_config())
    text = str(err.value)
    assert "evaluation (configs/eval.yaml): gate.checks.clip_t.min" in text
    assert "serve (configs/serve.yaml): deployment.num_gpus" in text and "max_adapters" in text
    assert not pipeline.run_dir.exists()  # nothing written


def test_unknown_stage_and_keys_are_named(pipeline_cfg):
    with pytest.raises(ConfigError) as err:
        pipeline_cfg("until=serve", "serve.prot=8001", "evaluation.candidates=0")
    text = str(err.value)
    assert "until" in text and "serve.prot" in text and "evaluation.candidates" in text


def test_the_pipeline_needs_a_tracking_server(pipeline_cfg, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(PreflightError, match="needs an MLflow tracking server.*lorafleet up"):
        Pipeline(pipeline_cfg("mlflow.tracking_uri=sqlite:///x.db")).run()


def test_submit_refuses_node_local_storage_on_a_multi_node_cluster(pipeline_cfg, monkeypatch, tmp_path):
    jobs = object.__new__(Jobs)  # no dashboard needed: the node count is the only thing asked of the cluster
    jobs.address = "http://127.0.0.1:8265"
    monkeypatch.setattr(Jobs, "node_count", lambda self: 3)
    cfg = pipeline_cfg(f"output_dir={tmp_path}")
    with pytest.raises(JobError, match=r"output_dir=.* node-local filesystem .* 3 nodes"):
        jobs.check_storage("pipeline", cfg)
    jobs.check_storage("pipeline", pipeline_cfg(f"output_dir={tmp_path}", "storage.shared=true"))
    monkeypatch.setattr(Jobs, "node_count", lambda self: 1)
    jobs.check_storage("pipeline", cfg)


def test_secrets_never_go_into_the_jobs_metadata(monkeypatch):
    """A runtime_env is shown by the dashboard and `ray job list`: the API key and hub token stay out of it."""
    monkeypatch.setenv("LORAFLEET_API_KEY", "s3cret-key")
    monkeypatch.setenv("HF_TOKEN", "hf_s3cret")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    jobs = object.__new__(Jobs)
    jobs.address, jobs.tracking_uri = "http://127.0.0.1:8265", "http://127.0.0.1:5000"
    env = jobs.runtime_env("job-1")
    assert "s3cret" not in json.dumps(env) and env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(JobError, match="LORAFLEET_API_KEY would be stored in the job's metadata"):
        jobs.runtime_env("job-1", {"LORAFLEET_API_KEY": "x"})


def test_secrets_never_go_into_mlflow_params(repo, monkeypatch):
    """Runs log their configs flattened as params: configs name the key's variable, never hold its value."""
    from evaluation.config import EvalConfig
    from serving.config import load_serve_args
    from training.tracking import flatten
    from tuning.config import TuneConfig

    monkeypatch.setenv("LORAFLEET_API_KEY", "s3cret-key")
    monkeypatch.setenv("HF_TOKEN", "hf_s3cret")
    configs = [
        load_config(PipelineConfig, repo / "configs" / "pipeline.yaml"),
        load_config(TuneConfig, repo / "configs" / "tune.yaml"),
        load_config(EvalConfig, repo / "configs" / "eval.yaml"),
        load_serve_args(repo / "configs" / "serve.yaml"),
    ]
    params = {k: v for cfg in configs for k, v in flatten(cfg.model_dump(mode="json")).items()}
    assert params["api_key_env"] == "LORAFLEET_API_KEY"
    assert not [k for k, v in params.items() if "s3cret" in v]


def test_checking_a_config_never_downloads_its_dataset(repo, monkeypatch):
    """`lorafleet submit` validates on the submitting machine: a bucket URI is checked as a string only."""
    from cluster.jobs import validate_config

    def no_fetch(uri, root=None):
        raise AssertionError(f"fetched {uri} while only checking the config")

    monkeypatch.setattr("training.remote.local_copy", no_fetch)
    cfg = validate_config("pipeline", str(repo / "configs" / "pipeline.yaml"),
                          ["dataset=s3://bucket/toy-sks", "heldout=s3://bucket/toy-sks/heldout"])  # fmt: skip
    assert cfg.dataset == "s3://bucket/toy-sks"
