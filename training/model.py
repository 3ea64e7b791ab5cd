"""The frozen base model plus trainable LoRA adapters (PEFT), and the precision rules around them."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from transformers import CLIPTextModel, CLIPTokenizer

from training.config import LoraArgs, OptimArgs
from training.toy_world.sample import load_pipeline

log = logging.getLogger(__name__)


@dataclass
class Parts:
    """Everything a worker trains with. ``unet``/``text_encoder`` may be DDP-wrapped; ``pipe`` holds the raw ones."""

    pipe: StableDiffusionPipeline
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    noise_scheduler: DDPMScheduler
    device: torch.device
    autocast_dtype: torch.dtype | None = None  # None = fp32 (no autocast)
    trains_text_encoder: bool = False
    trainable: list[torch.nn.Parameter] = field(default_factory=list)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16/fp16 autocast on the device when mixed precision is on; a no-op in fp32."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

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


class PrecisionError(ValueError):
    pass


def resolve_precision(args: OptimArgs, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.mixed_precision`` on ``device`` (None = fp32).

    Raises:
        PrecisionError: fp16/bf16 requested without a CUDA device.
    """
    choice = args.mixed_precision
    if device.type != "cuda":
        if choice in ("fp16", "bf16"):
            raise PrecisionError(
                f"train.mixed_precision={choice} needs a CUDA GPU; this worker runs on {device.type}. "
                "Use train.mixed_precision=auto (fp32 on CPU) or ray.use_gpu=true on a GPU cluster"
            )
        return None
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[choice]


def load_parts(base_model: str, device: torch.device, autocast_dtype: torch.dtype | None = None) -> Parts:
    """Load the base pipeline, frozen; frozen weights are stored in the autocast dtype to halve memory on GPU."""
    pipe = load_pipeline(base_model, device=device, dtype=autocast_dtype or torch.float32)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    # the VAE stays fp32 when the rest is fp16: SD 1.x's VAE overflows in fp16
    if autocast_dtype == torch.float16:
        pipe.vae.to(torch.float32)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return Parts(pipe, pipe.unet, pipe.text_encoder, scheduler, device, autocast_dtype)


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
