"""The adapter's metadata and checks that need neither torch nor diffusers: ``lorafleet_adapter.json``
(``AdapterMeta``), the weights' sha256 and the base model's portable name.

Kept apart from ``training.adapter`` (which loads and saves weights with diffusers/PEFT, and re-exports every name
here) so that processes which only read metadata — the registry client, the Serve ingress and its one-replica stores,
the ``lorafleet`` CLIs — never import torch: about 600 MB of memory per process and seconds of start-up.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # compared lower-cased: LORA.PT is a pickle too
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
        return json.dumps(json_ready(self.model_dump()), indent=2) + "\n"


def json_ready(value: Any) -> Any:
    """``value`` as JSON-able data with every set a sorted list (set order changes with PYTHONHASHSEED)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted((json_ready(v) for v in value), key=repr)
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
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
        raise AdapterError(f"{meta_path}: {problems}; fix the key (see training/adapter_meta.py AdapterMeta)") from exc


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


def is_pickle(path: str | Path) -> bool:
    """A file name with a pickle suffix (``PICKLE_SUFFIXES``, any case): such files can run code when loaded."""
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


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
