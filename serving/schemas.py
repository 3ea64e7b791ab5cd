"""HTTP request and response bodies: the OpenAI images API plus lorafleet's few extra fields.

Static bounds live here (types, non-empty, positive); the configured limits (max n, steps, size) are checked
by the engine, which names the field in its error. Errors use OpenAI's body, so OpenAI clients show them:
``{"error": {"message": ..., "type": "invalid_request_error", "param": "n", "code": ...}}``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, GetJsonSchemaHandler, field_validator, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from serving.engine import ImageRequest

SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")
# OpenAI fields that mean nothing for a diffusion model; accepted so existing clients work, then ignored
OPENAI_IGNORED = ("quality", "style", "user", "background", "moderation", "output_compression", "partial_images")


# JSON-schema keys that describe a property rather than constrain its value (kept outside the nullable anyOf)
_ANNOTATIONS = ("title", "description", "default", "examples", "deprecated")


class RequestBody(BaseModel):
    """Base of every JSON request body: ``null`` for an optional field means "not given", so its default applies.

    OpenAI's API and its SDKs treat ``null`` this way (a client that fills every field of a request type sends
    ``"n": null`` for one it leaves unset), so each optional field of a subclass accepts ``null`` — here, in one
    place, for fields added later too — and the OpenAPI schema says so. A required field stays required: a ``null``
    prompt is refused naming ``prompt``. Unknown keys are refused (400 naming the key) as typos, not ignored.
    """

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def optional_keys(cls) -> frozenset[str]:
        """Every JSON key (field name or accepted alias) of a field that has a default."""
        keys: set[str] = set()
        for name, field in cls.model_fields.items():
            if field.is_required():
                continue
            keys.add(name)
            if isinstance(field.validation_alias, AliasChoices):
                keys.update(c for c in field.validation_alias.choices if isinstance(c, str))
            elif isinstance(field.validation_alias, str):
                keys.add(field.validation_alias)
        return frozenset(keys)

    @model_validator(mode="before")
    @classmethod
    def _null_means_not_given(cls, data: Any) -> Any:
        if isinstance(data, dict):
            optional = cls.optional_keys()
            return {k: v for k, v in data.items() if not (v is None and k in optional)}
        return data

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        """The OpenAPI schema shows what is accepted: each optional property also allows ``null``."""
        schema = handler(core_schema)
        target = handler.resolve_ref_schema(schema)
        properties = target.get("properties", {})
        for name, field in cls.model_fields.items():
            key = field.alias or name
            prop = properties.get(key)
            if prop is None or field.is_required():
                continue
            value = {k: v for k, v in prop.items() if k not in _ANNOTATIONS}
            if not value or {"type": "null"} in value.get("anyOf", ()) or value.get("type") == "null":
                continue  # anything (no constraint) or already nullable
            properties[key] = {k: v for k, v in prop.items() if k in _ANNOTATIONS} | {
                "anyOf": [value, {"type": "null"}]
            }
        return schema


class GenerationBody(RequestBody):
    """``POST /v1/images/generations``: OpenAI's images API body plus lorafleet's fields (``seed``, ``steps``,
    ``guidance``, ``negative_prompt``); ``steps`` and ``guidance`` also answer to diffusers' names
    ``num_inference_steps`` and ``guidance_scale``."""

    prompt: str = Field(..., min_length=1, description="what to draw; include the adapter's trigger word")
    model: str | None = Field(None, description="'base', an adapter name, <registered>@<alias> or <registered>/<n>")
    n: int = Field(1, ge=1, description="number of images (seeds seed, seed+1, ...)")
    size: str | None = Field(None, description="WIDTHxHEIGHT in pixels, e.g. '64x64'")
    response_format: Literal["b64_json", "url"] = Field(
        "b64_json",
        description="b64_json: images in the body (gpt-image-1's only form); url: a link on this server, valid for "
        "image_urls.ttl_s seconds (dall-e's default; the link needs the same API key)",
    )
    output_format: Literal["png"] = Field("png", description="images are PNG")
    stream: Literal[False] = Field(False, description="streaming is not supported")
    seed: int | None = Field(None, ge=0, description="lorafleet: reproducible images; omitted = random (returned)")
    steps: int | None = Field(
        None,
        ge=1,
        validation_alias=AliasChoices("steps", "num_inference_steps"),
        description="lorafleet: denoising steps (diffusers' num_inference_steps)",
    )
    guidance: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        validation_alias=AliasChoices("guidance", "guidance_scale"),
        description="lorafleet: classifier-free guidance scale (diffusers' guidance_scale)",
    )
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
    """One image, as OpenAI's ``Image``: ``b64_json`` or ``url`` (by ``response_format``), plus its seed."""

    b64_json: str | None = Field(None, description="the PNG, base64 (response_format b64_json)")
    url: str | None = Field(None, description="where to GET the PNG, with the API key (response_format url)")
    expires_at: int | None = Field(None, description="unix time after which `url` answers 404")
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
    415: "invalid_request_error",
    422: "invalid_request_error",
    503: "server_busy",
    507: "server_error",
    504: "timeout",
}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {
        "error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param, "code": status}
    }
