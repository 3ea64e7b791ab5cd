"""StudySearch (no cluster): repeated suggestions are answered from the study, not run again."""

from __future__ import annotations

import optuna
from ray.tune.search import Searcher

from tuning.searcher import StudySearch
from tuning.space import OptunaSpace


def test_a_repeated_suggestion_is_not_run_again_and_an_exhausted_space_ends(tune_config):
    cfg = tune_config(
        "space={lora.rank: {type: choice, values: [4, 8]}, train.optimizer: {type: choice, values: [adamw]}}"
    )
    search = StudySearch(
        space=OptunaSpace(cfg), metric="val_loss", mode="min", sampler=optuna.samplers.RandomSampler(seed=0)
    )
    seen = []
    for i in range(2):
        config = search.suggest(f"t{i}")
        assert config not in seen  # only new configurations become trials
        seen.append(config)
        search.on_trial_complete(f"t{i}", {"val_loss": 0.5 - i / 10})
    assert {c["lora.rank"] for c in seen} == {4, 8}
    assert search.suggest("t2") == Searcher.FINISHED  # both configurations are known
    study = search._ot_study
    repeats = [t for t in study.trials if t.number >= 2]
    assert repeats and all(t.value in (0.5, 0.4) for t in repeats)  # told the known values
