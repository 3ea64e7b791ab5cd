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

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from training.lora_formats import LoraFile, LoraFormatError, drop, is_pickle, load_lora, read_lora

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
META_NAME = "lorafleet_adapter.json"


SCHEMA_VERSION = 1  # of lorafleet_adapter.json; a file with a higher one was written by a newer lorafleet


class AdapterError(ValueError):
    """An adapter folder or file that cannot be served: bad metadata, weights, hash, layout or fit (HTTP 422)."""


class AdapterMeta(BaseModel):
    """``lorafleet_adapter.json``, schema version 1. Unknown keys (a ``license``, a tool's own notes) are kept in
    ``model_extra`` and written back; every key but ``base_model`` has a default."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    # strict: "4", 4.0 or true is not a rank, "yes" not a bool, "2" not a schema version (JSON says what it means)
    schema_version: int = Field(SCHEMA_VERSION, ge=1, strict=True, description="version of this JSON's schema")
    base_model: str = Field(description="the base model it was trained on: hub id or project-relative folder")
    rank: int | None = Field(None, ge=1, strict=True, description="LoRA rank r (None: not known, e.g. mixed ranks)")
    alpha: float | None = Field(
        None, strict=True, allow_inf_nan=False, description="LoRA alpha, finite and not 0 (may be negative, as kohya "
        "allows); scale = alpha / rank"
    )  # fmt: skip
    target_modules: list[str] = Field(default_factory=list, description="module names the LoRA wraps")
    text_encoder: bool = Field(False, strict=True, description="the weights file holds text-encoder LoRA weights")
    trigger: str | None = Field(None, description="the word its captions taught (e.g. sks)")
    dataset_hash: str | None = Field(None, description="sha256 fingerprint of the training dataset")
    sha256: str = Field("", description="sha256 of the weights file; checked before every load")
    weights: str = Field(WEIGHTS_NAME, description="the weights file in this folder (safetensors only)")
    training: dict[str, Any] = Field(default_factory=dict, description="step, epoch, config summary")
    source: str = Field("trained", description="trained (by lorafleet) or imported (lorafleet import-adapter)")
    source_format: str = Field("diffusers", description="layout the weights came in: diffusers | kohya | peft")
    family: Literal["sd", "sdxl"] | None = Field(
        None, description="model family of the base model (training.families: sd | sdxl); None: not recorded"
    )

    @field_validator("alpha", mode="before")
    @classmethod
    def _alpha_is_a_number(cls, value: Any) -> Any:
        if isinstance(value, bool):  # strict float still takes JSON true as 1.0
            raise ValueError("Input should be a number, not a boolean")
        if value == 0:
            raise ValueError("alpha 0 makes the adapter change nothing (scale = alpha / rank)")
        return value

    @field_validator("target_modules")
    @classmethod
    def _sorted_targets(cls, value: list[str]) -> list[str]:
        return sorted(set(value))  # a set in PEFT: one order, so the same adapter is the same JSON (and sha256)

    def to_json(self) -> str:
        """The JSON text, unknown keys included; sets are sorted lists, so equal metadata is equal bytes."""
        return json.dumps(_ordered(self.model_dump()), indent=2) + "\n"


def _ordered(value: Any) -> Any:
    """``value`` as JSON-able data with every set a sorted list (set order changes with PYTHONHASHSEED)."""
    if isinstance(value, dict):
        return {str(k): _ordered(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted((_ordered(v) for v in value), key=repr)
    if isinstance(value, list | tuple):
        return [_ordered(v) for v in value]
    return value if value is None or isinstance(value, str | int | float | bool) else str(value)


def read_meta(meta_path: Path) -> AdapterMeta:
    """Parse and validate ``lorafleet_adapter.json``.

    Raises:
        AdapterError: not JSON, not an object, a newer schema_version, or a key of the wrong type (named).
    """
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8-sig"))  # a BOM from a Windows editor is fine
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{meta_path} is not valid JSON ({exc}); fix the file or re-create the adapter") from exc
    except RecursionError as exc:
        raise AdapterError(f"{meta_path} is nested too deeply to read; it is not lorafleet adapter metadata") from exc
    except OSError as exc:
        raise AdapterError(f"{meta_path} cannot be read ({exc})") from exc
    if not isinstance(raw, dict):
        raise AdapterError(f"{meta_path} must hold a JSON object, not {type(raw).__name__}")
    version = raw.get("schema_version", SCHEMA_VERSION)
    if isinstance(version, int | float) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise AdapterError(
            f"{meta_path}: schema_version {version} was written by a newer lorafleet (this one reads "
            f"{SCHEMA_VERSION}); upgrade lorafleet"
        )
    try:
        return AdapterMeta.model_validate(raw)
    except RecursionError as exc:
        raise AdapterError(f"{meta_path} is nested too deeply to read; it is not lorafleet adapter metadata") from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"key {'.'.join(map(str, e['loc'])) or '(top level)'!r}: {e['msg']} (got {e.get('input')!r:.60})"
            for e in exc.errors()
        )
        raise AdapterError(f"{meta_path}: {problems}; fix the key (see training/adapter.py AdapterMeta)") from exc


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def base_model_id(name: str) -> str:
    """A base model's name that survives moving between machines, for comparing an adapter's base with a model's.

    Hub ids stay as they are (``stable-diffusion-v1-5/stable-diffusion-v1-5``); a snapshot in the Hugging Face
    cache (``…/models--org--name/snapshots/<rev>``) becomes its hub id; any other local folder becomes its
    folder name (``models/toy-sd`` and ``/abs/path/models/toy-sd`` are both ``toy-sd``).
    """
    path = Path(name).expanduser()
    if not path.is_absolute() and not path.exists() and (PROJECT_ROOT / path).exists():
        path = PROJECT_ROOT / path  # a project-relative folder (how adapters name the models they were trained on)
    looks_local = path.is_absolute() or name.startswith((".", "~")) or path.exists() or len(path.parts) != 2
    if not looks_local:
        return name
    for part in path.parts:
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/")
    return (path.resolve() if path.exists() else path).name or name


# where `ray job submit --working-dir` unpacks a project: <temp dir>/session_…/runtime_resources/working_dir_files/
# _ray_pkg_<hash>/<project-relative path>
_RAY_WORKING_DIR = re.compile(r"/working_dir_files/_ray_pkg_[0-9a-f]+/(.+?)/?$")


def portable_model_name(name: str) -> str:
    """How an adapter names its base model so the name means the same model elsewhere: a hub id as it is, a folder
    inside this project (also inside the copy ``ray job submit`` unpacks under /tmp/ray/session_…) relative to it
    (``models/toy-sd``), any other folder as an absolute path."""
    if unpacked := _RAY_WORKING_DIR.search(name.replace("\\", "/")):
        return unpacked.group(1)  # a job's copy of a project (this one or the one a driver ran from)
    path = Path(name).expanduser()
    if not path.is_absolute() and not path.exists():
        return name  # a hub id (or a relative path that only the project knows)
    try:
        return path.resolve().relative_to(PROJECT_ROOT).as_posix()
    except ValueError:
        return str(path.resolve())


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
            metadata[part] = _ordered(model.peft_config[adapter_name].to_dict())
    meta.family = family or meta.family or ("sdxl" if text_encoder_2 is not None else None)
    FAMILIES[meta.family or "sd"].save_lora_weights(str(out), WEIGHTS_NAME, layers, metadata)
    canonical_safetensors(out / WEIGHTS_NAME)  # the same adapter: the same bytes and sha256 in any process
    meta.sha256 = file_sha256(out / WEIGHTS_NAME)
    meta.weights = WEIGHTS_NAME
    (out / META_NAME).write_text(meta.to_json())
    return out


def verify_adapter(adapter_dir: str | Path) -> AdapterMeta:
    """Check the folder holds a safetensors adapter whose sha256 matches its JSON; return the metadata.

    Raises:
        AdapterError: missing JSON/weights, a non-safetensors weights file, or a hash mismatch.
    """
    root = Path(adapter_dir)
    meta_path = root / META_NAME
    if not meta_path.is_file():
        raise AdapterError(f"{root} has no {META_NAME}: not a lorafleet adapter folder (train one with training.train)")
    meta = read_meta(meta_path)
    weights = root / meta.weights
    if Path(meta.weights).name != meta.weights:
        raise AdapterError(f"{meta_path}: key 'weights' must be a file name in {root}, not a path ({meta.weights!r})")
    if weights.suffix.lower() != ".safetensors" or any(is_pickle(p) for p in root.iterdir()):
        raise AdapterError(
            f"{root}: only safetensors adapters are loaded (pickle files can run code); convert it with "
            "safetensors.torch.save_file and list the .safetensors file in the JSON"
        )
    if not weights.is_file():
        raise AdapterError(f"{weights} is missing; the adapter folder is incomplete")
    actual = file_sha256(weights)
    if actual != meta.sha256:
        raise AdapterError(
            f"{weights} sha256 {actual[:12]}… does not match {META_NAME} ({meta.sha256[:12]}…): "
            "the file was changed or corrupted; re-download or re-train it"
        )
    return meta


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
