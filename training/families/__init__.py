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
    "load_vae",
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
    index = read_model_index(model)
    class_name = index.get("_class_name", "")
    for family in FAMILIES.values():
        if class_name in family.class_names:
            missing = [n for n in (*family.text_encoder_names, *family.tokenizer_names) if not _component(index, n)]
            if missing:
                raise FamilyError(
                    f"base model {str(model)!r} is a {class_name} without {', '.join(missing)} in its "
                    f"model_index.json (a refiner?); lorafleet trains on {family.name} models that have all of "
                    f"{', '.join((*family.text_encoder_names, *family.tokenizer_names))}"
                )
            return family
    known = ", ".join(f"{c} ({f.name})" for f in FAMILIES.values() for c in f.class_names)
    raise FamilyError(
        f"base model {str(model)!r} is a {class_name or 'pipeline without _class_name'} in its model_index.json; "
        f"lorafleet trains and serves {known}. Use a model of one of these families (docs/model-families.md)"
    )


def _component(index: dict, name: str) -> bool:
    """Whether ``model_index.json`` lists the component ``name`` (``[library, class]`` with a class, not nulls)."""
    entry = index.get(name)
    return isinstance(entry, list | tuple) and len(entry) == 2 and entry[1] is not None


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


def load_vae(vae: str | Path, model: str | Path, dtype: torch.dtype) -> AutoencoderKL:
    """An ``AutoencoderKL`` to use instead of ``model``'s own: a VAE folder or hub id, or a pipeline folder's
    ``vae/``. It must share the model's latent space as far as its config tells: the same ``latent_channels`` and
    ``scaling_factor`` (an SD 1.x VAE, 0.18215, on SDXL, 0.13025, would train and draw garbage without an error).

    Raises:
        FileNotFoundError: not loadable (not a folder, not in the Hugging Face cache).
        FamilyError: not a VAE, or another latent space than the model's VAE.
    """
    local = Path(vae).expanduser()
    subfolder = "vae" if (local / "model_index.json").is_file() and (local / "vae").is_dir() else None
    try:
        loaded = AutoencoderKL.from_pretrained(str(vae), subfolder=subfolder, dtype=dtype)
    except OSError as exc:
        where = "it has no VAE config (config.json)" if local.exists() else _OFFLINE_HINT
        raise FileNotFoundError(f"cannot load vae {str(vae)!r}: {where}") from exc
    except (ValueError, TypeError) as exc:
        raise FamilyError(f"vae {str(vae)!r} is not an AutoencoderKL folder ({exc}); point it at a VAE") from exc
    try:
        own = dict(AutoencoderKL.load_config(str(model), subfolder="vae"))
    except (OSError, ValueError):
        return loaded  # the model's own VAE config is not readable here: nothing to compare with
    for key in ("latent_channels", "scaling_factor"):
        if own.get(key) is not None and loaded.config.get(key) != own.get(key):
            raise FamilyError(
                f"vae {str(vae)!r} has {key}={loaded.config.get(key)}, base model {str(model)!r}'s VAE "
                f"{own.get(key)}: it encodes another latent space; use a VAE made for this model (for SDXL "
                "madebyollin/sdxl-vae-fp16-fix) or none"
            )
    return loaded


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
        kwargs["vae"] = load_vae(vae, model, dtype)
    try:
        pipe = family.pipeline_class.from_pretrained(str(model), dtype=dtype, **kwargs)
    except OSError as exc:
        raise FileNotFoundError(f"cannot load model {str(model)!r}: {_OFFLINE_HINT}") from exc
    pipe.set_progress_bar_config(disable=True)
    log.debug("loaded %s as %s", model, family)
    return pipe.to(device)
