"""The diffusers speed options of ``ServeArgs.speed``, applied to a freshly loaded pipeline (before any adapter).

Each is a library call: attention processors (``set_attn_processor``), ``torch.channels_last``, the VAE's
``enable_slicing``/``enable_tiling``, ``torch.set_float32_matmul_precision`` and diffusers' LoRA hot-swap with
``torch.compile``. No Ray in here.
"""

from __future__ import annotations

import logging

import torch

from serving.config import SpeedArgs

log = logging.getLogger(__name__)


def apply_speed(pipe, speed: SpeedArgs) -> None:
    """Set ``speed``'s options on ``pipe`` in place; call before the first adapter is loaded (hot-swap needs that).

    Raises:
        RuntimeError: an attention processor other than the configured one stayed in place (names ``speed.sdpa``).
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    want = AttnProcessor2_0 if speed.sdpa else AttnProcessor
    for part in (pipe.unet, pipe.vae):
        part.set_attn_processor(want())
        other = {type(p).__name__ for p in part.attn_processors.values()} - {want.__name__}
        if other:
            raise RuntimeError(f"speed.sdpa={speed.sdpa}: {type(part).__name__} still uses {sorted(other)}")
    if speed.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    if speed.vae_slicing:
        pipe.vae.enable_slicing()
    if speed.vae_tiling:
        pipe.vae.enable_tiling()
    if speed.tf32 and pipe.device.type == "cuda":  # on CPU "high" may mean bf16 inside oneDNN matmuls: not applied
        torch.set_float32_matmul_precision("high")
    if speed.compile_unet:
        pipe.enable_lora_hotswap(target_rank=speed.hotswap_max_rank)
        pipe.unet.compile()  # nn.Module.compile: in place, so PEFT and the engine keep the same module
        log.info("UNet compiled lazily (first passes) with LoRA hot-swap up to rank %d", speed.hotswap_max_rank)
