from pathlib import Path

import pytest

from training.configuration import ConfigError, load_config
from training.toy_world.config import ToyWorldConfig


def test_yaml_plus_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seed: 3\nunet:\n  steps: 10\n")
    cfg = load_config(ToyWorldConfig, p, ["unet.lr=1e-3", "vae.block_out_channels=[8, 16]", "clip.steps=7"])
    assert (cfg.seed, cfg.unet.steps, cfg.unet.lr, cfg.vae.block_out_channels, cfg.clip.steps) == (
        3,
        10,
        1e-3,
        [8, 16],
        7,
    )


def test_every_problem_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(ToyWorldConfig, None, ["unet.stepz=3", "clip.lr=-1", "seed", "vae.steps=many"])
    problems = err.value.problems
    assert len(problems) == 4
    text = "\n".join(problems)
    assert (
        "'stepz' is not a key of unet" in text and "clip.lr" in text and "vae.steps" in text and "key.sub=value" in text
    )


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(ToyWorldConfig, tmp_path / "nope.yaml")


def test_value_where_a_section_is_expected():
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(ToyWorldConfig, None, ["seed.x=1"])


def test_every_shipped_config_validates_and_names_its_command(repo: Path):
    from cluster.config import PipelineConfig
    from evaluation.config import EvalConfig
    from serving.config import load_serve_args
    from training.config import TrainConfig
    from training.toy_world.config import ToySdxlConfig, ToyWorldConfig
    from tuning.config import TuneConfig

    schemas = {
        "toy_world.yaml": ToyWorldConfig,
        "toy_world_sdxl.yaml": ToySdxlConfig,  # models/toy-sdxl's build
        "train.yaml": TrainConfig,
        "train-sdxl.yaml": TrainConfig,  # a real SDXL run (stabilityai/stable-diffusion-xl-base-1.0, fp16-fix VAE)
        "tune.yaml": TuneConfig,
        "tune-sdxl.yaml": TuneConfig,
        "eval.yaml": EvalConfig,
        "eval-toy-sks.yaml": EvalConfig,  # the toy world's hand-written (stricter) suite
        "eval-sdxl.yaml": EvalConfig,
        "serve.yaml": load_serve_args,  # a Ray Serve config file: its application's args are ServeArgs
        "serve-sdxl.yaml": load_serve_args,  # the same for an SDXL base model
        "pipeline.yaml": PipelineConfig,
        "pipeline-sdxl.yaml": PipelineConfig,
    }
    files = sorted((repo / "configs").glob("*.yaml"))
    assert files
    for f in files:
        first = f.read_text().splitlines()[0]
        assert first.startswith("# ") and ("python -m" in first or "serve" in first or "ray" in first), f
        assert f.name in schemas, f"{f.name}: add its schema here so it is validated"
        schema = schemas[f.name]
        schema(f) if schema is load_serve_args else load_config(schema, f)


def test_every_class_of_bad_training_value_is_listed_in_one_error(repo: Path):
    """Unknown key, wrong type, out of range, a bad YAML value and a combination this machine cannot run."""
    from training.config import TrainConfig

    with pytest.raises(ConfigError) as err:
        load_config(
            TrainConfig,
            repo / "configs" / "train.yaml",
            ["lora.rnak=4", "train.epochs=many", "train.lr=-1", "train.optimizer=adamw8bit", "ray.use_gpu=false",
             "train.mixed_precision=fp16", "data.crop=diagonal", "ray.num_workers=[1"],
        )  # fmt: skip
    text = "\n".join(err.value.problems)
    assert len(err.value.problems) == 7, text
    for needle in ("'rnak' is not a key of lora", "train.epochs", "train.lr", "train.optimizer: 'adamw8bit' needs a "
                   "CUDA GPU", "train.mixed_precision: fp16 needs GPU", "data.crop", "ray.num_workers=[1"):  # fmt: skip
        assert needle in text, needle


def test_every_class_of_bad_serving_value_is_listed_in_one_error(repo: Path):
    from serving.config import load_serve_args

    with pytest.raises(ConfigError) as err:
        load_serve_args(
            repo / "configs" / "serve.yaml",
            ["deployment.num_gpus=0.3", "limits.max_n=0", "batching.max_batch_size=lots", "deployment.replicas=2",
             "device=tpu"],
        )  # fmt: skip
    text = "\n".join(err.value.problems)
    assert len(err.value.problems) == 5, text
    for needle in ("num_gpus 0.3 does not divide one GPU", "limits.max_n", "batching.max_batch_size",
                   "'replicas' is not a key of deployment", "device"):  # fmt: skip
        assert needle in text, needle


def test_a_stages_overrides_on_the_command_line_add_to_the_configs(repo, caplog):
    """`tune.overrides=[…]` used to replace the pipeline's own list (its 8-trial budget became 16 silently)."""
    from cluster.config import PipelineConfig

    yaml_file = repo / "configs" / "pipeline.yaml"
    base = load_config(PipelineConfig, yaml_file).tune.overrides
    assert base == ["search.num_samples=8"]
    with caplog.at_level("INFO", logger="training.configuration"):
        cfg = load_config(PipelineConfig, yaml_file, ['tune.overrides=["search.max_epochs=2"]'])
    assert cfg.tune.overrides == ["search.num_samples=8", "search.max_epochs=2"]  # both apply; the later wins a tie
    assert "added to the config's ['search.num_samples=8']" in caplog.text  # and the merge is stated
    assert load_config(PipelineConfig, yaml_file, ["tune.overrides=[]"]).tune.overrides == []  # `[]` clears
    # other lists are still replaced
    assert load_config(ToyWorldConfig, None, ["vae.block_out_channels=[8]"]).vae.block_out_channels == [8]


def test_dotted_overrides_reach_into_an_optional_section(repo):
    """`suite.images_per_prompt=1` on a config whose suite is optional (null = built from the dataset)."""
    from evaluation.config import EvalConfig

    strict = load_config(EvalConfig, repo / "configs" / "eval-toy-sks.yaml", ["suite.images_per_prompt=1"])
    assert strict.suite.images_per_prompt == 1 and len(strict.suite.prompts) == 18
    generic = load_config(EvalConfig, repo / "configs" / "eval.yaml")
    assert generic.suite is None  # built from the dataset when evaluating
    with pytest.raises(ConfigError, match="suite"):  # a null section filled in part is validated as a whole
        load_config(EvalConfig, repo / "configs" / "eval.yaml", ["suite.images_per_prompt=1"])
