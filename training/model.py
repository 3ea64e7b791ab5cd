"""The frozen base model plus trainable LoRA adapters (PEFT); dtypes come from ``training.precision``.

Any base-model family (``training.families``: SD 1.x/2.x, SDXL) loads here; ``Parts`` keeps the family and every
text encoder by its pipeline name, so the loop, the sources and the held-out loss never ask which family it is:

    parts = load_parts("models/toy-sd", torch.device("cpu"))
    ids = parts.tokenize(["a red circle"])            # (B, E, L): E text encoders
    cond = parts.encode(ids)                          # Conditioning: prompt embeds (+ SDXL's pooled embeds)
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from training.config import LoraArgs
from training.families import Conditioning, ModelFamily, family_for, load_pipeline
from training.precision import MixedPrecision, Precision, PrecisionError, cast_latents_at_decode, resolve_precision

__all__ = ["Parts", "Precision", "PrecisionError", "add_lora", "load_parts", "resolve_precision", "unwrap"]

log = logging.getLogger(__name__)


@dataclass
class Parts:
    """Everything a worker trains with. ``unet`` and the ``text_encoders`` that carry LoRA may be DDP-wrapped;
    ``pipe`` holds the raw modules.

    ``text_encoders``: {pipeline attribute: encoder} (``text_encoder``, SDXL's ``text_encoder_2``); a family's
    encoder not given is the pipeline's own. A single module is read as ``{"text_encoder": module}`` (SD callers
    from before families). ``trains_text_encoder``: captions are encoded per step (not cached), as a text-encoder
    LoRA needs; ``lora_text_encoders``: the encoders that carry a LoRA (DDP-wrapped, saved, resumed).
    """

    pipe: DiffusionPipeline
    unet: nn.Module
    text_encoders: dict[str, nn.Module]
    noise_scheduler: DDPMScheduler
    device: torch.device
    precision: Precision = field(default_factory=Precision)  # fp32, no autocast, no loss scaling
    trains_text_encoder: bool = False
    trainable: list[nn.Parameter] = field(default_factory=list)
    lora_text_encoders: tuple[str, ...] = ()
    family: ModelFamily = field(init=False)

    def __post_init__(self) -> None:
        self.family = family_for(self.pipe)
        given = self.text_encoders
        if isinstance(given, nn.Module):
            given = {"text_encoder": given}
        self.text_encoders = self.family.text_encoders(self.pipe) | dict(given)

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
        """The first tokenizer (every family has ``tokenizer``)."""
        return self.pipe.tokenizer

    @property
    def raw_unet(self) -> UNet2DConditionModel:
        return self.pipe.unet

    @property
    def text_encoder(self) -> nn.Module:
        """The first text encoder as training calls it (DDP-wrapped when it trains)."""
        return self.text_encoders["text_encoder"]

    @property
    def raw_text_encoder(self) -> CLIPTextModel:
        return self.pipe.text_encoder

    @property
    def raw_text_encoders(self) -> dict[str, nn.Module]:
        """Every text encoder of the family by name, unwrapped (the pipeline's own modules)."""
        return self.family.text_encoders(self.pipe)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """(B, E, L) int64 token ids of every text encoder (``ModelFamily.tokenize``), on the CPU."""
        return self.family.tokenize(self.pipe, captions)

    def encode(self, input_ids: torch.Tensor, *, raw: bool = False) -> Conditioning:
        """The UNet's text conditioning for (B, E, L) ids, on ``device``: through ``text_encoders`` (DDP-wrapped
        while they train, so gradients reach their LoRA), or the unwrapped pipeline encoders when ``raw``."""
        encoders = self.raw_text_encoders if raw else self.text_encoders
        return self.family.encode(self.pipe, input_ids.to(self.device), encoders)


def load_parts(
    base_model: str, device: torch.device, mixed_precision: MixedPrecision = "no", vae: str | None = None
) -> Parts:
    """Load the base pipeline (any family) frozen, with every module in the dtype ``resolve_precision`` gives for
    ``train.mixed_precision`` on ``device``, the family and this model's VAE.

    Args:
        vae: ``pretrained_vae_model_name_or_path``: a VAE folder or hub id loaded instead of the model's own (SDXL:
            ``madebyollin/sdxl-vae-fp16-fix``, whose ``force_upcast: false`` lets it run in fp16).

    Raises:
        PrecisionError: fp16/bf16 without a CUDA device (or bf16 on a GPU without it).
        FileNotFoundError: ``base_model`` (or ``vae``) is not a diffusers folder / cached hub id.
    """
    weights = resolve_precision(mixed_precision, device)  # raises before anything loads
    pipe = load_pipeline(base_model, device=device, dtype=weights.weight_dtype, vae=vae)
    family = family_for(pipe)
    force_upcast = bool(pipe.vae.config.get("force_upcast", True))
    precision = resolve_precision(
        mixed_precision, device, vae_force_upcast=force_upcast, vae_fp32_in_bf16=family.vae_fp32_in_bf16
    )
    for module in (pipe.unet, pipe.vae, *family.text_encoders(pipe).values()):
        module.requires_grad_(False).eval()
    if pipe.vae.dtype != precision.vae_dtype:
        pipe.vae.to(precision.vae_dtype)
    cast_latents_at_decode(pipe.vae)  # the pipeline's latents come in the text encoder's dtype (validation images)
    log.info(
        "%s model, precision %s on %s: UNet/text encoders %s, VAE %s (%s%s), loss scaling %s",
        *(family.name, precision.mixed_precision, device, precision.weight_dtype, precision.vae_dtype),
        vae or "the model's own VAE",
        "; its config says force_upcast, so it stays fp32: set pretrained_vae_model_name_or_path to an fp16-safe "
        "VAE (force_upcast=false) to run it in half precision"
        if precision.vae_dtype != precision.weight_dtype
        else "",
        precision.use_grad_scaler,
    )
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return Parts(pipe, pipe.unet, family.text_encoders(pipe), scheduler, device, precision)


def _lora_config(args: LoraArgs, targets: list[str], layers: list[int] | None = None) -> LoraConfig:
    return LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha or args.rank,
        lora_dropout=args.dropout,
        init_lora_weights="gaussian",
        target_modules=targets,
        layers_to_transform=layers,
        layers_pattern="layers" if layers is not None else None,
    )


