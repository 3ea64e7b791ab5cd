"""The one-replica deployments every ingress replica shares: ``ImageUrls`` (the images of ``response_format:
"url"``) and ``Feedback`` (the ratings of generated images).

They hold state in one place (why one replica: serving/image_store.py) and do no generation, so this module imports
neither torch nor diffusers: each replica is a small process (serving/app.py builds the app around them).
"""

import logging
import threading

from ray import serve

from serving.config import ServeArgs
from serving.feedback import FeedbackError, FeedbackStore
from serving.image_store import ImageStore, ImageStoreFull
from serving.records import MlflowSink, rating_rows

log = logging.getLogger("ray.serve")


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class ImageUrls:
    """The images of ``response_format: "url"`` for every ingress replica (one replica; why one, in
    serving/image_store.py): ``put`` keeps one request's PNGs, ``get`` reads one back or None — also for an image
    of another ``owner`` (tenant)."""

    def __init__(self, image_urls: dict):
        self.store = ImageStore(**image_urls)

    def put(self, pngs: list[bytes], owner: str | None = None) -> dict:
        """``{"images": [(id, expires_at unix s), ...]}``, or ``{"error": message}`` when they cannot fit."""
        try:
            return {"images": [(s.id, s.expires_at) for s in self.store.put(pngs, owner)]}
        except ImageStoreFull as exc:
            return {"error": str(exc)}

    def get(self, image_id: str, owner: str | None = None) -> bytes | None:
        return self.store.get(image_id, owner)

    def stats(self) -> dict:
        return self.store.stats()


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class Feedback:
    """The ratings of generated images for every ingress replica (one replica, as ``ImageUrls``; the logic and
    its rules are serving/feedback.py's ``FeedbackStore``)."""

    def __init__(self, feedback: dict, serve_args: dict | None = None):
        from serving.config import FeedbackArgs, workdir_path

        a = FeedbackArgs.model_validate(feedback)
        self.store = FeedbackStore(workdir_path(a.root), a.scale, a.ttl_s, a.max_images, a.max_comment_chars,
                                   a.max_per_minute)  # fmt: skip
        # the ratings per model version go to MLflow next to the replicas' production summaries (serving/records.py):
        # this one store writes them, every records.summary_every_s, on a thread of its own (never on a request)
        self._stop, self.sink, self._step, self._thread = threading.Event(), None, 0, None
        args = ServeArgs.model_validate(serve_args) if serve_args is not None else None
        uri = args and args.records.enabled and (args.records.tracking_uri or args.resolved_tracking_uri())
        if uri and args.records.summary_every_s > 0:  # 0: no summaries
            self.sink = MlflowSink(uri, args.records.experiment)
            every = args.records.summary_every_s
            self._thread = threading.Thread(target=self._summaries, args=(every,), daemon=True, name="rating-summaries")
            self._thread.start()

    def summarize_ratings(self) -> int:
        """Log the current ratings as summary metrics (``records.rating_rows``); returns the rows written.
        Raises whatever MLflow raises."""
        rows = rating_rows(self.store.summary())
        if rows and self.sink is not None:
            self.sink.summarize(rows, self._step)
            self._step += 1
        return len(rows)

    def _summaries(self, every_s: float) -> None:
        """Every ``every_s``; once stopped, the last ratings and then ``finish`` (the summary runs end FINISHED) —
        on this one thread, so no two calls share the sink."""
        while not self._stop.wait(every_s):
            self._logged(self.summarize_ratings, "rating summaries to MLflow failed")
        self._logged(lambda: (self.summarize_ratings(), self.sink.finish()), "last rating summary to MLflow failed")

    @staticmethod
    def _logged(fn, what: str) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - the next period tries again; the ratings stay on disk
            log.warning("%s: %s", what, str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)

    def __del__(self):
        stop, thread = getattr(self, "_stop", None), getattr(self, "_thread", None)
        if stop is not None:
            stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)  # within Serve's graceful shutdown; a hung MLflow leaves the runs RUNNING

    def register(self, tenant: str, model: str, version: str | None, image_ids: list[str]) -> int:
        return self.store.register(tenant, model, version, image_ids)

    def rate(self, tenant: str, image_id: str, rating: int, comment: str | None = None) -> dict:
        """The stored rating, or ``{"error": {status, message, param, retry_after}}`` (FeedbackError's)."""
        try:
            return self.store.rate(tenant, image_id, rating, comment)
        except FeedbackError as exc:
            return exc.as_dict()

    def summary(self) -> dict:
        return self.store.summary()

    def stats(self) -> dict:
        return self.store.stats()
