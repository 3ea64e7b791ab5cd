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
    # no held-out folder known before the dataset is read: images are held out of it
    assert tcfg.trial.validation.data_path is None and tcfg.trial.validation.holdout == cfg.holdout
    assert tcfg.search.num_samples == 3 and not tcfg.evaluation.enabled  # the pipeline runs it as its own stage
    assert tcfg.evaluation.candidates == 3
    assert tcfg.evaluation.overrides == ["registry.model_name=p1-lora", "generation.steps=5"]  # the user's come last
    assert tcfg.trial.mlflow.experiment == "lorafleet-p1" and tcfg.label == "p1 search"


def test_names_come_from_the_dataset_never_from_the_toy_default(pipeline_cfg, tmp_path, monkeypatch):
    """Changing only dataset= used to train, score and register under toy-sks's names."""
    monkeypatch.setenv("LORAFLEET_WORKDIR", str(tmp_path))
    (tmp_path / "data" / "ohwx" / "heldout").mkdir(parents=True)
    pipeline = Pipeline(pipeline_cfg("dataset=data/ohwx"))
    assert (pipeline.name, pipeline.model_name, pipeline.experiment) == ("ohwx", "ohwx-lora", "lorafleet-ohwx")
    assert pipeline.run_dir == tmp_path / "runs" / "pipeline" / "ohwx"
    tcfg = pipeline.tune_config()
    assert tcfg.trial.validation.data_path == str(tmp_path / "data" / "ohwx" / "heldout")  # <dataset>/heldout
    assert "registry.model_name=ohwx-lora" in tcfg.evaluation.overrides
    assert "sks" not in json.dumps(tcfg.evaluation.overrides)
    named = Pipeline(pipeline_cfg("dataset=s3://bucket/sets/My Cats", "mlflow.experiment=mine"))
    assert (named.name, named.model_name, named.experiment) == ("My-Cats", "My-Cats-lora", "mine")
    assert Pipeline(pipeline_cfg("dataset=data/ohwx", "name=try2")).model_name == "try2-lora"
    # a fine-tuning job names its registered model in evaluation.overrides: the pipeline's messages and tags use it
    job = Pipeline(pipeline_cfg("dataset=data/ohwx", "name=ftjob-1",
                                'evaluation.overrides=["registry.model_name=acme--my-style"]'))  # fmt: skip
    assert job.model_name == "acme--my-style"
    assert job.tune_config().evaluation.overrides[-1:] == ["registry.model_name=acme--my-style"]


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


def test_a_failed_search_is_run_again_never_skipped(pipeline_cfg, tmp_path, monkeypatch):
    """A rerun used to mark a failed tune stage 'skipped' and then crash with KeyError: 'evaluation'."""
    import tuning.tune
    from cluster.pipeline import StageFailed

    pipeline = Pipeline(pipeline_cfg(f"output_dir={tmp_path}", "name=p"))
    search = pipeline.search_dir
    search.mkdir(parents=True)
    (search / "best.json").write_text(json.dumps({"best": None, "trials": {"failed": 2}}))  # no usable trial
    (search / "results.csv").write_text("trial_id,status\n")
    (pipeline.run_dir / "pipeline.json").write_text(json.dumps({"stages": {"tune": {"status": "failed"}}}))
    calls = []

    def fake_run(tcfg, resume=False):
        calls.append(resume)
        search.mkdir(parents=True, exist_ok=True)
        best = {"best": {"trial_id": "t1", "adapter": "x"}, "trials": {"completed": 1}}
        (search / "best.json").write_text(json.dumps(best))
        return tuning.tune.SearchResult(str(search), best, [], None, None)

    monkeypatch.setattr(tuning.tune, "run", fake_run)
    rerun = Pipeline(pipeline_cfg(f"output_dir={tmp_path}", "name=p"))
    out = rerun.tune(rerun.tune_config())
    assert calls == [False] and out["best"]["trial_id"] == "t1" and "skipped" not in out  # it ran, from scratch
    assert json.loads((tmp_path / "p" / "search.failed-1" / "best.json").read_text())["best"] is None  # kept aside
    # the finished search is skipped the next time
    assert Pipeline(pipeline_cfg(f"output_dir={tmp_path}", "name=p")).tune(rerun.tune_config())["skipped"]

    # a search that produced no adapter stops the evaluate stage with a message, not a KeyError
    (search / "best.json").write_text(json.dumps({"best": None}))
    empty = Pipeline(pipeline_cfg(f"output_dir={tmp_path}", "name=p"))
    with pytest.raises(StageFailed, match="no adapter to evaluate"):
        empty.evaluate(empty.tune_config())


