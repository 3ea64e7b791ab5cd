"""The batch runner's home: a one-replica Ray Serve deployment next to the generator replicas.

Why a deployment of its own and not a task of the ingress (as the fine-tuning poller is): the runner keeps up to
``batches.max_in_flight_per_replica`` × replicas requests waiting on the generators for as long as they take, which
would sit on the ingress replicas' event loops and ``max_ongoing_requests``; here it is unaffected by a slow or
restarting ingress, there is exactly one runner however many ingress replicas there are, and Ray restarts it (it
resumes from disk: ``serving.batches.store``) when its health check finds the runner's task ended. The ingress only
writes batch records and cancel markers and calls ``wake`` so a new batch starts without waiting for the next poll.
"""

from __future__ import annotations

import asyncio
import contextlib

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from serving.batches.runner import BatchRunner, batch_room, send_with
from serving.batches.store import BatchStore
from serving.config import ServeArgs
from serving.feedback_routes import FeedbackRoutes
from serving.image_request import ImageRequest
from serving.uploads.store import FileStore

GONE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, BackPressureError)


def runner_concurrency(args: ServeArgs) -> int:
    """Batch requests out at once: ``batch_room`` × generator replicas (autoscaling: its ``max_replicas``); replicas
    refuse what they have no batch room for, so this only bounds the runner's tasks."""
    d = args.deployment
    replicas = (
        d.num_replicas if isinstance(d.num_replicas, int) else int((d.autoscaling_config or {}).get("max_replicas", 1))
    )
    return batch_room(args) * max(1, replicas)


@serve.deployment(num_replicas=1, max_ongoing_requests=100, ray_actor_options={"num_cpus": 0}, health_check_period_s=10)
class BatchWorker:
    """Runs ``BatchRunner.run_forever`` on the replica's event loop, sending through the generator's handle."""

    def __init__(self, generator: DeploymentHandle, args: ServeArgs | dict, feedback: DeploymentHandle | None = None):
        self.args = ServeArgs.model_validate(args)
        cfg = self.args.batches
        files = FileStore(self.args.files)
        store = BatchStore(files.root / "batches", cfg.completion_window_s)
        # the images' ids go to the Feedback store as the ingress sends them (in the background), so a batch's
        # images can be rated with POST /v1/feedback like interactive ones
        self.notices = FeedbackRoutes(self.args.feedback, feedback, self.args.deployment.retry_after_s)

        async def generate(request: ImageRequest) -> dict:
            out = await generator.generate.remote(request, 0, "batch")
            if isinstance(out, dict) and "error" not in out and request.tenant is not None:
                self.notices.notice(request.tenant.name, out)
            return out

        send = send_with(generate, GONE)
        self.runner = BatchRunner(
            store, files, cfg, send, runner_concurrency(self.args), base_model=self.args.base_model
        )
        self.task = asyncio.get_running_loop().create_task(self.runner.run_forever())

    async def wake(self) -> None:
        """Look for new or cancelled batches now."""
        self.runner.wake()

    async def check_health(self) -> None:
        """Serve's health check: a runner task that ended (it never should) restarts the replica, which resumes."""
        if self.task.done():
            raise RuntimeError(
                f"the batch runner stopped: {self.task.exception() if not self.task.cancelled() else 'cancelled'}"
            )

    def __del__(self):
        """Serve's graceful shutdown: stop the runner before the event loop's executor goes (its next look at the
        disk would fail with "cannot schedule new futures after shutdown"); what ran is on disk, a new replica
        resumes."""
        task = getattr(self, "task", None)
        if task is not None and not task.done():
            with contextlib.suppress(RuntimeError):  # the loop is already closed: nothing runs any more
                task.get_loop().call_soon_threadsafe(task.cancel)
