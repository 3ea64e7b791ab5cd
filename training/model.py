"""The frozen base model plus trainable LoRA adapters (PEFT); dtypes come from ``training.precision``."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from transformers import CLIPTextModel, CLIPTokenizer

from training.config import LoraArgs
from training.families import load_pipeline
from training.precision import MixedPrecision, Precision, PrecisionError, cast_latents_at_decode, resolve_precision

__all__ = ["Parts", "Precision", "PrecisionError", "add_lora", "load_parts", "resolve_precision", "unwrap"]

log = logging.getLogger(__name__)


@dataclass
class Parts:
    """Everything a worker trains with. ``unet``/``text_encoder`` may be DDP-wrapped; ``pipe`` holds the raw ones."""

    pipe: StableDiffusionPipeline
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    noise_scheduler: DDPMScheduler
    device: torch.device
    precision: Precision = field(default_factory=Precision)  # fp32, no autocast, no loss scaling
    trains_text_encoder: bool = False
    trainable: list[torch.nn.Parameter] = field(default_factory=list)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16/fp16 autocast on the device when mixed precision is on; a no-op in fp32."""
        return self.precision.autocast()

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The mixed-precision dtype (None = fp32): ``precision.autocast_dtype``."""
        return self.precision.autocast_dtype

    @property
    def vae(self) -> AutoencoderKL:
        return self.pipe.vae

    @property
    def tokenizer(self) -> CLIPTokenizer:
        return self.pipe.tokenizer

    @property
    def raw_unet(self) -> UNet2DConditionModel:
        return self.pipe.unet

    @property
    def raw_text_encoder(self) -> CLIPTextModel:
        return self.pipe.text_encoder


def load_parts(base_model: str, device: torch.device, mixed_precision: MixedPrecision = "no") -> Parts:
    """Load the base pipeline, frozen, with every module in the dtype ``resolve_precision`` gives for
    ``train.mixed_precision`` on ``device`` and this model's VAE.

    Raises:
        PrecisionError: fp16/bf16 without a CUDA device (or bf16 on a GPU without it).
        FileNotFoundError: ``base_model`` is not a diffusers folder / cached hub id.
    """
    weights = resolve_precision(mixed_precision, device)  # raises before anything loads
    pipe = load_pipeline(base_model, device=device, dtype=weights.weight_dtype)
    precision = resolve_precision(mixed_precision, device, vae_force_upcast=pipe.vae.config.get("force_upcast", True))
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    if pipe.vae.dtype != precision.vae_dtype:
        pipe.vae.to(precision.vae_dtype)
    cast_latents_at_decode(pipe.vae)  # the pipeline's latents come in the text encoder's dtype (validation images)
    log.info(
        "precision %s on %s: UNet/text encoder %s, VAE %s, loss scaling %s",
        *(precision.mixed_precision, device, precision.weight_dtype, precision.vae_dtype, precision.use_grad_scaler),
    )
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return Parts(pipe, pipe.unet, pipe.text_encoder, scheduler, device, precision)


def add_lora(parts: Parts, args: LoraArgs) -> list[torch.nn.Parameter]:
    """Inject the ``default`` LoRA adapter (B zero-initialised, so outputs start equal to the base).

    Returns the trainable parameters, cast to fp32 whatever the base dtype.
    """
    alpha = args.alpha or args.rank
    unet_cfg = LoraConfig(
        r=args.rank,
        lora_alpha=alpha,
        lora_dropout=args.dropout,
        init_lora_weights="gaussian",
        target_modules=list(args.target_modules),
    )
    try:
        parts.raw_unet.add_adapter(unet_cfg)
    except ValueError as exc:  # PEFT: "Target modules {...} not found in the base model"
        raise ValueError(f"lora.target_modules={args.target_modules}: {exc}; use e.g. to_q, to_k, to_v") from exc
    models = [parts.raw_unet]
    if args.text_encoder:
        te_cfg = LoraConfig(
            r=args.rank,
            lora_alpha=alpha,
            lora_dropout=args.dropout,
            init_lora_weights="gaussian",
            target_modules=list(args.text_encoder_target_modules),
        )
        parts.raw_text_encoder.add_adapter(te_cfg)
        models.append(parts.raw_text_encoder)
        parts.trains_text_encoder = True
    cast_training_params(models, dtype=torch.float32)
    parts.trainable = [p for m in models for p in m.parameters() if p.requires_grad]
    n = sum(p.numel() for p in parts.trainable)
    log.info("LoRA rank %d on %s: %d trainable parameters", args.rank, ", ".join(args.target_modules), n)
    return parts.trainable


def enable_gradient_checkpointing(parts: Parts) -> None:
    parts.raw_unet.enable_gradient_checkpointing()
    if parts.trains_text_encoder:
        parts.raw_text_encoder.gradient_checkpointing_enable()


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return getattr(module, "module", module)
