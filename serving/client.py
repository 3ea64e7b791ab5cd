"""Python client for a lorafleet server (the OpenAI-compatible images route).

    from serving.client import Client

    with Client("http://127.0.0.1:8000", api_key=None) as client:
        images = client.generate("a red circle on a sks background", adapter="champion", n=2, seed=0)
        images[0].save("circle.png")           # PIL images; image.info has seed, model, version and image_id
        client.feedback(images[0], +1)         # rate it (thumbs: -1/+1, stars: 1-5; GET /v1/feedback says which)
        print(client.models(), client.health())

Fine-tuning (OpenAI's files and fine-tuning jobs API; ``serving.client_files``, ``serving.client_jobs``):

        file = client.upload("data/toy-sks")             # a folder (packed and streamed) or a zip/tar as it is
        job = client.fine_tune(file.id, suffix="my-style", hyperparameters={"n_epochs": 16}, trigger="sks")
        job.wait()                                      # tqdm bar + events; raises JobFailed (the gate's reasons)
        client.generate("a red circle on a sks background", adapter=job.fine_tuned_model)

``AsyncClient`` has the same methods as coroutines. 503/408/504 answers and refused connections are retried
with jittered exponential backoff (at least the server's ``Retry-After``); what is left raises a typed error
carrying the server's message: ``BadRequest`` (400/422), ``Unauthorized`` (401), ``NotFound`` (404),
``ServerBusy`` (503/408/504 after the retries), ``RateLimited`` (429, not retried), ``ServerError`` (other 5xx).

Image ids: each image ``generate`` returns carries its id, the one ``feedback`` takes, as
``image.info["image_id"]`` (from the response's ``data[i].id``) and ``image.info["lorafleet:image_id"]`` (the PNG's
own text chunk, which Pillow reads). The PNG bytes the server sent keep the id in a file (``curl -o``); Pillow's
``image.save`` writes no text chunk unless asked: ``image.save(path, pnginfo=serving.images.png_text({PNG_KEY:
image.info["image_id"]}))``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
from PIL import Image

from serving.client_errors import (
    RETRY_STATUS,
    RETRYABLE,
    BadRequest,
    LorafleetError,
    NotFound,
    RateLimited,
    ServerBusy,
    ServerError,
    Unauthorized,
    error_from,
)
from serving.client_files import Body, File, upload_body
from serving.client_jobs import AsyncJob, Job, JobCancelled, JobError, JobFailed, JobTimeout
from serving.images import PNG_KEY, from_b64

__all__ = ["AsyncClient", "AsyncJob", "BadRequest", "Client", "File", "Job", "JobCancelled", "JobError", "JobFailed",
           "JobTimeout", "LorafleetError", "NotFound", "RateLimited", "ServerBusy", "ServerError",
           "Unauthorized"]  # fmt: skip
JOBS = "/v1/fine_tuning/jobs"


def _given(**params: Any) -> dict:
    return {k: v for k, v in params.items() if v is not None}


class _Base:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 120.0,
        retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
    ):
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout, self.retries, self.backoff_s, self.max_backoff_s = timeout, retries, backoff_s, max_backoff_s

    @staticmethod
    def _payload(prompt: str, adapter: str | None, n: int, seed: int | None, **extra: Any) -> dict:
        body = {"prompt": prompt, "n": n, "response_format": "b64_json"}
        if adapter is not None:
            body["model"] = adapter
        if seed is not None:
            body["seed"] = seed
        size = extra.pop("size", None)
        if size is not None:
            body["size"] = f"{size}x{size}" if isinstance(size, int) else size
        body.update({k: v for k, v in extra.items() if v is not None})
        return body

    @staticmethod
    def _job_body(training_file: str | File, model: str, **fields: Any) -> dict:
        """``POST /v1/fine_tuning/jobs``' body; None values are left out (the server's defaults)."""
        file_id = training_file.id if isinstance(training_file, File) else training_file
        validation = fields.get("validation_file")
        if isinstance(validation, File):
            fields["validation_file"] = validation.id
        return {"training_file": file_id, "model": model} | {k: v for k, v in fields.items() if v is not None}

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Full-jitter exponential backoff, never shorter than the server's Retry-After."""
        cap = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        delay = random.uniform(cap / 2, cap)
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after and retry_after.isdigit():
            delay = max(delay, float(retry_after) * random.uniform(1.0, 1.5))
        return delay

    @staticmethod
    def _images(response: httpx.Response) -> list[Image.Image]:
        body = response.json()
        images = []
        for item in body["data"]:
            image = from_b64(item["b64_json"])
            image.info.update(
                seed=item.get("seed"), model=body.get("model"), version=body.get("version"), arm=body.get("arm")
            )
            image.info["image_id"] = item.get("id") or image.info.get(PNG_KEY)
            images.append(image)
        return images

    @staticmethod
    def _feedback_body(image: str | Image.Image, rating: int, comment: str | None) -> dict:
        """``POST /v1/feedback``'s body; ``image``: an id, or an image ``generate`` returned (its id read from it).

        Raises:
            ValueError: an image without an id (not one this server drew, or one saved without its PNG text).
        """
        if isinstance(image, Image.Image):
            image_id = image.info.get("image_id") or image.info.get(PNG_KEY)
            if not image_id:
                raise ValueError(
                    f"this image carries no id (image.info has no 'image_id' or {PNG_KEY!r}): rate an image "
                    "generate() returned, or pass its id; Pillow's image.save() drops the id unless given "
                    "pnginfo=serving.images.png_text({'lorafleet:image_id': image.info['image_id']})"
                )
        else:
            image_id = image
        return {"image_id": image_id, "rating": rating} | ({"comment": comment} if comment is not None else {})

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = response.text
            raise error_from(response.status_code, body, response.headers.get("retry-after"))
        return response

    def _final(self, attempt: int, response: httpx.Response | None, exc: Exception | None) -> httpx.Response | None:
        """The checked response when attempt ``attempt`` ends the call, None when it should be retried.

        Raises:
            LorafleetError: the typed error of the final answer (``ServerBusy`` when the server stayed away).
        """
        if attempt < self.retries and (exc is not None or response.status_code in RETRY_STATUS):
            return None
        if exc is not None:
            raise ServerBusy(503, f"cannot reach {self.base_url}: {exc}") from exc
        return self._check(response)


