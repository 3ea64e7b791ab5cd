"""Stable Diffusion XL (``StableDiffusionXLPipeline``): two CLIP text encoders and size/crop conditioning.

As diffusers' ``StableDiffusionXLPipeline.encode_prompt`` and its SDXL LoRA training scripts
(``train_text_to_image_lora_sdxl.py``, ``train_dreambooth_lora_sdxl.py``):

- ``encoder_hidden_states`` is both encoders' *penultimate* hidden states concatenated on the feature axis:
  (B, 77, 768 + 1280) for SDXL base.
- ``added_cond_kwargs["text_embeds"]`` is the second encoder's projected pooled output (B, 1280)
  (``CLIPTextModelWithProjection.text_embeds``).
- ``added_cond_kwargs["time_ids"]`` is (B, 6): the image's original (height, width), the top-left corner of the
  crop training took from the resized image (y, x), and the target (height, width) — the "micro-conditioning" of
  Podell et al., 2023 (SDXL), §2.2. At inference the pipeline passes (H, W, 0, 0, H, W).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from diffusers import StableDiffusionXLPipeline
from torch import nn

from training.families.base import Conditioning, ModelFamily


class StableDiffusionXL(ModelFamily):
    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    class_names = ("StableDiffusionXLPipeline",)
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    default_resolution = 1024
    uses_time_ids = True
    unused_text_encoder_layers = {"text_encoder": 1}  # its penultimate hidden states only; text_encoder_2's pooled
    vae_fp32_in_bf16 = True

    def encode(
        self, pipe: StableDiffusionXLPipeline, input_ids: torch.Tensor, encoders: Mapping[str, nn.Module] | None = None
    ) -> Conditioning:
        """Penultimate hidden states of both encoders, concatenated (B, L, D1 + D2), and the second's pooled
        projection (B, P). ``input_ids``: (B, 2, L) from ``tokenize``."""
        encoders = encoders or {}
        hidden, pooled = [], None
        for e, name in enumerate(self.text_encoder_names):
            encoder = encoders.get(name, getattr(pipe, name))
            out = encoder(input_ids[:, e], output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds first (diffusers keeps the last one's)
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        if pooled is None:
            raise ValueError("SDXL's text_encoder_2 must be a CLIPTextModelWithProjection (it gives the pooled embeds)")
        return Conditioning(torch.cat(hidden, dim=-1), pooled)

    def added_cond_kwargs(self, cond: Conditioning, time_ids: torch.Tensor | None) -> dict[str, torch.Tensor] | None:
        """``{"text_embeds": pooled (B, P), "time_ids": (B, 6)}``.

        Raises:
            ValueError: ``time_ids`` is None (every SDXL UNet call needs them).
        """
        if time_ids is None or cond.pooled_prompt_embeds is None:
            raise ValueError("an SDXL UNet needs pooled prompt embeddings and time ids for every sample")
        pooled = cond.pooled_prompt_embeds
        return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device, pooled.dtype)}

    def time_ids(
        self, original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
    ) -> torch.Tensor:
        """(6,) float32: original (h, w) + crop top-left (y, x) + target (h, w), as ``_get_add_time_ids``."""
        return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)
