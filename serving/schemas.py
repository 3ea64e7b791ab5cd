"""HTTP request and response bodies: the OpenAI images API plus lorafleet's few extra fields.

Static bounds live here (types, non-empty, positive); the configured limits (max n, steps, size) are checked
by the engine, which names the field in its error. Errors use OpenAI's body, so OpenAI clients show them:
``{"error": {"message": ..., "type": "invalid_request_error", "param": "n", "code": ...}}``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serving.engine import ImageRequest

SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")
# OpenAI fields that mean nothing for a diffusion model; accepted so existing clients work, then ignored
OPENAI_IGNORED = ("quality", "style", "user", "background", "moderation", "output_compression", "partial_images")


class GenerationBody(BaseModel):
    """``POST /v1/images/generations``."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, description="what to draw; include the adapter's trigger word")
    model: str | None = Field(None, description="'base', an adapter name, <registered>@<alias> or <registered>/<n>")
    n: int = Field(1, ge=1, description="number of images (seeds seed, seed+1, ...)")
    size: str | None = Field(None, description="WIDTHxHEIGHT in pixels, e.g. '64x64'")
    response_format: Literal["b64_json"] = Field("b64_json", description="only b64_json: images come in the body")
    output_format: Literal["png"] = Field("png", description="images are PNG")
    stream: Literal[False] = Field(False, description="streaming is not supported")
    seed: int | None = Field(None, ge=0, description="lorafleet: reproducible images; omitted = random (returned)")
    steps: int | None = Field(None, ge=1, description="lorafleet: denoising steps")
    guidance: float | None = Field(None, ge=0, allow_inf_nan=False, description="lorafleet: guidance scale")
    negative_prompt: str = Field("", description="lorafleet: what to steer away from")
    quality: Any = None
    style: Any = None
    user: Any = None
    background: Any = None
    moderation: Any = None
    output_compression: Any = None
    partial_images: Any = None

    @field_validator("size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None and value != "auto" and not SIZE.match(value):
            raise ValueError("write the size as WIDTHxHEIGHT, e.g. 64x64")
        return value

    def to_request(self) -> ImageRequest:
        width = height = None
        if self.size and self.size != "auto":
            width, height = (int(v) for v in self.size.split("x"))
        return ImageRequest(
            prompt=self.prompt,
            model=self.model,
            n=self.n,
            seed=self.seed,
            steps=self.steps,
            guidance=self.guidance,
            negative_prompt=self.negative_prompt,
            width=width,
            height=height,
        )


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None
    seed: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    model: str
    version: str | None = Field(None, description="registry version of the adapter that drew the images")
    output_format: Literal["png"] = "png"
    size: str


class ModelCard(BaseModel):
    """One name a client may send as ``model``; registry fields say which registered version it serves."""

    id: str = Field(description="the name to send as `model`")
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "lorafleet"
    kind: Literal["base", "adapter", "registry"] = Field(
        "adapter", description="base model, a name from the config (the champion too), or a registry name"
    )
    ref: str | None = Field(None, description="base model, or the adapter reference the name stands for")
    registered_model: str | None = Field(None, description="the MLflow registered model (one per dataset)")
    version: str | None = Field(None, description="registry version it serves")
    aliases: list[str] = Field(default_factory=list, description="every alias that version holds")
    status: str | None = Field(None, description="the gate's validation_status of that version (passed, ...)")
    loaded: bool = Field(False, description="its adapter is in a replica's memory now")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    408: "timeout",
    413: "invalid_request_error",
    422: "invalid_request_error",
    503: "server_busy",
    504: "timeout",
}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {
        "error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param, "code": status}
    }
