"""``OptunaSearch`` on a study that outlives the driver (the study DB under the run folder)."""

from __future__ import annotations

import logging

import optuna
from ray.tune.search.optuna import OptunaSearch

log = logging.getLogger(__name__)


class StudySearch(OptunaSearch):
    """A trial that finished in the study DB but not in Tune's last experiment snapshot is rerun by
    ``Tuner.restore``; its repeated report must not end the search (Optuna refuses to update a
    finished trial, and ``on_trial_complete`` already only warns)."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            log.info("trial %s already finished in the study; its repeated result is not recorded again", trial_id)
