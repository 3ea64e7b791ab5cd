"""Base-model families (SD 1.x/2.x, SDXL): detection from ``model_index.json`` and the one pipeline loader.

    family = family_of("models/toy-sd")                 # reads model_index.json's _class_name, never the name
    pipe = load_pipeline("stabilityai/stable-diffusion-xl-base-1.0", vae="madebyollin/sdxl-vae-fp16-fix")
    family_for(pipe)                                    # the family of a loaded pipeline (by its class)

Every base-model load in lorafleet (training, held-out loss, evaluation, the engine, ``sample``, ONNX export) goes
through ``load_pipeline``; ``docs/model-families.md`` describes the interface (``training.families.base``) and how a
third family plugs in.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline

from training.families.base import Conditioning, FamilyError, ModelFamily
from training.families.sd import StableDiffusion
from training.families.sdxl import StableDiffusionXL

__all__ = [
    "FAMILIES",
    "Conditioning",
    "FamilyError",
    "ModelFamily",
    "family_for",
    "family_of",
    "load_pipeline",
    "read_model_index",
]

log = logging.getLogger(__name__)

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (StableDiffusion(), StableDiffusionXL())}

_OFFLINE_HINT = (
    "it is not a local folder and not in the Hugging Face cache (HF_HUB_OFFLINE=1 forbids downloads). Download it "
    "where the Hub is reachable (`hf download <id>`) or set the model to a local folder such as models/toy-sd."
)


def read_model_index(model: str | Path) -> dict:
    """``model_index.json`` of a diffusers folder or a hub id (from the local Hugging Face cache, or the Hub when
    downloads are allowed).

    Raises:
        FileNotFoundError: a folder without ``model_index.json``, or a hub id that cannot be found.
    """
    local = Path(model).expanduser()
    if local.exists():
        index = local / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{local} has no model_index.json: point the model at a diffusers pipeline folder")
        return json.loads(index.read_text())
    try:
        return dict(DiffusionPipeline.load_config(str(model)))
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"cannot load model {str(model)!r}: {_OFFLINE_HINT}") from exc


def family_of(model: str | Path) -> ModelFamily:
    """The family of a base model, from its ``model_index.json`` ``_class_name`` (a local folder or a hub id).

    Raises:
        FileNotFoundError: see ``read_model_index``.
        FamilyError: a pipeline class lorafleet has no family for (names the supported ones).
    """
    class_name = read_model_index(model).get("_class_name", "")
    for family in FAMILIES.values():
        if class_name in family.class_names:
            return family
    known = ", ".join(f"{c} ({f.name})" for f in FAMILIES.values() for c in f.class_names)
    raise FamilyError(
        f"base model {str(model)!r} is a {class_name or 'pipeline without _class_name'} in its model_index.json; "
        f"lorafleet trains and serves {known}. Use a model of one of these families (docs/model-families.md)"
    )


def family_for(pipe: DiffusionPipeline) -> ModelFamily:
    """The family of a loaded pipeline (the most specific family whose pipeline class it is an instance of).

    Raises:
        FamilyError: no family's pipeline class.
    """
    for family in FAMILIES.values():
        if type(pipe) is family.pipeline_class:
            return family
    for family in FAMILIES.values():
        if isinstance(pipe, family.pipeline_class):
            return family
    raise FamilyError(f"{type(pipe).__name__} belongs to no model family lorafleet knows ({', '.join(FAMILIES)})")


def load_pipeline(
    model: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    vae: str | Path | None = None,
) -> DiffusionPipeline:
    """Load a base model with its family's pipeline class (``from_pretrained`` on a folder or hub id), frozen in
    eval mode with the progress bar off; fp16 on CUDA, fp32 on CPU by default.

    Args:
        vae: another VAE folder or hub id to load instead of the model's own, e.g. SDXL's fp16-safe
            ``madebyollin/sdxl-vae-fp16-fix`` (SDXL's own VAE overflows in fp16; see ``training.precision``).

    Raises:
        FileNotFoundError: ``model`` (or ``vae``) is neither a diffusers folder nor loadable from the hub/cache.
        FamilyError: the model's pipeline class belongs to no family.
    """
    family = family_of(model)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    kwargs = {}
    if vae is not None:
        try:
            kwargs["vae"] = AutoencoderKL.from_pretrained(str(vae), dtype=dtype)
        except OSError as exc:
            raise FileNotFoundError(f"cannot load vae {str(vae)!r}: {_OFFLINE_HINT}") from exc
    try:
        pipe = family.pipeline_class.from_pretrained(str(model), dtype=dtype, **kwargs)
    except OSError as exc:
        raise FileNotFoundError(f"cannot load model {str(model)!r}: {_OFFLINE_HINT}") from exc
    pipe.set_progress_bar_config(disable=True)
    log.debug("loaded %s as %s", model, family)
    return pipe.to(device)
