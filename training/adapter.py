"""The adapter on disk: diffusers' LoRA format (safetensors) plus a small JSON that names and pins it.

    <dir>/pytorch_lora_weights.safetensors   # <Pipeline>.save_lora_weights (SD or SDXL family)
    <dir>/lorafleet_adapter.json             # schema_version, base model, rank, alpha, targets, trigger, sha256, …

Any diffusers user loads it with ``pipe.load_lora_weights(dir)``; ``load_adapter`` does the same after checking that
the file is safetensors, that its sha256 matches the JSON and that its keys fit the base model. The weights may also
be in kohya/A1111's or PEFT's layout (``training/lora_formats.py`` reads them with diffusers' and PEFT's own code);
an adapter that injects no LoRA layer is refused, never served as the bare base model.

``lorafleet_adapter.json`` is versioned (``schema_version``, ``AdapterMeta``): keys this version does not know are
kept (and written back), missing optional keys take their defaults, a wrong type is an ``AdapterError`` naming the key.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from training.adapter_meta import (  # noqa: F401 - re-exported: the metadata half, which needs no torch
    META_NAME,
    PROJECT_ROOT,
    SCHEMA_VERSION,
    WEIGHTS_NAME,
    AdapterError,
    AdapterMeta,
    base_model_id,
    file_sha256,
    json_ready,
    portable_model_name,
    read_meta,
    verify_adapter,
)
from training.lora_formats import LoraFile, LoraFormatError, drop, load_lora, read_lora


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)


def canonical_safetensors(path: str | Path) -> Path:
    """Rewrite a safetensors file's JSON header with sorted keys, in place; the tensor bytes are copied unchanged.

    The format (https://github.com/huggingface/safetensors#format) is an 8-byte little-endian header length, a JSON
    header (``__metadata__`` and each tensor's dtype, shape and ``data_offsets``, relative to the data), padded with
    spaces to a multiple of 8, then the data. The Rust writer keeps ``__metadata__`` in a ``HashMap`` whose order
    changes from process to process, so the same tensors and metadata got another sha256 on every save; sorted, they
    always give the same bytes. Any safetensors reader reads the result (only the header's key order differs).

    Raises:
        OSError: the file cannot be read or replaced.
        ValueError: the file is not safetensors (its header is not JSON of the stated length).
    """
    path = Path(path)
    with path.open("rb") as src:
        size = int.from_bytes(src.read(8), "little")
        header = json.loads(src.read(size))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("wb") as dst:
            dst.write(len(text).to_bytes(8, "little") + text)
            shutil.copyfileobj(src, dst)
    tmp.replace(path)
    return path


def save_adapter(
    out_dir: str | Path,
    unet: torch.nn.Module | None,
    meta: AdapterMeta,
    text_encoder: torch.nn.Module | None = None,
    adapter_name: str = "default",
    *,
    text_encoder_2: torch.nn.Module | None = None,
    family: str | None = None,
) -> Path:
    """Write the LoRA weights of ``adapter_name`` in ``unet`` (and each text encoder) in diffusers format with their
    LoraConfig as metadata, then the JSON with their hash. Returns ``out_dir``.

    The file is what ``<Pipeline>.save_lora_weights`` writes (keys ``unet.…``, ``text_encoder.…``,
    ``text_encoder_2.…``): SDXL's second text encoder (``text_encoder_2``) is saved through
    ``StableDiffusionXLPipeline``, so ``load_lora_weights`` on a plain SDXL pipeline reads it. ``family`` (the base
    model's, ``training.families``) is recorded in the JSON, so exports and checks need not find the base model;
    None keeps ``meta.family``, or records ``sdxl`` when ``text_encoder_2`` is given.
    """
    from training.families import FAMILIES

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers, metadata = {}, {}
    modules = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    for part, model in modules.items():
        if model is not None:
            model = _unwrap(model)
            state = get_peft_model_state_dict(model, adapter_name=adapter_name)
            layers[part] = convert_state_dict_to_diffusers(state)
            # sets (target_modules) sorted: diffusers writes them in set order, which changes with PYTHONHASHSEED,
            # so the same adapter would get another sha256 in every process
            metadata[part] = json_ready(model.peft_config[adapter_name].to_dict())
    meta.family = family or meta.family or ("sdxl" if text_encoder_2 is not None else None)
    FAMILIES[meta.family or "sd"].save_lora_weights(str(out), WEIGHTS_NAME, layers, metadata)
    canonical_safetensors(out / WEIGHTS_NAME)  # the same adapter: the same bytes and sha256 in any process
    meta.sha256 = file_sha256(out / WEIGHTS_NAME)
    meta.weights = WEIGHTS_NAME
    (out / META_NAME).write_text(meta.to_json())
    return out


def load_adapter(pipe: DiffusionPipeline, adapter_dir: str | Path, adapter_name: str = "default") -> AdapterMeta:
    """Verify, check the adapter's model family and its weights against ``pipe``'s modules (every LoRA-loadable one:
    ``unet``, ``text_encoder``, SDXL's ``text_encoder_2``), then load them with diffusers' loaders; the weights may
    be in diffusers, kohya/A1111 or PEFT layout (``training.lora_formats``).

    Raises:
        AdapterError: verification failed; the adapter was made for another model family than ``pipe``'s (an SD 1.x
            adapter on SDXL or the reverse, naming both base models); no key matches a module of ``pipe`` (naming
            the first keys); a module's shapes differ; every up weight is zero; or no LoRA layer was injected.
            Nothing stays loaded then.
    """
    meta = verify_adapter(adapter_dir)
    label = f"adapter {Path(adapter_dir).name!r} ({adapter_dir})"
    bases = f"adapter made for base model {base_model_id(meta.base_model)!r}; base model here: {pipe_base(pipe)!r}"
    unet = getattr(pipe, "unet", None)
    try:
        lora = read_lora(Path(adapter_dir) / meta.weights, unet_config=getattr(unet, "config", None))
    except LoraFormatError as exc:
        raise AdapterError(f"{exc} ({bases})") from exc
    check_family(pipe, meta, lora, label)
    try:
        load_lora(pipe, lora, adapter_name, label)
    except LoraFormatError as exc:
        raise AdapterError(f"{exc} ({bases})") from exc
    except Exception as exc:  # noqa: BLE001 - shapes or keys that do not fit this base model
        drop(pipe, adapter_name)
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise AdapterError(
            f"{adapter_dir}: the weights do not fit base model {pipe_base(pipe)!r} as loaded here "
            f"({type(exc).__name__}: {first}); it was made for {base_model_id(meta.base_model)!r}, another model or "
            "architecture — retrain it on this one"
        ) from exc
    return meta


def pipe_base(pipe: DiffusionPipeline) -> str:
    """The base model a loaded pipeline came from (``base_model_id`` of its ``from_pretrained`` folder or hub id)."""
    name = getattr(pipe, "name_or_path", None)
    return base_model_id(name) if name else f"a {type(pipe).__name__} built in memory"


def adapter_family(base_model: str, lora: LoraFile | None = None) -> str | None:
    """The model family (``training.families``) an adapter was made for, without downloading anything: its base
    model's, when that is a local diffusers folder (project-relative too) or a hub id in the local Hugging Face
    cache; else ``sdxl`` when the file holds ``text_encoder_2`` keys (only SDXL has a second text encoder); else
    None (unknown: the keys and shapes are still checked against the pipeline)."""
    from training.families import FamilyError, family_of

    path = Path(base_model).expanduser()
    if not path.is_absolute() and not path.exists() and (PROJECT_ROOT / path).exists():
        path = PROJECT_ROOT / path
    folder = path if (path / "model_index.json").is_file() else None
    if folder is None and not path.exists() and len(Path(base_model).parts) == 2:  # org/name: the cache only
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(base_model, "model_index.json")
        except ValueError:  # not a valid hub id
            cached = None
        folder = Path(cached).parent if isinstance(cached, str) else None
    if folder is not None:
        try:
            return family_of(folder).name
        except (FamilyError, FileNotFoundError, ValueError):
            pass
    if lora is not None and any(k.startswith("text_encoder_2.") for k in lora.state):
        return "sdxl"
    return None


def check_family(pipe: DiffusionPipeline, meta: AdapterMeta, lora: LoraFile | None, label: str) -> None:
    """Refuse an adapter made for another model family than ``pipe``'s (``adapter_family``), before any weight is
    loaded: the modules of SD 1.x and SDXL share names, so some would load and draw wrongly.

    Raises:
        AdapterError: naming both base models and families, and what to do.
    """
    from training.families import FamilyError, family_for

    made_for = meta.family or adapter_family(meta.base_model, lora)
    try:
        here = family_for(pipe)
    except FamilyError:
        return  # a pipeline class lorafleet has no family for: the keys and shapes decide
    if made_for is not None and made_for != here.name:
        raise AdapterError(
            f"{label} was made for base model {base_model_id(meta.base_model)!r} (model family {made_for}), but the "
            f"base model here is {pipe_base(pipe)!r} (model family {here.name}, {type(pipe).__name__}): a {made_for} "
            f"adapter cannot load on a {here.name} model. Serve it with its own base model (one replica serves one "
            "base model), or retrain it on this one"
        )


def load_into_training(
    adapter_dir: str | Path,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    text_encoder_2: torch.nn.Module | None = None,
) -> None:
    """Load saved LoRA weights into the adapter already injected for training (resume: no second adapter).

    Raises:
        AdapterError: the file fails verification or its keys do not fit the injected adapter.
    """
    meta = verify_adapter(adapter_dir)
    state, _ = StableDiffusionXLPipeline.lora_state_dict(str(adapter_dir), weight_name=meta.weights)
    modules = (("unet.", unet), ("text_encoder.", text_encoder), ("text_encoder_2.", text_encoder_2))
    for prefix, module in modules:
        if module is None:
            continue
        part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        part = convert_unet_state_dict_to_peft(part) if prefix == "unet." else convert_state_dict_to_peft(part)
        result = set_peft_model_state_dict(_unwrap(module), part, adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise AdapterError(f"{adapter_dir}: checkpoint keys do not fit this adapter (e.g. {unexpected[0]})")
