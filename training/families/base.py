"""The interface every base-model family implements, and what its prompt encoding returns.

A family is what differs between base models that diffusers loads with different pipeline classes: the pipeline
class (``model_index.json``'s ``_class_name``), its text encoders and how their outputs condition the UNet, the
conditioning that is not text (SDXL's size and crop "time ids"), the default training resolution and which
modules LoRA wraps by default. Everything else — the denoising loss, the noise schedule (epsilon or v-prediction,
from the scheduler's config), LoRA injection, buckets, the engine — is shared and asks the family.

Prompt conditioning, batched::

    ids = family.tokenize(pipe, captions)              # (B, E, L): E text encoders, L = tokenizer.model_max_length
    cond = family.encode(pipe, ids)                    # Conditioning(prompt_embeds (B, L, D), pooled (B, P) | None)
    extra = family.added_cond_kwargs(cond, time_ids)   # None, or SDXL's {"text_embeds", "time_ids"}
    unet(noisy, t, encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=extra)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline
from torch import nn


class FamilyError(ValueError):
    """A base model lorafleet has no family for, or inputs that do not fit the family (names what to change)."""


@dataclass(frozen=True)
class Conditioning:
    """A batch's text conditioning, as the UNet takes it.

    ``prompt_embeds``: (B, L, D) ``encoder_hidden_states``. ``pooled_prompt_embeds``: (B, P) — SDXL's projected
    pooled output of its second text encoder (``added_cond_kwargs["text_embeds"]``); None for SD 1.x/2.x.
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None

    def __getitem__(self, idx: Any) -> Conditioning:
        pooled = self.pooled_prompt_embeds
        return Conditioning(self.prompt_embeds[idx], None if pooled is None else pooled[idx])

    def __len__(self) -> int:
        return len(self.prompt_embeds)

    def to(self, *args: Any, **kwargs: Any) -> Conditioning:
        pooled = self.pooled_prompt_embeds
        return Conditioning(
            self.prompt_embeds.to(*args, **kwargs), None if pooled is None else pooled.to(*args, **kwargs)
        )

    def repeat_interleave(self, k: int) -> Conditioning:
        pooled = self.pooled_prompt_embeds
        return Conditioning(
            self.prompt_embeds.repeat_interleave(k, dim=0), None if pooled is None else pooled.repeat_interleave(k, 0)
        )

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        pooled = [c.pooled_prompt_embeds for c in items]
        return Conditioning(
            torch.cat([c.prompt_embeds for c in items]),
            None if pooled[0] is None else torch.cat(pooled),  # type: ignore[arg-type]
        )


