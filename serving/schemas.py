"""HTTP request and response bodies: the OpenAI images API plus lorafleet's few extra fields.

Static bounds live here (types, non-empty, positive); the configured limits (max n, steps, size) are checked
by the engine, which names the field in its error. Errors use OpenAI's body, so OpenAI clients show them:
``{"error": {"message": ..., "type": "invalid_request_error", "param": "n", "code": ...}}``.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

from serving.image_request import ImageRequest
from serving.tenants import Tenant

SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})\Z")  # \Z: "$" would let a trailing newline through
# OpenAI fields that mean nothing for a diffusion model; accepted so existing clients work, then ignored
OPENAI_IGNORED = ("quality", "style", "user", "background", "moderation", "output_compression", "partial_images")


# JSON-schema keys that describe a property rather than constrain its value (kept outside the nullable anyOf)
_ANNOTATIONS = ("title", "description", "default", "examples", "deprecated")


def _is_number(annotation: Any) -> bool:
    """``int``, ``float`` or either of them ``| None`` (or ``| Literal["auto"]``), constrained or not."""
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) is typing.Annotated:  # e.g. Annotated[int, Field(ge=1)] | Literal["auto"]
        return _is_number(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_number(a) for a in typing.get_args(annotation) if a is not type(None))
    return False


class Params(BaseModel):
    """The rules every set of request parameters follows, whether it comes as a JSON body or a query string.

    - unknown keys are refused (400 naming the key) as typos, not ignored;
    - a field that answers to two names (``steps`` / ``num_inference_steps``) is given under one of them: both
      at once is a 400 naming them (which one should win is not guessable);
    - a JSON boolean is not a number: ``"n": true`` is a 400 naming ``n``, not one image (pydantic's lax mode
      would take it as 1). Integral floats (``"n": 2.0``) and numeric strings (``"seed": "7"``) stay accepted as
      pydantic's lax mode reads them; ``2.5`` for an integer field is refused.
    """

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def field_keys(cls, name: str) -> tuple[str, ...]:
        """The keys a field is accepted under: its name, or each of its ``AliasChoices``."""
        alias = cls.model_fields[name].validation_alias
        if isinstance(alias, AliasChoices):
            return tuple(c for c in alias.choices if isinstance(c, str))
        return (alias,) if isinstance(alias, str) else (name,)

    @classmethod
    def optional_keys(cls) -> frozenset[str]:
        """Every key (field name or accepted alias) of a field that has a default."""
        return frozenset(k for name, f in cls.model_fields.items() if not f.is_required() for k in cls.field_keys(name))

    @classmethod
    def _not_given(cls, value: Any) -> bool:
        """Whether a value for an optional key means "not given" (subclasses: JSON null, an empty query value)."""
        return False

    @model_validator(mode="before")
    @classmethod
    def _one_key_per_field(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        optional = cls.optional_keys()
        data = {k: v for k, v in data.items() if not (k in optional and cls._not_given(v))}
        for name in cls.model_fields:
            given = [k for k in cls.field_keys(name) if k in data]
            if len(given) > 1:
                raise PydanticCustomError(
                    "one_key_per_field",
                    "{keys} are the same field: give one of them, not both",
                    {"field": given[0], "keys": " / ".join(given)},
                )
        return data

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name and _is_number(cls.model_fields[info.field_name].annotation):
            raise PydanticCustomError(
                "bool_not_number", "is a JSON boolean ({value}); send a number", {"value": str(value).lower()}
            )
        return value


class RequestBody(Params):
    """Base of every JSON request body: ``null`` for an optional field means "not given", so its default applies.

    OpenAI's API and its SDKs treat ``null`` this way (a client that fills every field of a request type sends
    ``"n": null`` for one it leaves unset), so each optional field of a subclass accepts ``null`` — here, in one
    place, for fields added later too — and the OpenAPI schema says so. A required field stays required: a ``null``
    prompt is refused naming ``prompt``. The rules of ``Params`` apply too.
    """

    @classmethod
    def _not_given(cls, value: Any) -> bool:
        return value is None

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


def check_size(value: str | None) -> str | None:
    """``WIDTHxHEIGHT`` in ASCII digits (``64x64``) or ``auto``; the configured bounds are the engine's."""
    if value is not None and value != "auto" and not SIZE.match(value):
        raise ValueError("write the size as WIDTHxHEIGHT, e.g. 64x64")
    return value


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
        return check_size(value)

    def to_request(self, tenant: Tenant | None = None) -> ImageRequest:
        """The engine's request; ``tenant``: who asks (its adapters, shared and unowned ones are visible)."""
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
            tenant=tenant,
        )


class GenerateQuery(Params):
    """``GET /v1/generate``'s query string: one image as raw PNG.

    An empty value (``?seed=``, what an HTML form sends for a blank input) means "not given" — the query string's
    ``null``. An unknown parameter is a 400 naming it, as an unknown JSON key is; a parameter given twice
    (``?seed=1&seed=2``) is refused by the route (a query model sees only one of the values).
    """

    prompt: str = Field(..., min_length=1, description="what to draw")
    adapter: str | None = Field(None, description="model name; omitted = the default model")
    seed: int | None = Field(None, ge=0, description="reproducible image; omitted = random (X-Seed header)")
    steps: int | None = Field(None, ge=1, description="denoising steps")
    guidance: float | None = Field(None, ge=0, allow_inf_nan=False, description="classifier-free guidance scale")
    size: str | None = Field(None, description="WIDTHxHEIGHT in pixels, e.g. '64x64'")

    @field_validator("size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        return check_size(value)

    @classmethod
    def _not_given(cls, value: Any) -> bool:
        return value == ""

    def to_request(self, tenant: Tenant | None = None) -> ImageRequest:
        """The engine's request: as a JSON body with ``model`` = ``adapter`` would make it."""
        body = GenerationBody(
            prompt=self.prompt, model=self.adapter, seed=self.seed, steps=self.steps, guidance=self.guidance
        )
        return body.model_copy(update={"size": self.size}).to_request(tenant)


class ImageData(BaseModel):
    """One image, as OpenAI's ``Image``: ``b64_json`` or ``url`` (by ``response_format``), plus its seed and id."""

    id: str | None = Field(
        None,
        description="lorafleet: the image's id for POST /v1/feedback (also in the PNG's text chunk "
        "lorafleet:image_id); not the id in `url`",
    )
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
    arm: Literal["champion", "challenger"] | None = Field(
        None, description="for a request for the champion: the canary arm that drew it (serving/canary.py)"
    )
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
    available: bool = Field(
        True,
        description="a request for it can be served now; false for a registry name the replica has not resolved while "
        "the MLflow registry does not answer (such a request gets 503 + Retry-After)",
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
    registry: dict[str, Any] | None = Field(
        None,
        description="the MLflow registry as the answering replica last saw it: uri, reachable, last_ok_age_s, "
        "last_error, listing_age_s (null: no registry configured, or no replica answered in time)",
    )


# OpenAI's error types by status; any other 4xx is the client's ("invalid_request_error"), any other 5xx ours
ERROR_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
    408: "timeout",
    503: "server_busy",
    504: "timeout",
}


def error_type(status: int) -> str:
    """OpenAI's ``error.type`` for an HTTP status: a 4xx (405, 413, 415, ...) is never a ``server_error``."""
    return ERROR_TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "server_error")


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": status}}