class Client(_Base):
    """Blocking client; use as a context manager or call ``close()``."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
        **kwargs: Any,
    ):
        super().__init__(base_url, api_key, **kwargs)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )

    def _request(self, method: str, path: str, body: Body | None = None, **kwargs: Any) -> httpx.Response:
        for attempt in itertools.count():
            response, exc = None, None
            if body is not None:  # a streamed body starts over on each attempt
                kwargs |= {"headers": body.headers, "content": body.chunks()}
            try:
                response = self._http.request(method, path, **kwargs)
            except RETRYABLE as e:
                exc = e
            if (final := self._final(attempt, response, exc)) is not None:
                return final
            time.sleep(self._delay(attempt, response))
        raise AssertionError("unreachable")

    def generate(
        self,
        prompt: str,
        adapter: str | None = None,
        n: int = 1,
        seed: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        size: int | str | None = None,
        negative_prompt: str | None = None,
    ) -> list[Image.Image]:
        """``n`` images for ``prompt`` from ``adapter`` (None: the server's default, 'base': no adapter)."""
        body = self._payload(
            prompt, adapter, n, seed, steps=steps, guidance=guidance, size=size, negative_prompt=negative_prompt
        )
        # one id for every retry of this call: the server's canary sends them all to the same arm (serving/canary.py)
        headers = {"X-Request-Id": uuid.uuid4().hex}
        return self._images(self._request("POST", "/v1/images/generations", json=body, headers=headers))

    def models(self) -> list[dict]:
        return self._request("GET", "/v1/models").json()["data"]

    def feedback(self, image: str | Image.Image, rating: int, comment: str | None = None) -> dict:
        """Rate a generated image (``POST /v1/feedback``); rating it again replaces the earlier rating.

        Args:
            image: its id (``img_…``), or an image ``generate`` returned (the id is read from ``image.info``).
            rating: -1 or 1 on the thumbs scale, 1 to 5 on the stars scale (``GET /v1/feedback`` says which).
            comment: optional text (at most the server's ``feedback.max_comment_chars`` characters).

        Returns:
            The stored rating: ``{"object": "feedback", "image_id", "rating", "comment", "model", "version",
            "created", "replaced"}``.

        Raises:
            BadRequest: the rating is off the scale, the comment too long, or the id is not an image id.
            NotFound: no such image for this API key (unknown, expired, or another tenant's).
            RateLimited: more ratings per minute than the server takes (``retry_after`` seconds).
            ValueError: ``image`` is a PIL image without an id.
        """
        return self._request("POST", "/v1/feedback", json=self._feedback_body(image, rating, comment)).json()

    def reload(self) -> dict:
        """Make every replica look the champion up in the registry now (``POST /admin/reload``)."""
        return self._request("POST", "/admin/reload").json()

    def health(self) -> dict:
        """``{"live": bool, "ready": bool}`` without retries."""
        try:
            live = self._http.get("/healthz").status_code == 200
            ready = live and self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            live = ready = False
        return {"live": live, "ready": ready}

    # ---- files and fine-tuning jobs (OpenAI's shapes) -------------------------------------------------------------
    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One call's JSON answer, retried like every call (``httpx`` keyword arguments: ``json``, ``params``)."""
        return self._request(method, path, **kwargs).json()

    def paginate(self, path: str, **params: Any) -> Iterator[dict]:
        """Every item of an OpenAI list route, fetching the next page (``after`` = the last id) as it goes."""
        while True:
            page = self.request("GET", path, params=params)
            yield from page["data"]
            if not page.get("has_more") or not page["data"]:
                return
            params["after"] = page["data"][-1]["id"]

    def upload(self, path: str | os.PathLike, purpose: str = "fine-tune") -> File:
        """Upload a dataset: a folder (packed into a tar as it is sent) or a zip/tar file (sent as it is).

        Raises:
            BadRequest: the server rejected the dataset (``details["problems"]``: every problem, by file).
            FileNotFoundError, ValueError: no such path; a folder with nothing to send.
        """
        return File.from_dict(self.request("POST", "/v1/files", body=upload_body(path, purpose)))

    def files(self, purpose: str | None = None) -> list[File]:
        """Your uploaded files, newest first."""
        return [File.from_dict(f) for f in self.request("GET", "/v1/files", params=_given(purpose=purpose))["data"]]

    def file(self, file_id: str) -> File:
        return File.from_dict(self.request("GET", f"/v1/files/{file_id}"))

    def delete_file(self, file_id: str) -> bool:
        """Delete an upload (jobs already created keep their copy of it); True when deleted."""
        return self.request("DELETE", f"/v1/files/{file_id}")["deleted"]

    def fine_tune(
        self,
        training_file: str | File,
        model: str = "base",
        suffix: str | None = None,
        hyperparameters: dict | None = None,
        seed: int | None = None,
        trigger: str | None = None,
        validation_file: str | File | None = None,
        **extras: Any,
    ) -> Job:
        """Start a fine-tuning job (``POST /v1/fine_tuning/jobs``; ``extras``: more lorafleet fields, e.g.
        ``metadata``). ``hyperparameters``: ``n_epochs``, ``learning_rate_multiplier``, ``batch_size``, ``rank``,
        ``optimizer`` — each a value or ``"auto"`` (searched). Raises BadRequest / NotFound naming the field."""
        body = self._job_body(training_file, model, suffix=suffix, hyperparameters=hyperparameters, seed=seed,
                              trigger=trigger, validation_file=validation_file, **extras)  # fmt: skip
        return Job(self, self.request("POST", JOBS, json=body))

    def job(self, job_id: str) -> Job:
        return Job(self, self.request("GET", f"{JOBS}/{job_id}"))

    def jobs(self) -> list[Job]:
        """All your fine-tuning jobs, newest first (every page)."""
        return [Job(self, j) for j in self.paginate(JOBS, limit=100)]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """``asyncio`` client: ``async with AsyncClient(url) as c: images = await c.generate(...)``."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        **kwargs: Any,
    ):
        super().__init__(base_url, api_key, **kwargs)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )

    async def _request(self, method: str, path: str, body: Body | None = None, **kwargs: Any) -> httpx.Response:
        for attempt in itertools.count():
            response, exc = None, None
            if body is not None:
                kwargs |= {"headers": body.headers, "content": body.achunks()}
            try:
                response = await self._http.request(method, path, **kwargs)
            except RETRYABLE as e:
                exc = e
            if (final := self._final(attempt, response, exc)) is not None:
                return final
            await asyncio.sleep(self._delay(attempt, response))
        raise AssertionError("unreachable")

    async def generate(
        self,
        prompt: str,
        adapter: str | None = None,
        n: int = 1,
        seed: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        size: int | str | None = None,
        negative_prompt: str | None = None,
    ) -> list[Image.Image]:
        body = self._payload(
            prompt, adapter, n, seed, steps=steps, guidance=guidance, size=size, negative_prompt=negative_prompt
        )
        headers = {"X-Request-Id": uuid.uuid4().hex}  # one id for every retry: the same canary arm
        return self._images(await self._request("POST", "/v1/images/generations", json=body, headers=headers))

    async def models(self) -> list[dict]:
        return (await self._request("GET", "/v1/models")).json()["data"]

    async def feedback(self, image: str | Image.Image, rating: int, comment: str | None = None) -> dict:
        """Rate a generated image (``POST /v1/feedback``): ``Client.feedback``'s twin."""
        body = self._feedback_body(image, rating, comment)
        return (await self._request("POST", "/v1/feedback", json=body)).json()

    async def reload(self) -> dict:
        return (await self._request("POST", "/admin/reload")).json()

    async def health(self) -> dict:
        try:
            live = (await self._http.get("/healthz")).status_code == 200
            ready = live and (await self._http.get("/readyz")).status_code == 200
        except httpx.HTTPError:
            live = ready = False
        return {"live": live, "ready": ready}

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        return (await self._request(method, path, **kwargs)).json()

    async def paginate(self, path: str, **params: Any) -> AsyncIterator[dict]:
        while True:
            page = await self.request("GET", path, params=params)
            for item in page["data"]:
                yield item
            if not page.get("has_more") or not page["data"]:
                return
            params["after"] = page["data"][-1]["id"]

    async def upload(self, path: str | os.PathLike, purpose: str = "fine-tune") -> File:
        return File.from_dict(await self.request("POST", "/v1/files", body=upload_body(path, purpose)))

    async def files(self, purpose: str | None = None) -> list[File]:
        return [
            File.from_dict(f) for f in (await self.request("GET", "/v1/files", params=_given(purpose=purpose)))["data"]
        ]

    async def file(self, file_id: str) -> File:
        return File.from_dict(await self.request("GET", f"/v1/files/{file_id}"))

    async def delete_file(self, file_id: str) -> bool:
        return (await self.request("DELETE", f"/v1/files/{file_id}"))["deleted"]

    async def fine_tune(
        self,
        training_file: str | File,
        model: str = "base",
        suffix: str | None = None,
        hyperparameters: dict | None = None,
        seed: int | None = None,
        trigger: str | None = None,
        validation_file: str | File | None = None,
        **extras: Any,
    ) -> AsyncJob:
        body = self._job_body(training_file, model, suffix=suffix, hyperparameters=hyperparameters, seed=seed,
                              trigger=trigger, validation_file=validation_file, **extras)  # fmt: skip
        return AsyncJob(self, await self.request("POST", JOBS, json=body))

    async def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, await self.request("GET", f"{JOBS}/{job_id}"))

    async def jobs(self) -> list[AsyncJob]:
        return [AsyncJob(self, j) async for j in self.paginate(JOBS, limit=100)]

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