class ModelFamily:
    """One base-model family. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    class_names: ClassVar[tuple[str, ...]]  # model_index.json ``_class_name`` values this family loads
    text_encoder_names: ClassVar[tuple[str, ...]]  # pipeline attributes, in the order tokenize/encode use them
    tokenizer_names: ClassVar[tuple[str, ...]]
    default_resolution: ClassVar[int]  # px: the resolution the family's released models were trained at
    uses_time_ids: ClassVar[bool] = False
    # {text encoder: how many of its last transformer layers never reach the UNet} (SDXL's first encoder gives its
    # penultimate hidden states only): LoRA there could not train, and DDP refuses parameters without gradients
    unused_text_encoder_layers: ClassVar[Mapping[str, int]] = {}
    # keep a force_upcast VAE in fp32 under bf16 too, not only fp16 (diffusers' SDXL LoRA scripts keep it fp32 under
    # any mixed precision unless another VAE is given: train_text_to_image_lora_sdxl.py)
    vae_fp32_in_bf16: ClassVar[bool] = False

    # ---- modules ------------------------------------------------------------------------------------------
    def text_encoders(self, pipe: DiffusionPipeline) -> dict[str, nn.Module]:
        """{pipeline attribute: text encoder}, e.g. {"text_encoder": …, "text_encoder_2": …} for SDXL."""
        return {n: getattr(pipe, n) for n in self.text_encoder_names if getattr(pipe, n, None) is not None}

    def lora_modules(self, pipe: DiffusionPipeline) -> dict[str, nn.Module]:
        """Every module a LoRA may wrap, by the prefix diffusers' LoRA files use for it (``unet``,
        ``text_encoder``, ``text_encoder_2``)."""
        return {"unet": pipe.unet, **self.text_encoders(pipe)}

    # ---- prompts ------------------------------------------------------------------------------------------
    def tokenize(self, pipe: DiffusionPipeline, captions: list[str]) -> torch.Tensor:
        """Token ids for every text encoder, padded and cut to each tokenizer's ``model_max_length`` as the
        pipeline does. Returns (B, E, L) int64, E = number of text encoders.

        Raises:
            FamilyError: the tokenizers have different ``model_max_length`` (lorafleet stacks them).
        """
        ids = []
        for name in self.tokenizer_names:
            tok = getattr(pipe, name)
            ids.append(
                tok(
                    captions,
                    padding="max_length",
                    max_length=tok.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids
            )
        if len({t.shape[-1] for t in ids}) != 1:
            lengths = {n: t.shape[-1] for n, t in zip(self.tokenizer_names, ids)}
            raise FamilyError(f"the tokenizers' model_max_length differ ({lengths}); lorafleet needs them equal")
        return torch.stack(ids, dim=1)

    def encode(
        self, pipe: DiffusionPipeline, input_ids: torch.Tensor, encoders: Mapping[str, nn.Module] | None = None
    ) -> Conditioning:
        """The UNet's text conditioning for ``input_ids`` (B, E, L) from ``tokenize``, on ``input_ids``' device.
        ``encoders`` replaces the pipeline's text encoders by name (DDP-wrapped ones while they train)."""
        raise NotImplementedError

    def added_cond_kwargs(self, cond: Conditioning, time_ids: torch.Tensor | None) -> dict[str, torch.Tensor] | None:
        """The UNet's ``added_cond_kwargs`` (None for families without added conditioning)."""
        return None

    def time_ids(
        self, original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
    ) -> torch.Tensor | None:
        """Size/crop conditioning of one image, sizes as (height, width) like diffusers; None when unused."""
        return None

    # ---- adapters -----------------------------------------------------------------------------------------
    def save_lora_weights(
        self,
        out_dir: str,
        weight_name: str,
        layers: Mapping[str, Mapping[str, torch.Tensor]],
        metadata: Mapping[str, dict] | None = None,
    ) -> None:
        """Write LoRA layers in diffusers' format for this pipeline class (``<Pipeline>.save_lora_weights``).

        Args:
            layers: {module prefix from ``lora_modules``: diffusers-format state dict}.
            metadata: {module prefix: the LoraConfig as a dict}, stored in the safetensors header.
        """
        unknown = set(layers) - set(self.lora_modules_names())
        if unknown:
            raise FamilyError(f"{self.name} has no module {sorted(unknown)} to save LoRA weights for")
        kwargs: dict[str, Any] = {f"{p}_lora_layers": dict(s) for p, s in layers.items()}
        kwargs |= {f"{p}_lora_adapter_metadata": m for p, m in (metadata or {}).items()}
        self.pipeline_class.save_lora_weights(out_dir, weight_name=weight_name, safe_serialization=True, **kwargs)

    def lora_modules_names(self) -> tuple[str, ...]:
        return ("unet", *self.text_encoder_names)

    def lora_state_dict(self, path: str, weight_name: str | None = None) -> dict[str, torch.Tensor]:
        """A LoRA file's state dict in diffusers' layout (``<Pipeline>.lora_state_dict``: kohya/A1111 keys are
        converted), keys prefixed ``unet.`` / ``text_encoder.`` / ``text_encoder_2.``."""
        state, _ = self.pipeline_class.lora_state_dict(path, weight_name=weight_name)
        return state

    def __repr__(self) -> str:
        return f"<model family {self.name}: {self.pipeline_class.__name__}>"
