"""``CaptionConfig``: which captioner writes the captions, on which model and device, and where the trigger goes."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

BLIP_DEFAULT = "Salesforce/blip-image-captioning-base"
TOY_SCORER_DEFAULT = "models/toy-clip"
TOY_MARKER = "toy_world_build.json"  # `lorafleet toy-world build` writes it into models/toy-sd and models/toy-sdxl
_FIELDS = {"caption", "trigger"}


class CaptionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    captioner: Literal["auto", "toy", "blip"] = Field(
        "auto",
        description="toy: the toy CLIP ranks every caption of the toy world's grammar; blip: a BLIP captioning model "
        "(transformers); auto: toy when caption.base_model is a toy-world model (its folder holds "
        f"{TOY_MARKER}), else blip",
    )
    base_model: str | None = Field(
        "models/toy-sd", description="the model the captions will train (folder or hub id); read only by auto"
    )
    model: str | None = Field(
        None,
        description=f"toy: the CLIP scorer folder (null = {TOY_SCORER_DEFAULT}); blip: hub id or local folder in "
        f"BLIP's layout (null = {BLIP_DEFAULT})",
    )
    trigger: str | None = Field(
        None, min_length=1, description="the trigger word every caption carries (null = captions without one)"
    )
    template: str | None = Field(
        None,
        description="how caption and trigger combine, with the fields {caption} and {trigger}: '{trigger}, "
        "{caption}' (prefix) or '{caption}, {trigger}'; null = the captioner's own: toy puts the trigger in place "
        "of the background word ('a red circle on a sks background', as `lorafleet dataset toy` writes), "
        "blip uses '{trigger}, {caption}'",
    )
    batch_size: int = Field(16, ge=1, le=1024, description="images per forward pass")
    max_new_tokens: int = Field(30, ge=1, le=512, description="blip: longest caption in tokens (greedy decoding)")
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="blip weights: auto = bfloat16 on a CUDA GPU that has it, else float16 on CUDA, float32 on "
        "CPU; float16/bfloat16 need CUDA (the toy scorer always runs in float32)",
    )

    @field_validator("trigger")
    @classmethod
    def _one_line(cls, v: str | None) -> str | None:
        if v is not None and (v != v.strip() or "\n" in v or "\r" in v):
            raise ValueError("the trigger is one line without surrounding spaces, e.g. 'sks'")
        return v

    @field_validator("template")
    @classmethod
    def _template_fields(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as exc:
            raise ValueError(f"{v!r} is not a template ({exc}); write e.g. '{{trigger}}, {{caption}}'") from None
        if unknown := names - _FIELDS:
            raise ValueError(f"unknown field(s) {sorted(unknown)} in {v!r}; use only {{caption}} and {{trigger}}")
        if "caption" not in names:
            raise ValueError(f"{v!r} lacks {{caption}}; e.g. '{{trigger}}, {{caption}}'")
        return v

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        if v != "auto":
            try:
                torch.device(v)
            except RuntimeError:
                raise ValueError(f"{v!r} is not a device; use auto, cpu, cuda or cuda:0") from None
        return v

    @model_validator(mode="after")
    def _trigger_has_a_place(self) -> CaptionConfig:
        if self.trigger and self.template and "{trigger}" not in self.template:
            raise ValueError(
                f"caption.template {self.template!r} has no {{trigger}} but caption.trigger={self.trigger!r} is set: "
                "add {trigger} to the template (e.g. '{trigger}, {caption}') or drop the trigger"
            )
        return self

    def resolved_captioner(self) -> Literal["toy", "blip"]:
        """``captioner``, with auto resolved: toy when ``base_model`` is a local folder holding the toy-world build
        record (``toy_world_build.json``), else blip (hub ids and every other folder)."""
        if self.captioner != "auto":
            return self.captioner
        return "toy" if self.base_model and (Path(self.base_model) / TOY_MARKER).is_file() else "blip"

    def resolved_model(self) -> str:
        """``model``, or the resolved captioner's default (the toy CLIP, or BLIP base)."""
        return self.model or (TOY_SCORER_DEFAULT if self.resolved_captioner() == "toy" else BLIP_DEFAULT)

    def resolved_device(self) -> torch.device:
        """``device`` with auto resolved (CUDA when ``torch.cuda.is_available()``).

        Raises:
            ValueError: a CUDA device asked for on a machine without one (names caption.device and the fix).
        """
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"caption.device={self.device} but this machine has no CUDA GPU; use auto or cpu")
        return device

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        """The weights' dtype on ``device``: ``dtype``, or for auto bf16 / fp16 on CUDA and fp32 on CPU.

        Raises:
            ValueError: float16/bfloat16 on CPU (names caption.dtype and the fix).
        """
        if self.dtype == "auto":
            if device.type != "cuda":
                return torch.float32
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if self.dtype != "float32" and device.type != "cuda":
            raise ValueError(
                f"caption.dtype={self.dtype} needs a CUDA GPU (half precision is slow or unsupported on CPU); "
                "on CPU use caption.dtype=auto or float32"
            )
        return getattr(torch, self.dtype)


def with_trigger(caption: str, trigger: str | None, template: str) -> str:
    """``caption`` placed in ``template`` with ``trigger``; with no trigger the caption alone. Separators left dangling
    by an empty caption (a model that said nothing) are dropped: ``'{trigger}, {caption}'`` gives ``'sks'``.

    >>> with_trigger("a dog on grass", "sks", "{trigger}, {caption}")
    'sks, a dog on grass'
    """
    caption = " ".join(caption.split())
    if not trigger:
        return caption
    return template.format(caption=caption, trigger=trigger).strip(" ,;:-")
