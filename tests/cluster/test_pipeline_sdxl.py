"""configs/pipeline-sdxl.yaml with the tiny SDXL as its base, end to end up to where training starts: the stage
configs, the validate stage (trigger, held-out split, suite through the SDXL tokenizers) and the search's preflight.
The base model goes through unchanged: trials train on it, the evaluation renders at their size, Serve serves it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.config import PipelineConfig
from cluster.pipeline import Pipeline
from training.configuration import ConfigError, load_config


@pytest.fixture
def sdxl_pipeline(repo, toy_dataset, tiny_sdxl_dir, tmp_path, monkeypatch):
    """A factory: configs/pipeline-sdxl.yaml on the toy dataset, its trials on the tiny SDXL on CPU."""
    monkeypatch.setenv("LORAFLEET_WORKDIR", str(tmp_path))

    def make(*trial: str, serve: tuple[str, ...] = ()) -> Pipeline:
        tune = [f"trial.base_model={tiny_sdxl_dir}", "trial.data.resolution=64", "trial.ray.use_gpu=false",
                "trial.ray.cpus_per_worker=1", "trial.train.mixed_precision=no", *trial]  # fmt: skip
        overrides = [f"dataset={toy_dataset}", f"output_dir={tmp_path / 'runs'}", f"tune.overrides={json.dumps(tune)}",
                     f"serve.overrides={json.dumps(list(serve))}"]  # fmt: skip
        return Pipeline(load_config(PipelineConfig, repo / "configs" / "pipeline-sdxl.yaml", overrides))

    return make


def test_an_sdxl_pipeline_passes_every_check_before_training(sdxl_pipeline, tiny_sdxl_dir, toy_dataset):
    from serving.config import load_serve_args
    from tuning.handoff import eval_config
    from tuning.space import for_hardware
    from tuning.tune import absolute_paths, preflight

    pipeline = sdxl_pipeline()
    tcfg = pipeline.tune_config()
    assert tcfg.trial.base_model == str(tiny_sdxl_dir) and tcfg.evaluation.config.endswith("eval-sdxl.yaml")
    pipeline.check_configs(tcfg)  # the evaluation config, and the serve config with the search's base model
    serve = load_serve_args(pipeline.cfg.serve.config, pipeline.serve_overrides(tcfg))
    assert serve.base_model == str(tiny_sdxl_dir)  # the replicas serve the base the adapters learned on

    pipeline.run_dir.mkdir(parents=True)
    facts = pipeline.validate(tcfg)  # reads the captions with the SDXL model's tokenizers
    assert facts["trigger"] == "sks" and facts["images"] == 8 and facts["heldout"] > 0  # <dataset>/heldout
    tcfg = pipeline.tune_config()  # with the dataset's trigger, held-out set and sample prompts
    assert tcfg.trial.data.trigger == "sks" and tcfg.trial.base_model == str(tiny_sdxl_dir)

    search, notes = for_hardware(tcfg)
    assert any("adamw8bit" in n for n in notes)  # the SDXL space's GPU-only optimizer, dropped for CPU trials
    search = absolute_paths(search)
    assert preflight(search, pipeline.search_dir, resume=False) == []
    ecfg = eval_config(search, pipeline.search_dir, None, None, fetch=False)
    assert ecfg.generation.resolution is None  # trained at the model's own size: rendered at it
    assert ecfg.data.train_path == str(toy_dataset) and ecfg.clip_model == "openai/clip-vit-large-patch14"
    assert not pipeline.search_dir.exists()  # nothing trained, no search started


def test_the_evaluation_renders_at_the_size_the_trials_trained_at(sdxl_pipeline):
    from tuning.handoff import eval_config

    tcfg = sdxl_pipeline("trial.data.resolution=32").tune_config()
    assert eval_config(tcfg, Path(tcfg.output_dir), None, None, fetch=False).generation.resolution == 32


def test_serve_overrides_cannot_swap_the_base_model(sdxl_pipeline):
    pipeline = sdxl_pipeline(serve=("base_model=models/toy-sd",))
    with pytest.raises(ConfigError, match=r"serve.overrides: base_model is the search's base model"):
        pipeline.check_configs(pipeline.tune_config())


@pytest.fixture
def local_ray():
    """The Ray instance an in-process pipeline run joins (init_ray keeps a driver's own), shut down afterwards:
    left running it would make every later ``ray.init()`` in this pytest process fail."""
    import ray

    # the dashboard stays on: without it, finished trials' placement groups are not cleaned up
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", configure_logging=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_an_sdxl_pipeline_runs_from_the_dataset_to_the_registry(repo, toy_dataset, tiny_sdxl_dir, tmp_path,
                                                                  monkeypatch, mlflow_server, local_ray):  # fmt: skip
    """One pipeline run on the tiny SDXL by config alone (configs/pipeline-sdxl.yaml + CPU-sized overrides):
    validate → a 2-trial search (Ray Train on SDXL conditioning) → evaluation of the best adapter on SDXL →
    gate → the registry. The gate keeps only checks a random tiny model can pass (its verdict logic is tested
    elsewhere); what this checks is that every stage runs on an SDXL base and hands an SDXL adapter on."""
    from mlflow import MlflowClient

    from tests.evaluation.conftest import SMALL_SUITE
    from training.adapter import verify_adapter

    monkeypatch.setenv("LORAFLEET_WORKDIR", str(tmp_path))
    tune = [f"trial.base_model={tiny_sdxl_dir}", "trial.pretrained_vae_model_name_or_path=null",
            "trial.data.resolution=64", "trial.ray.use_gpu=false", "trial.ray.cpus_per_worker=1",
            "trial.train.mixed_precision=no", "trial.train.gradient_checkpointing=false",
            "search.num_samples=2", "search.max_epochs=1"]  # fmt: skip
    evaluation = [*SMALL_SUITE, f"clip_model={repo / 'models' / 'toy-clip'}",
                  "gate.checks={success_rate: {min: 0.95}, latency_p95_s: {max: 600}}"]  # fmt: skip
    overrides = [f"dataset={toy_dataset}", f"output_dir={tmp_path / 'runs'}", f"tune.overrides={json.dumps(tune)}",
                 f"evaluation.overrides={json.dumps(evaluation)}", f"mlflow.tracking_uri={mlflow_server}",
                 "evaluation.candidates=1", "until=register", "samples.prompts=0"]  # fmt: skip
    cfg = load_config(PipelineConfig, repo / "configs" / "pipeline-sdxl.yaml", overrides)
    result = Pipeline(cfg).run()
    stages = result.summary["stages"]
    assert [s for s in ("validate", "tune", "evaluate", "gate", "register") if stages[s]["status"] == "done"] == [
        "validate", "tune", "evaluate", "gate", "register"], json.dumps(stages, indent=1)  # fmt: skip
    model, version = stages["register"]["model"], stages["register"]["version"]
    mv = MlflowClient(mlflow_server).get_model_version(model, str(version))
    assert MlflowClient(mlflow_server).get_model_version_by_alias(model, "champion").version == mv.version
    best = json.loads((Path(result.run_dir) / "search" / "best.json").read_text())
    meta = verify_adapter(best["best"]["adapter"])
    assert meta.family == "sdxl" and meta.base_model.endswith(tiny_sdxl_dir.name)
