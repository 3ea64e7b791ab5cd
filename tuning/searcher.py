"""``OptunaSearch`` on a study that outlives the driver (the study DB under the run folder)."""

from __future__ import annotations

import logging

import optuna
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

log = logging.getLogger(__name__)
MAX_REDRAWS = 50  # suggestions in a row that repeat a finished trial before the space counts as exhausted


class StudySearch(OptunaSearch):
    """Two additions to ``OptunaSearch``:

    - A suggestion that repeats a finished trial's values (TPE and random sampling do that on
      categorical spaces) is not run again: the study is told the known value and asked anew
      (Optuna's FAQ recipe for duplicates). When ``MAX_REDRAWS`` suggestions in a row repeat,
      the space is exhausted and the search ends.
    - A trial that finished in the study DB but not in Tune's last experiment snapshot is rerun
      by ``Tuner.restore``; its repeated report must not end the search (Optuna refuses to
      update a finished trial, and ``on_trial_complete`` already only warns).
    """

    def suggest(self, trial_id: str) -> dict | None:
        for _ in range(MAX_REDRAWS):
            config = super().suggest(trial_id)
            ot_trial = self._ot_trials[trial_id]
            known = self._finished_value(ot_trial.params, ot_trial.number)
            if known is None:
                return config
            log.info("suggestion %s repeats a finished trial (value %s); asking again", ot_trial.params, known)
            self._ot_study.tell(ot_trial, known)
            del self._ot_trials[trial_id]
        log.warning("the last %d suggestions all repeated finished trials: the space is exhausted", MAX_REDRAWS)
        return Searcher.FINISHED

    def _finished_value(self, params: dict, number: int) -> float | None:
        for t in self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if t.number != number and t.params == params:
                return t.value
        return None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            log.info("trial %s already finished in the study; its repeated result is not recorded again", trial_id)
