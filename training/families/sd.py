"""Stable Diffusion 1.x and 2.x (``StableDiffusionPipeline``): one CLIP text encoder, its last hidden states.

SD 2.x differs only in data the family reads from the model folder: OpenCLIP-H's text encoder (1024-wide), 768 px
and v-prediction in ``scheduler/scheduler_config.json`` (``prediction_type: v_prediction``), which the loss and the
held-out loss read from the scheduler; nothing here depends on the version.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from diffusers import StableDiffusionPipeline
from torch import nn

from training.families.base import Conditioning, ModelFamily


class StableDiffusion(ModelFamily):
    name = "sd"
    pipeline_class = StableDiffusionPipeline
    class_names = ("StableDiffusionPipeline",)
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)
    default_resolution = 512

    def encode(
        self, pipe: StableDiffusionPipeline, input_ids: torch.Tensor, encoders: Mapping[str, nn.Module] | None = None
    ) -> Conditioning:
        """``text_encoder(ids)[0]``: the last hidden states (B, L, D), as ``StableDiffusionPipeline.encode_prompt``
        without ``clip_skip``. ``input_ids``: (B, 1, L) or (B, L)."""
        encoder = (encoders or {}).get("text_encoder", pipe.text_encoder)
        ids = input_ids[:, 0] if input_ids.dim() == 3 else input_ids
        return Conditioning(encoder(ids)[0])