def add_text_encoder_lora(parts: Parts, args: LoraArgs) -> list[str]:
    """LoRA on every text encoder of the family (SDXL: both, as diffusers' ``train_dreambooth_lora_sdxl.py
    --train_text_encoder``), on the layers whose output reaches the UNet: SDXL's first encoder gives its penultimate
    hidden states, so its last layer gets none (``ModelFamily.unused_text_encoder_layers``; diffusers wraps it
    anyway and runs DDP with ``find_unused_parameters=True``). Returns the names of the encoders that got one."""
    names = []
    for name, encoder in parts.raw_text_encoders.items():
        skip = parts.family.unused_text_encoder_layers.get(name, 0)
        n_layers = int(encoder.config.num_hidden_layers)
        if skip >= n_layers:
            log.info("%s: none of its %d layers reaches the UNet, so it gets no LoRA", name, n_layers)
            continue
        layers = list(range(n_layers - skip)) if skip else None
        encoder.add_adapter(_lora_config(args, list(args.text_encoder_target_modules), layers))
        names.append(name)
    return names


def add_lora(parts: Parts, args: LoraArgs) -> list[torch.nn.Parameter]:
    """Inject the ``default`` LoRA adapter (B zero-initialised, so outputs start equal to the base) into the UNet
    and, with ``lora.text_encoder``, into every text encoder of the family (``add_text_encoder_lora``).

    Returns the trainable parameters, cast to fp32 whatever the base dtype.
    """
    try:
        parts.raw_unet.add_adapter(_lora_config(args, list(args.target_modules)))
    except ValueError as exc:  # PEFT: "Target modules {...} not found in the base model"
        raise ValueError(f"lora.target_modules={args.target_modules}: {exc}; use e.g. to_q, to_k, to_v") from exc
    models: list[nn.Module] = [parts.raw_unet]
    if args.text_encoder:
        parts.lora_text_encoders = tuple(add_text_encoder_lora(parts, args))
        models += [parts.raw_text_encoders[n] for n in parts.lora_text_encoders]
        parts.trains_text_encoder = True
    cast_training_params(models, dtype=torch.float32)
    parts.trainable = [p for m in models for p in m.parameters() if p.requires_grad]
    n = sum(p.numel() for p in parts.trainable)
    where = ", ".join(["unet", *parts.lora_text_encoders])
    log.info("LoRA rank %d on %s (%s): %d trainable parameters", args.rank, where, ", ".join(args.target_modules), n)
    return parts.trainable


def enable_gradient_checkpointing(parts: Parts) -> None:
    parts.raw_unet.enable_gradient_checkpointing()
    for name in parts.lora_text_encoders:
        parts.raw_text_encoders[name].gradient_checkpointing_enable()


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return getattr(module, "module", module)
