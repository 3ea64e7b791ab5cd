"""Continue training an existing adapter: initialize the injected LoRA from a saved adapter folder.

    python -m training.train --config configs/train.yaml lora.init_adapter=runs/train/lora/adapter lora.rank=16

The folder is a lorafleet adapter (``pytorch_lora_weights.safetensors`` + ``lorafleet_adapter.json``, as
``training.adapter.save_adapter`` writes it; kohya/PEFT files become one with ``lorafleet import-adapter``). Its
weights are loaded with diffusers' ``lora_state_dict`` and PEFT's ``set_peft_model_state_dict`` into the adapter
``add_lora`` injected (``training.adapter.load_into_training``, the code that resumes checkpoints), so step 0 starts
from exactly its weights; the optimizer and the schedule start fresh (a new fine-tune, not a resume).

The LoRA must have the same shape as the adapter's: rank, alpha (the scale alpha / rank), target modules, the
text-encoder LoRA and the base model are checked against its JSON before anything loads, and every mismatch is
reported at once, naming the config key and the value to set.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from training.adapter_meta import AdapterError, AdapterMeta, base_model_id, verify_adapter
from training.config import PreflightError, TrainConfig

if TYPE_CHECKING:  # torch: only loading needs it (the checks run in the Serve ingress, which has none)
    from training.model import Parts

log = logging.getLogger(__name__)


class InitAdapterError(PreflightError):
    """``lora.init_adapter`` names an adapter this config cannot continue (raised before any training)."""


def adapter_shape(meta: AdapterMeta) -> dict[str, object]:
    """The ``lora.*`` values (dotted keys) a config needs to continue the adapter ``meta`` describes.

    Raises:
        InitAdapterError: the adapter does not record its rank or target modules (mixed ranks, an old import).
    """
    if meta.rank is None or not meta.target_modules:
        raise InitAdapterError(
            "lora.init_adapter: the adapter records no single rank or no target modules in its lorafleet_adapter.json "
            "(mixed ranks, or an import without them); it cannot be continued — train a new adapter instead"
        )
    return {
        "lora.rank": meta.rank,
        "lora.alpha": meta.alpha if meta.alpha is not None else float(meta.rank),
        "lora.target_modules": sorted(meta.target_modules),
        "lora.text_encoder": meta.text_encoder,
    }


def init_adapter_problems(cfg: TrainConfig, meta: AdapterMeta) -> list[str]:
    """Every way ``cfg``'s LoRA differs from the adapter's (``meta``), each naming the key and the fix; [] = fits."""
    try:
        shape = adapter_shape(meta)
    except InitAdapterError as exc:
        return [str(exc)]
    mine = {
        "lora.rank": cfg.lora.rank,
        "lora.alpha": float(cfg.lora.alpha or cfg.lora.rank),
        "lora.target_modules": sorted(cfg.lora.target_modules),
        "lora.text_encoder": cfg.lora.text_encoder,
    }
    problems = [
        f"{key}={mine[key]!r} but the adapter in lora.init_adapter has {value!r}: set {key}={value!r} (a continued "
        "adapter keeps its shape)"
        for key, value in shape.items()
        if mine[key] != (float(value) if key == "lora.alpha" else value)
    ]
    if base_model_id(meta.base_model) != base_model_id(cfg.base_model):
        problems.append(
            f"base_model={cfg.base_model!r} but the adapter in lora.init_adapter was trained on "
            f"{base_model_id(meta.base_model)!r}: set base_model to it, or train a new adapter on this base model"
        )
    return problems


def check_init_adapter(cfg: TrainConfig) -> AdapterMeta:
    """Verify ``lora.init_adapter`` (safetensors, sha256) and that it fits ``cfg``; return its metadata.

    Raises:
        InitAdapterError: not an adapter folder, or it does not fit (every problem, with its key and fix).
    """
    path = Path(cfg.lora.init_adapter or "").expanduser()
    try:
        meta = verify_adapter(path)
    except AdapterError as exc:
        raise InitAdapterError(f"lora.init_adapter={cfg.lora.init_adapter!r}: {exc}") from exc
    if problems := init_adapter_problems(cfg, meta):
        raise InitAdapterError("; ".join(problems))
    return meta


def load_init_adapter(parts: Parts, cfg: TrainConfig) -> AdapterMeta:
    """Load ``lora.init_adapter``'s weights into the LoRA ``add_lora`` injected into ``parts`` (UNet and, with
    ``lora.text_encoder``, the text encoders); the trainable parameters stay the same fp32 tensors.

    Raises:
        InitAdapterError: see ``check_init_adapter``; or its keys do not fit the injected LoRA.
    """
    from training.adapter import load_into_training

    meta = check_init_adapter(cfg)
    encoders = {n: parts.raw_text_encoders[n] if n in parts.lora_text_encoders else None for n in _ENCODERS}
    try:
        load_into_training(cfg.lora.init_adapter, parts.raw_unet, **encoders)
    except AdapterError as exc:
        raise InitAdapterError(f"lora.init_adapter: {exc}; train a new adapter with this lora config") from exc
    log.info("LoRA initialized from %s (rank %s, trained %s)", cfg.lora.init_adapter, meta.rank, meta.training)
    return meta


_ENCODERS = ("text_encoder", "text_encoder_2")
