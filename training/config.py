"""Typed schemas for LoRA fine-tuning (values live in `configs/train.yaml`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., description="dataset folder: images + metadata.jsonl, or images + .txt captions")
    format: Literal["auto", "metadata", "sidecar", "dreambooth"] = Field(
        "auto",
        description="auto: metadata.jsonl if present, else .txt sidecars, else dreambooth (needs instance_prompt)",
    )
    instance_prompt: str | None = Field(
        None, description="DreamBooth: one caption for every image, e.g. 'a photo of sks dog'"
    )
    trigger: str | None = Field(None, description="trigger word; DreamBooth captions must contain it")
    resolution: int = Field(64, ge=8, description="training side length in pixels (toy world 64, SD 1.x 512)")
    min_images: int = Field(4, ge=1, description="fewer valid images than this is an error")
    max_images: int | None = Field(None, ge=1, description="use only the first N images (sorted by name)")
    max_pixels: int = Field(4096 * 4096, ge=64 * 64, description="larger images are refused as decompression bombs")
