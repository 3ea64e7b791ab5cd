"""Where every dtype of a training worker is decided: one pure function, one frozen answer.

    precision = resolve_precision("auto", torch.device("cuda"), vae_force_upcast=pipe.vae.config.force_upcast)
    precision.weight_dtype, precision.vae_dtype, precision.autocast_dtype, precision.use_grad_scaler

The rules (``train.mixed_precision`` × device × the model's VAE), and why:

- **Frozen UNet and text encoder(s)** are stored in the autocast dtype (fp16/bf16 on CUDA, fp32 otherwise): they
  are only read, so half-precision storage halves their memory — diffusers' ``train_text_to_image_lora.py`` and
  ``train_dreambooth_lora.py`` ("cast all non-trainable weights ... to half-precision").
- **LoRA parameters stay fp32** whatever the base dtype (``diffusers.training_utils.cast_training_params``, done in
  ``training.model.add_lora``), so the optimizer updates full-precision weights.
- **The VAE** follows the weights, except that fp16 with a VAE whose config says ``force_upcast`` (diffusers'
  ``AutoencoderKL`` default; SDXL's VAE overflows in fp16 and sets it) keeps it in fp32 — the rule of diffusers'
  SDXL pipeline (``needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast``).
  bf16 has fp32's exponent range, so a bf16 VAE does not overflow; SD 1.x/2.x keep it in bf16. The SDXL family
  (``ModelFamily.vae_fp32_in_bf16``) keeps a ``force_upcast`` VAE in fp32 under bf16 too, as diffusers' SDXL LoRA
  scripts do under any mixed precision unless another VAE is given (``train_text_to_image_lora_sdxl.py``: the VAE
  goes to fp32 when ``--pretrained_vae_model_name_or_path`` is None); an fp16-safe VAE such as
  ``madebyollin/sdxl-vae-fp16-fix`` (its config says ``force_upcast: false``; lorafleet's
  ``pretrained_vae_model_name_or_path``) runs in the mixed-precision dtype.
- **Latents** are fp32 tensors; the UNet sees them under ``torch.autocast`` (which casts per op), the VAE gets
  pixels in ``vae_dtype``, and latents entering ``vae.decode`` are cast to the VAE's dtype
  (``cast_latents_at_decode``), as the SDXL pipeline does before decoding. Without that cast, fp16 training with
  validation prompts failed: the pipeline makes latents in the text encoder's fp16 and the fp32 VAE's first
  convolution refused them (``Input type (c10::Half) and bias type (float)``). diffusers' training scripts wrap
  their validation pipeline in ``torch.autocast`` instead; that would run an fp32 VAE's convolutions in fp16 again
  (losing the reason it is fp32), so lorafleet casts at the decode boundary and runs validation without autocast,
  the way the served pipeline runs.
- **Loss scaling** (``torch.amp.GradScaler``) for fp16 only: fp16's 5-bit exponent flushes small gradients to
  zero (on an H200, 258 of the toy model's 93,184 LoRA gradient entries underflowed without scaling). bf16 and
  fp32 share fp32's range and need none (PyTorch AMP docs, "Gradient Scaling").
- **auto** picks bf16 where the GPU runs it natively (compute capability ≥ 8.0), else fp16; fp32 off CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.hooks import RemovableHandle

MixedPrecision = Literal["auto", "no", "fp16", "bf16"]
_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class PrecisionError(ValueError):
    """``train.mixed_precision`` cannot run on this device; the message names the key and the fix."""


@dataclass(frozen=True)
class Precision:
    """The dtypes of one worker; build it with ``resolve_precision``.

    Attributes:
        mixed_precision: the resolved choice, "no" | "fp16" | "bf16" (auto already decided).
        device_type: torch device type the dtypes are for ("cuda", "cpu", ...).
        weight_dtype: storage dtype of the frozen UNet and text encoder(s).
        vae_dtype: storage dtype of the VAE, and so of the pixels it encodes and the latents it decodes.
        autocast_dtype: ``torch.autocast`` dtype for the UNet/text-encoder forward; None = no autocast (fp32).
        use_grad_scaler: fp16 loss scaling with ``torch.amp.GradScaler``.
    """

    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    device_type: str = "cpu"
    weight_dtype: torch.dtype = torch.float32
    vae_dtype: torch.dtype = torch.float32
    autocast_dtype: torch.dtype | None = None
    use_grad_scaler: bool = False

    def autocast(self) -> torch.autocast:
        """``torch.autocast`` in the mixed-precision dtype; disabled (a no-op) in fp32."""
        dtype = self.autocast_dtype or torch.float32
        return torch.autocast(self.device_type, dtype=dtype, enabled=self.autocast_dtype is not None)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A ``GradScaler`` for this device: active for fp16, a pass-through (``enabled=False``) otherwise."""
        return torch.amp.GradScaler(self.device_type, enabled=self.use_grad_scaler)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 in hardware (CUDA compute capability ≥ 8.0: Ampere and later).

    ``torch.cuda.is_bf16_supported()`` alone is true on older GPUs too (emulated, slow), hence
    ``including_emulation=False``.
    """
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(
    mixed_precision: MixedPrecision,
    device: torch.device,
    *,
    vae_force_upcast: bool = True,
    bf16_supported: bool | None = None,
    vae_fp32_in_bf16: bool = False,
) -> Precision:
    """Every dtype of a training worker for ``train.mixed_precision`` on ``device`` (rules: module docstring).

    Args:
        mixed_precision: ``train.mixed_precision``.
        device: the worker's device; only its type matters (a CUDA device need not exist to ask).
        vae_force_upcast: the VAE config's ``force_upcast`` (diffusers' default True); with fp16 it keeps the VAE
            in fp32.
        bf16_supported: whether the GPU has native bf16; None asks torch (``native_bf16``).
        vae_fp32_in_bf16: with bf16 too, a ``force_upcast`` VAE stays fp32 (the family's ``vae_fp32_in_bf16``: SDXL).

    Raises:
        PrecisionError: fp16/bf16 off CUDA, or bf16 on a GPU without native bf16.
    """
    choice = mixed_precision
    if device.type != "cuda":
        if choice in ("fp16", "bf16"):
            raise PrecisionError(
                f"train.mixed_precision={choice} needs a CUDA GPU; this worker runs on {device.type}. Set "
                "train.mixed_precision=auto (fp32 off CUDA) or no, or run on a CUDA device (run_worker(device="
                "'cuda'); with Ray Train, ray.use_gpu=true on a cluster with GPUs)"
            )
        return Precision("no", device.type)
    bf16_ok = native_bf16(device) if bf16_supported is None else bf16_supported
    if choice == "auto":
        choice = "bf16" if bf16_ok else "fp16"
    if choice == "bf16" and not bf16_ok:
        raise PrecisionError(
            "train.mixed_precision=bf16: this GPU has no native bf16 (it needs compute capability 8.0+, Ampere or "
            "later); set train.mixed_precision=fp16 (with loss scaling) or auto"
        )
    dtype = _DTYPES[choice]
    upcast = choice == "fp16" or (choice == "bf16" and vae_fp32_in_bf16)
    vae_dtype = torch.float32 if upcast and vae_force_upcast else dtype
    return Precision(
        mixed_precision=choice,
        device_type=device.type,
        weight_dtype=dtype,
        vae_dtype=vae_dtype,
        autocast_dtype=None if choice == "no" else dtype,
        use_grad_scaler=choice == "fp16",
    )


def inference_precision(unet_dtype: torch.dtype, vae_dtype: torch.dtype, device: torch.device) -> Precision:
    """The ``Precision`` of an already-loaded pipeline used for scoring (evaluation's held-out loss): its UNet's
    dtype is the autocast dtype when it is half; no loss scaling (nothing trains)."""
    half = unet_dtype in (torch.float16, torch.bfloat16)
    choice = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(unet_dtype, "no")
    return Precision(choice, device.type, unet_dtype, vae_dtype, unet_dtype if half else None, False)


def cast_latents_at_decode(vae: torch.nn.Module) -> list[RemovableHandle]:
    """Make ``vae.decode`` accept latents of any float dtype: each input entering the decoder path
    (``post_quant_conv`` when the VAE has one, and ``decoder``) is cast to that module's own dtype.

    Covers every decode path of ``AutoencoderKL`` (plain, sliced, tiled: all go through these modules) and any
    pipeline that calls ``vae.decode`` — diffusers' SD 1.x pipeline makes latents in the text encoder's dtype and
    does not cast them (its SDXL pipeline does). Returns the hook handles (``.remove()`` undoes it).
    """

    def cast_to_own_dtype(module: torch.nn.Module, args: tuple) -> tuple:
        dtype = next(module.parameters()).dtype
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    entries = [m for m in (getattr(vae, "post_quant_conv", None), vae.decoder) if m is not None]
    return [m.register_forward_pre_hook(cast_to_own_dtype) for m in entries]


def set_matmul_precision(device: torch.device, allow_tf32: bool) -> None:
    """On CUDA, let fp32 matmuls use TensorFloat-32 on Ampere+ (``train.allow_tf32``; no effect elsewhere).

    A process-wide PyTorch setting, set when a worker starts (never at import); diffusers' training scripts do the
    same behind ``--allow_tf32``. ``torch.set_float32_matmul_precision`` ("high" = TF32, "highest" = IEEE fp32)
    keeps the legacy and the PyTorch 2.9+ ``fp32_precision`` flags in step; setting only the new flag made
    ``torch.get_float32_matmul_precision()`` raise on torch 2.13 ("mix of the legacy and new APIs"). cuDNN
    convolutions already default to TF32 (``torch.backends.cudnn.allow_tf32``).
    """
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if allow_tf32 else "highest")
