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
    from training.toy_world.config import ToyWorldConfig
    from tuning.config import TuneConfig

    schemas = {
        "toy_world.yaml": ToyWorldConfig,
        "train.yaml": TrainConfig,
        "tune.yaml": TuneConfig,
        "eval.yaml": EvalConfig,
        "serve.yaml": load_serve_args,  # a Ray Serve config file: its application's args are ServeArgs
        "pipeline.yaml": PipelineConfig,
    }
    files = sorted((repo / "configs").glob("*.yaml"))
    assert files
    for f in files:
        first = f.read_text().splitlines()[0]
        assert first.startswith("# ") and ("python -m" in first or "serve" in first or "ray" in first), f
        assert f.name in schemas, f"{f.name}: add its schema here so it is validated"
        schema = schemas[f.name]
        schema(f) if schema is load_serve_args else load_config(schema, f)