def test_the_validate_stage_reads_trigger_heldout_and_prompts_from_the_dataset(pipeline_cfg, tmp_path):
    """A new user's own concept (`--trigger ohwx --concept striped`) with no hand-written config: the trigger is
    detected from the captions (evidence logged), the held-out folder found, the prompts taken from its captions."""
    from training.toy_world.dataset import write_finetune_dataset

    data = write_finetune_dataset(tmp_path / "data" / "ohwx", trigger="ohwx", concept="striped", num_images=8)
    pipeline = Pipeline(pipeline_cfg(f"dataset={data}", f"output_dir={tmp_path / 'runs'}"))
    pipeline.run_dir.mkdir(parents=True)
    out = pipeline.validate(pipeline.tune_config())
    assert out["trigger"] == "ohwx" and "not a word of the tokenizer" in out["trigger_evidence"]
    assert out["images"] == 8 and out["heldout"] == 12  # <dataset>/heldout: 6 held-out prompts x 2 images
    facts = json.loads((pipeline.run_dir / "dataset.json").read_text())
    assert facts["registered_model"] == "ohwx-lora" and facts["trigger_source"] == "captions"
    assert facts["trigger_evidence"]["candidates"][0]["word"] == "ohwx"
    held = {json.loads(line)["text"] for line in (data / "heldout" / "metadata.jsonl").read_text().splitlines()}
    assert pipeline.derived["smoke_prompt"] in held  # a held-out caption: the concept on unseen content
    assert set(pipeline.derived["sample_prompts"]) <= set(facts["suite_prompts"])
    tcfg = pipeline.tune_config()  # what the trials and the evaluation now get
    assert tcfg.trial.data.trigger == "ohwx" and tcfg.trial.validation.data_path == str(data / "heldout")
    assert tcfg.trial.validation.prompts == pipeline.derived["sample_prompts"]
    assert tcfg.trial.validation.every_n_epochs == 4 and tcfg.trial.validation.log_adapters
    assert tcfg.evaluation.overrides[:2] == ["registry.model_name=ohwx-lora", 'trigger="ohwx"']

    # a trigger given by hand wins, and one that no caption contains is refused with the fix
    from training.captions import TriggerError

    again = Pipeline(pipeline_cfg(f"dataset={data}", f"output_dir={tmp_path / 'runs'}", "trigger=zzq"))
    with pytest.raises(TriggerError, match="trigger"):
        again.validate(again.tune_config())


