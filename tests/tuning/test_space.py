"""The search space without Ray: validation, hardware pruning, conditions, grid points, trial configs."""

from __future__ import annotations

import optuna
import pytest

from training.config import PreflightError
from training.configuration import ConfigError
from tuning.space import (
    PRODIGY_LR,
    OptunaSpace,
    check_points,
    choice_points,
    for_hardware,
    grid_points,
    trial_config,
    with_rules,
)
from tuning.tune import max_concurrent, max_epochs, trial_name


def test_bad_search_configs_name_the_key_and_the_fix(tune_config):
    cases = {
        "space.train.leraning_rate={type: uniform, low: 0.1, high: 1}": "'leraning_rate' is not a key of train",
        "search.metric=accuracy": "search.metric='accuracy' is not reported",
        "search.mode=max": "set search.mode=min",
        "trial.validation.data_path=null": "needs held-out images",
        "space.train.d_coef={type: loguniform, low: 0, high: 2}": "needs low > 0",
        "space.lora.rank={type: choice, values: []}": "non-empty values",
        "space.train.lr={type: uniform, low: 1, high: 2, when: {lora.alpha: [1]}}": "unconditional key of space",
        "space.output_dir={type: choice, values: [a]}": "set per trial by the search",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match="invalid config") as info:
            tune_config(override)
        assert message in str(info.value), (override, str(info.value))


def test_choice_values_the_training_schema_rejects_are_caught_before_ray(tune_config):
    cfg = tune_config("space.train.optimizer={type: choice, values: [adamw, adam]}")
    problems = check_points(cfg, choice_points(cfg))
    assert any("train.optimizer" in p and "adam" in p for p in problems), problems


def test_half_precision_choices_on_cpu_workers_are_caught_before_ray(tune_config):
    """fp16/bf16 in the space (or a point) with ray.use_gpu=false: every such trial would fail on its CPU worker."""
    cfg = tune_config("space.train.mixed_precision={type: choice, values: [no, fp16]}")
    problems = check_points(cfg, choice_points(cfg))
    assert any(
        p.startswith("trial.train.mixed_precision: fp16 needs GPU workers") and "'train.mixed_precision': 'fp16'" in p
        for p in problems
    ), problems
    assert not any("'no'" in p for p in problems), problems
    assert check_points(tune_config("trial.ray.use_gpu=true"), [{"train.mixed_precision": "bf16"}]) == []


def test_adamw8bit_is_dropped_on_cpu_with_a_note_and_kept_on_gpu(tune_config):
    cfg = tune_config()
    assert "adamw8bit" in cfg.space["train.optimizer"].values
    cpu, notes = for_hardware(cfg)
    assert "adamw8bit" not in cpu.space["train.optimizer"].values
    assert "adamw8bit" not in cpu.grid["train.optimizer"]
    assert any("space.train.optimizer" in n and "CUDA" in n for n in notes)
    gpu, notes = for_hardware(tune_config("trial.ray.use_gpu=true"))
    assert "adamw8bit" in gpu.space["train.optimizer"].values and notes == []
    with pytest.raises(ConfigError, match="nothing left to run on CPU"):
        for_hardware(tune_config("space.train.optimizer={type: choice, values: [adamw8bit]}"))


def test_optuna_space_is_conditional_seeded_and_pins_prodigy_lr(tune_config):
    cfg, _ = for_hardware(tune_config())
    space = OptunaSpace(cfg)

    def sample(seed):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        out = []
        for _ in range(30):
            trial = study.ask()
            constants = space(trial)
            out.append((trial.params, constants))
            study.tell(trial, 0.0)
        return out

    draws = sample(0)
    assert draws == sample(0)  # seeded: the same suggestions again
    optimizers = {p["train.optimizer"] for p, _ in draws}
    assert optimizers == {"adamw", "prodigy"}
    for params, constants in draws:
        if params["train.optimizer"] == "prodigy":
            assert "train.lr" not in params and "train.d_coef" in params
            assert constants == {"train.lr": PRODIGY_LR}
        else:
            assert 1e-5 <= params["train.lr"] <= 1e-2 and "train.d_coef" not in params
            assert constants == {}


def test_grid_is_the_classic_matrix_with_prodigy_lr_collapsed(tune_config):
    cfg, _ = for_hardware(tune_config("search.algorithm=grid"))
    points = grid_points(cfg)
    # rank 3 x epochs 3 x (adamw x 3 lrs + prodigy x lr 1.0)
    assert len(points) == 3 * 3 * (3 + 1)
    prodigy = [p for p in points if p["train.optimizer"] == "prodigy"]
    assert len(prodigy) == 9 and {p["train.lr"] for p in prodigy} == {PRODIGY_LR}
    gpu, _ = for_hardware(tune_config("search.algorithm=grid", "trial.ray.use_gpu=true"))
    assert len(grid_points(gpu)) == 3 * 3 * (3 + 3 + 1)


def test_max_epochs_caps_trials_and_asha(tune_config):
    cfg = tune_config("search.max_epochs=3")
    assert with_rules({"train.epochs": 16}, cfg)["train.epochs"] == 3
    assert max_epochs(cfg) == 3
    assert max_epochs(tune_config()) == 16
    assert max_epochs(tune_config("search.algorithm=grid")) == 20


def test_trial_config_is_base_plus_overrides_with_the_trial_id(tune_config, tmp_path):
    cfg = tune_config()
    t = trial_config(cfg, {"lora.rank": 16, "train.lr": 3e-4}, trial_id="abc123", run_dir=str(tmp_path))
    assert t.lora.rank == 16 and t.train.lr == 3e-4 and t.train.batch_size == cfg.trial.train.batch_size
    assert t.run_name == "trial_abc123" and t.output_dir == f"{tmp_path}/trials/abc123"
    assert t.ray.checkpoint_every_n_epochs == 1
    with pytest.raises(ConfigError, match="lora.rank"):
        trial_config(cfg, {"lora.rank": 0}, trial_id="x", run_dir=str(tmp_path))
    name = trial_name("abc123", {"lora.rank": 16, "train.lr": 3.2e-4, "train.optimizer": "adamw"})
    assert name == "abc123 rank=16 lr=0.00032 optimizer=adamw"


def test_concurrency_is_cluster_resources_over_one_trials_workers(tune_config):
    assert max_concurrent(tune_config(), {"CPU": 2}) == 2
    assert max_concurrent(tune_config("trial.ray.num_workers=2"), {"CPU": 5}) == 2
    assert max_concurrent(tune_config("search.max_concurrent_trials=1"), {"CPU": 8}) == 1
    # a Serve replica of the first pipeline holds one of 2 CPUs: one trial at a time, never one that waits 60 s for
    # a worker and fails; with nothing free at all one still runs (the cluster holds it once that work ends)
    assert max_concurrent(tune_config(), {"CPU": 2}, {"CPU": 1}) == 1
    assert max_concurrent(tune_config(), {"CPU": 2}, {"CPU": 0.5}) == 1
    assert max_concurrent(tune_config(), {"CPU": 4}, {"CPU": 4}) == 4
    gpu = tune_config("trial.ray.use_gpu=true", "trial.ray.num_workers=2")
    assert max_concurrent(gpu, {"CPU": 16, "GPU": 4}) == 2
    with pytest.raises(PreflightError, match="Lower trial.ray.num_workers"):
        max_concurrent(tune_config("trial.ray.num_workers=4"), {"CPU": 2})
