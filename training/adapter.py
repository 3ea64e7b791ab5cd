"""The adapter on disk: diffusers' LoRA format (safetensors) plus a small JSON that names and pins it.

    <dir>/pytorch_lora_weights.safetensors   # StableDiffusionPipeline.save_lora_weights
    <dir>/lorafleet_adapter.json             # base model, rank, alpha, targets, trigger, dataset hash, sha256

Any diffusers user loads it with ``pipe.load_lora_weights(dir)``; ``load_adapter`` does the same after
checking that the file is safetensors and that its sha256 matches the JSON.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from peft import get_peft_model_state_dict, set_peft_model_state_dict

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
META_NAME = "lorafleet_adapter.json"


class AdapterError(ValueError):
    pass


@dataclass
class AdapterMeta:
    base_model: str
    rank: int
    alpha: float
    target_modules: list[str]
    text_encoder: bool = False
    trigger: str | None = None
    dataset_hash: str | None = None
    sha256: str = ""
    weights: str = WEIGHTS_NAME
    training: dict = field(default_factory=dict)  # step, epoch, config summary


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


def save_adapter(
    out_dir: str | Path, unet: torch.nn.Module, meta: AdapterMeta, text_encoder: torch.nn.Module | None = None
) -> Path:
    """Write the LoRA weights of ``unet`` (and ``text_encoder``) in diffusers format, then the JSON with their hash."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet = _unwrap(unet)
    kwargs = {
        "unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        "unet_lora_adapter_metadata": unet.peft_config["default"].to_dict(),
    }
    if text_encoder is not None:
        text_encoder = _unwrap(text_encoder)
        kwargs["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
        kwargs["text_encoder_lora_adapter_metadata"] = text_encoder.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(out, weight_name=WEIGHTS_NAME, safe_serialization=True, **kwargs)
    meta.sha256 = file_sha256(out / WEIGHTS_NAME)
    meta.weights = WEIGHTS_NAME
    (out / META_NAME).write_text(json.dumps(asdict(meta), indent=2) + "\n")
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
    meta = AdapterMeta(**json.loads(meta_path.read_text()))
    weights = root / meta.weights
    if weights.suffix != ".safetensors" or any(root.glob("*.bin")) or any(root.glob("*.pt")):
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


def load_adapter(pipe: StableDiffusionPipeline, adapter_dir: str | Path, adapter_name: str = "default") -> AdapterMeta:
    """Verify, then ``pipe.load_lora_weights`` — the plain diffusers call any user makes."""
    meta = verify_adapter(adapter_dir)
    try:
        pipe.load_lora_weights(str(adapter_dir), weight_name=meta.weights, adapter_name=adapter_name)
    except Exception as exc:  # noqa: BLE001 - shapes or keys that do not fit this base model
        _drop_partial(pipe, adapter_name)
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise AdapterError(
            f"{adapter_dir}: the weights do not fit base model {base_model_id(meta.base_model)!r} as loaded here "
            f"({type(exc).__name__}: {first}); it was made for another model or architecture — retrain it on this one"
        ) from exc
    return meta


def _drop_partial(pipe: StableDiffusionPipeline, adapter_name: str) -> None:
    """Remove what a failed load injected under ``adapter_name``, so the pipeline serves as before."""
    parts = (pipe.unet, getattr(pipe, "text_encoder", None))
    if any(adapter_name in (getattr(part, "peft_config", None) or {}) for part in parts if part is not None):
        pipe.delete_adapters(adapter_name)


def load_into_training(adapter_dir: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> None:
    """Load saved LoRA weights into the adapter already injected for training (resume: no second adapter).

    Raises:
        AdapterError: the file fails verification or its keys do not fit the injected adapter.
    """
    meta = verify_adapter(adapter_dir)
    state, _ = StableDiffusionPipeline.lora_state_dict(str(adapter_dir), weight_name=meta.weights)
    for prefix, module in (("unet.", unet), ("text_encoder.", text_encoder)):
        if module is None:
            continue
        part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        part = convert_unet_state_dict_to_peft(part) if prefix == "unet." else convert_state_dict_to_peft(part)
        result = set_peft_model_state_dict(_unwrap(module), part, adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise AdapterError(f"{adapter_dir}: checkpoint keys do not fit this adapter (e.g. {unexpected[0]})")