def _captioned(folder, captions):
    """A dataset of small distinct images with these captions (metadata.jsonl)."""
    from PIL import Image

    folder.mkdir(parents=True)
    rows = []
    for i, text in enumerate(captions):
        Image.new("RGB", (64, 64), (40 * i % 256, 90, 160)).save(folder / f"{i:02d}.png")
        rows.append(json.dumps({"file_name": f"{i:02d}.png", "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.mark.parametrize("shape", ["{t}'s", "«{t}»", "({t}),", "{t}/ohwx"])
def test_the_trigger_detection_finds_is_the_one_the_suite_finds(pipeline_cfg, tmp_path, shape):
    """Detection, dataset validation and the evaluation suite compare words the same way (training.captions
    caption_words), so a trigger with punctuation attached is found by all three or by none — never 'in 8/8
    captions' for detection and 'in none' for the suite."""
    colours, shapes = ["red", "blue", "green", "yellow"], ["circle", "square"]
    captions = [f"a {c} {s} on a {shape.format(t='sks')} background" for c in colours for s in shapes]
    data = _captioned(tmp_path / "punct", captions)
    pipeline = Pipeline(pipeline_cfg(f"dataset={data}", f"output_dir={tmp_path / 'runs'}", "holdout=2"))
    pipeline.run_dir.mkdir(parents=True)
    from training.captions import TriggerError

    try:
        out = pipeline.validate(pipeline.tune_config())
    except TriggerError as exc:  # refused with the fix: fine, as long as it is not a traceback of another kind
        assert "trigger" in str(exc)
        return
    facts = json.loads((pipeline.run_dir / "dataset.json").read_text())
    assert facts["captions_without_trigger"] == [] and facts["suite_prompts"], facts
    assert all(out["trigger"] in p.lower() for p in facts["suite_prompts"])


def test_what_the_pipeline_derives_cannot_be_overridden_behind_its_back(pipeline_cfg, tmp_path):
    """trial.data.trigger in tune.overrides would train on one trigger and evaluate another: refused, naming the
    pipeline's own field; so is a heldout= folder that does not exist."""
    from training.configuration import ConfigError

    cfg = pipeline_cfg(f"output_dir={tmp_path}", 'tune.overrides=["trial.data.trigger=ohwx", "trial.data.path=/x"]')
    with pytest.raises(ConfigError) as err:
        Pipeline(cfg).tune_config()
    assert "trial.data.trigger is the pipeline's own trigger (set trigger=)" in str(err.value)
    assert "trial.data.path is the pipeline's own dataset (set dataset=)" in str(err.value)
    with pytest.raises(ConfigError, match=r"heldout=/nonexistent/held: no such folder"):
        Pipeline(pipeline_cfg(f"output_dir={tmp_path}", "heldout=/nonexistent/held")).tune_config()


def test_a_holdout_that_leaves_too_few_images_is_refused(pipeline_cfg, tmp_path):
    from training.configuration import ConfigError

    data = _captioned(tmp_path / "few", [f"a {c} circle on a sks background" for c in ("red", "blue", "green",
                                                                                      "yellow", "white")])  # fmt: skip
    pipeline = Pipeline(pipeline_cfg(f"dataset={data}", f"output_dir={tmp_path / 'runs'}", "holdout=3"))
    pipeline.run_dir.mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"holdout=3 leaves 2 of 5 images to train on, fewer than data.min_images"):
        pipeline.validate(pipeline.tune_config())


def test_a_run_folder_of_another_dataset_is_never_reused(pipeline_cfg, tmp_path):
    """Two datasets that derive one name (or a dataset changed since its search): the finished search belongs to
    other images, so the pipeline refuses instead of skipping to the other dataset's adapter."""
    from training.configuration import ConfigError
    from training.toy_world.dataset import write_finetune_dataset

    first = write_finetune_dataset(tmp_path / "a" / "cats", trigger="ohwx", concept="striped", num_images=8)
    other = write_finetune_dataset(tmp_path / "b" / "cats", trigger="ohwx", concept="checkered", num_images=8)
    pipeline = Pipeline(pipeline_cfg(f"dataset={first}", f"output_dir={tmp_path / 'runs'}"))
    pipeline.run_dir.mkdir(parents=True)
    pipeline.validate(pipeline.tune_config())
    pipeline.search_dir.mkdir()
    (pipeline.search_dir / "best.json").write_text(json.dumps({"best": {"trial_id": "t1"}}))
    pipeline.validate(pipeline.tune_config())  # the same dataset again: fine, the search is reused
    second = Pipeline(pipeline_cfg(f"dataset={other}", f"output_dir={tmp_path / 'runs'}"))
    assert second.run_dir == pipeline.run_dir
    with pytest.raises(ConfigError, match="holds a search of a different dataset .* set name= to a new name"):
        second.validate(second.tune_config())


def test_a_refused_gate_names_every_candidates_verdict_and_the_way_on(pipeline_cfg, tmp_path):
    """The message showed the last candidate's verdict as 'the best adapter's': the best one, refused only on
    latency, read as if it had not learned the concept."""
    from cluster.pipeline import StageFailed

    pipeline = Pipeline(pipeline_cfg(f"output_dir={tmp_path}", "name=qpv"))
    pipeline.summary["stages"]["evaluate"] = {
        "passed": False, "gate": "gate FAILED: concept_gain >= 0.11: 0.1003", "report": "r.html",
        "candidates": [{"trial_id": "best1", "passed": False, "gate": "gate FAILED: latency_p95_s <= 2: 2.585"},
                       {"trial_id": "next2", "passed": False, "gate": "gate FAILED: concept_gain >= 0.11: 0.1003"}],
    }  # fmt: skip
    with pytest.raises(StageFailed) as err:
        pipeline.gate()
    text = str(err.value)
    assert "candidate 1 (trial best1): gate FAILED: latency_p95_s <= 2: 2.585" in text
    assert "candidate 2 (trial next2): gate FAILED: concept_gain" in text
    assert "evaluation.candidates=3" in text and "lorafleet promote qpv-lora --trial ID --epoch N" in text
