"""The fine-tuning queue's submitter on a Ray cluster: ``serving.finetune.queue.Submitter`` over ``cluster.jobs.Jobs``.

The Serve app names it in ``finetune.submitter`` (``cluster.finetune:RaySubmitter``) and builds it on its first poll:
``serving`` never imports ``cluster`` (the lower floor defines the interface, this file implements it). Each job is
``python -m cluster.pipeline --config <finetune.pipeline_config> <the job's overrides>`` submitted with the job's id
as its submission id, so Ray itself refuses to run a job twice.
"""

from __future__ import annotations

import logging
import math

from cluster.jobs import JobError, Jobs
from serving.config import project_path

log = logging.getLogger(__name__)


class RaySubmitter:
    """Args: the ``finetune`` settings the Serve app passes (see ``serving.config.FineTuneArgs``)."""

    def __init__(self, address: str | None, tracking_uri: str | None, config: str, cpus_per_job: float,
                 gpus_per_job: float):  # fmt: skip
        self.jobs = Jobs(address, tracking_uri)
        self.config = project_path(config)
        self.cpus_per_job, self.gpus_per_job = cpus_per_job, gpus_per_job

    def submit(self, job_id: str, overrides: list[str]) -> str:
        """Submit the pipeline as Ray job ``job_id``; a job already submitted under that id (another ingress
        replica, or a poll cut short by a restart) is taken as submitted.

        Raises:
            training.configuration.ConfigError: the job's config is invalid (nothing was submitted).
            cluster.jobs.JobError: the submission failed.
        """
        try:
            return self.jobs.submit("pipeline", self.config, overrides, submission_id=job_id)
        except JobError as exc:
            if "already exists" in str(exc):
                return job_id
            raise

    def status(self, submission_id: str) -> str:
        return self.jobs.status(submission_id)

    def stop(self, submission_id: str) -> None:
        self.jobs.stop(submission_id)

    def capacity(self) -> int:
        """Cluster GPUs ÷ GPUs per job, else CPUs ÷ CPUs per job; at least 1."""
        import ray

        if not ray.is_initialized():
            return 1
        total = ray.cluster_resources()
        if total.get("GPU", 0) >= self.gpus_per_job:
            return max(1, math.floor(total["GPU"] / self.gpus_per_job))
        return max(1, math.floor(total.get("CPU", 1) / self.cpus_per_job))
