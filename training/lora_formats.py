"""LoRA files as other tools write them, read and checked against a base model with diffusers' and PEFT's own code.

| format | keys (Stable Diffusion 1.x/2.x) | written by |
| --- | --- | --- |
| ``diffusers`` | ``unet.<module>.lora.down.weight`` or ``.lora_A.weight``; ``text_encoder.…`` | ``save_lora_weights`` |
| ``kohya`` | ``lora_unet_<module_with_underscores>.lora_down.weight``, ``.lora_up…``, ``.alpha`` | sd-scripts, A1111 |
| ``peft`` | ``base_model.model.<module>.lora_A.weight`` + ``adapter_config.json`` | ``PeftModel.save_pretrained`` |

``read_lora`` turns any of them into one diffusers-layout state dict (kohya through diffusers'
``StableDiffusionPipeline.lora_state_dict``, which calls ``_convert_non_diffusers_lora_to_diffusers``; PEFT's by
its documented key prefix and ``LoraConfig.from_pretrained``), ``match_base`` says which modules of a pipeline the
keys name and whether the shapes fit, and ``load_lora`` injects it under an adapter name — and refuses a file that
injected nothing, the failure that used to serve a PEFT-layout file as the bare base model. ``to_kohya`` writes the
A1111/ComfyUI layout with diffusers' ``convert_state_dict_to_kohya``, each module's real alpha kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

KOHYA_PREFIXES = ("lora_te_", "lora_unet_", "lora_te1_", "lora_te2_")  # what diffusers' lora_state_dict converts
PEFT_PREFIX = "base_model.model."  # PeftModel.save_pretrained's keys
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
COMPONENTS = ("unet", "text_encoder")
SHOWN = 5  # keys named in a message


class LoraFormatError(ValueError):
    """The file is not a LoRA this project can read, or it does not fit the base model (the message says which)."""


@dataclass
class LoraFile:
    """A LoRA in diffusers layout, whatever layout it was read from.

    ``state``: ``unet.…`` / ``text_encoder.…`` keys; ``network_alphas`` (kohya's per-module alpha) or ``metadata``
    (a PEFT ``LoraConfig`` per component, keys ``unet.r``, ``unet.lora_alpha``, …) — never both (diffusers' rule).
    """

    path: Path
    source_format: str  # diffusers | kohya | peft
    state: dict[str, torch.Tensor]
    network_alphas: dict[str, float] | None = None
    metadata: dict | None = None
    raw_keys: list[str] = field(default_factory=list)  # the keys as they are in the file


@dataclass
class BaseMatch:
    """Which LoRA modules of a file exist in the base model, and where the shapes disagree."""

    modules: dict[str, list[str]]  # component -> module paths the file holds LoRA weights for
    matched: dict[str, list[str]]  # component -> those that exist in the base model with fitting shapes
    unmatched: list[str]  # "unet.<module>": not a module of the base model
    mismatched: list[str]  # "unet.<module>: lora_A [4, 32] needs in 64 …"

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.matched.values())


def detect_format(keys: list[str]) -> str:
    """``diffusers``, ``kohya`` or ``peft`` from a state dict's keys (see the module's table).

    Raises:
        LoraFormatError: none of them, naming the first keys.
    """
    if keys and all(k.startswith(KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if keys and all(k.startswith(PEFT_PREFIX) for k in keys):
        return "peft"
    if keys and all(k.startswith(tuple(f"{c}." for c in COMPONENTS)) for k in keys):
        return "diffusers"
    raise LoraFormatError(
        f"keys {keys[:SHOWN]} are none of the LoRA layouts read here: diffusers (unet.…, text_encoder.…), "
        f"kohya/A1111 ({', '.join(KOHYA_PREFIXES)}…) or PEFT ({PEFT_PREFIX}… with {PEFT_CONFIG})"
    )


def weights_file(path: str | Path) -> Path:
    """The safetensors file ``path`` names: the file itself, or the one LoRA file of a folder.

    Raises:
        LoraFormatError: a pickle file (``.bin``/``.pt``/``.ckpt`` can run code when loaded), or no single
            safetensors file in the folder.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        found = [path / n for n in (PEFT_WEIGHTS, DIFFUSERS_WEIGHTS) if (path / n).is_file()]
        found = found or sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            why = f"pickle files {pickles} are not loaded (they can run code)" if pickles else "none found"
            raise LoraFormatError(f"{path}: expected one .safetensors LoRA file, {why}; name the file instead")
        path = found[0]
    if path.suffix in PICKLE_SUFFIXES:
        raise LoraFormatError(
            f"{path}: pickle files are not loaded (they can run code); convert it once where you trust it: "
            "safetensors.torch.save_file(torch.load(f), 'lora.safetensors')"
        )
    if path.suffix != ".safetensors" or not path.is_file():
        raise LoraFormatError(f"{path} is not a .safetensors file")
    return path


def read_lora(path: str | Path) -> LoraFile:
    """Read a LoRA file (or a folder holding one) in any layout of the module's table into diffusers layout.

    Raises:
        LoraFormatError: not safetensors, not readable, or keys of no known layout.
    """
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    file = weights_file(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            raw_keys = list(f.keys())
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise LoraFormatError(f"{file}: not a readable safetensors file ({exc})") from exc
    fmt = detect_format(raw_keys)
    if fmt == "peft":
        return _read_peft(file, raw_keys)
    # diffusers' own reader: kohya/A1111 keys (and their .alpha) are converted, saved LoraConfig metadata kept
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
        str(file.parent), weight_name=file.name, use_safetensors=True, return_lora_metadata=True
    )
    return LoraFile(file, fmt, state, alphas or None, metadata or None, raw_keys)


def _read_peft(file: Path, raw_keys: list[str]) -> LoraFile:
    """PEFT's ``base_model.model.<module>.lora_A.weight`` keys: one model per file, the text encoder's modules start
    with ``text_model.``; the scale comes from the ``adapter_config.json`` next to it (PEFT's ``LoraConfig``)."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    config_path = file.parent / PEFT_CONFIG
    if not config_path.is_file():
        raise LoraFormatError(
            f"{file} is in PEFT's layout but {config_path.name} (its rank and lora_alpha) is not next to it; "
            "copy the adapter_config.json saved with it into the same folder"
        )
    try:
        config = LoraConfig.from_pretrained(str(file.parent)).to_dict()
    except Exception as exc:  # noqa: BLE001 - unreadable or not a LoRA config
        raise LoraFormatError(f"{config_path}: not a PEFT LoraConfig ({exc})") from exc
    component = "text_encoder" if all(k[len(PEFT_PREFIX) :].startswith("text_model.") for k in raw_keys) else "unet"
    state = {f"{component}.{k.removeprefix(PEFT_PREFIX)}": v for k, v in load_file(str(file)).items()}
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}  # JSON-able, as diffusers saves
    metadata = {f"{component}.{k}": v for k, v in config.items()}
    return LoraFile(file, "peft", state, None, metadata, raw_keys)


def peft_state(lora: LoraFile, component: str) -> dict[str, torch.Tensor]:
    """One component's keys in PEFT naming (``<module>.lora_A.weight``), via diffusers' converters."""
    part = {k.removeprefix(f"{component}."): v for k, v in lora.state.items() if k.startswith(f"{component}.")}
    return _to_peft(part, component)


def _to_peft(part: dict, component: str) -> dict:
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    if not part:
        return {}
    if any(".lora_A." in k or ".lora_B." in k for k in part):
        return part
    return convert_unet_state_dict_to_peft(part) if component == "unet" else convert_state_dict_to_peft(part)


def match_base(pipe, lora: LoraFile) -> BaseMatch:
    """Compare the file's LoRA modules with ``pipe``'s: which exist, and whether ``lora_A`` takes the module's input
    width and ``lora_B`` gives its output width (Linear weight ``[out, in]``, Conv2d ``[out, in, kh, kw]``)."""
    modules, matched, unmatched, mismatched = {}, {}, [], []
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        part = peft_state(lora, component)
        names = sorted({k.split(".lora_", 1)[0] for k in part if ".lora_A." in k or ".lora_B." in k})
        modules[component], matched[component] = names, []
        for name in names:
            try:
                target = model.get_submodule(name) if model is not None else None
            except AttributeError:
                target = None
            weight = getattr(getattr(target, "base_layer", target), "weight", None)
            if weight is None:
                unmatched.append(f"{component}.{name}")
                continue
            a, b = part.get(f"{name}.lora_A.weight"), part.get(f"{name}.lora_B.weight")
            if a is None or b is None or a.shape[1] != weight.shape[1] or b.shape[0] != weight.shape[0]:
                shapes = f"lora_A {list(getattr(a, 'shape', []))}, lora_B {list(getattr(b, 'shape', []))}"
                mismatched.append(f"{component}.{name}: {shapes} vs base weight {list(weight.shape)}")
                continue
            matched[component].append(name)
    return BaseMatch(modules, matched, unmatched, mismatched)


def check_fits(pipe, lora: LoraFile, label: str) -> BaseMatch:
    """``match_base``, refusing a file that fits nothing, has a module of the wrong shape, or changes nothing.

    Raises:
        LoraFormatError: naming ``label``, the first unmatched keys or mismatched shapes, and what to do.
    """
    found = match_base(pipe, lora)
    if found.mismatched:
        raise LoraFormatError(
            f"{label}: {len(found.mismatched)} LoRA module(s) do not fit base model shapes, e.g. "
            f"{found.mismatched[:3]}; it was trained for another model (rank is free, widths are not)"
        )
    if found.count == 0:
        raw = lora.raw_keys or sorted(lora.state)
        raise LoraFormatError(
            f"{label}: no key matches a module of the base model (first keys: {raw[:SHOWN]}; read as "
            f"{lora.source_format} layout); it was made for another model family or layout — nothing was loaded"
        )
    ups = [v for c in COMPONENTS for k, v in peft_state(lora, c).items() if ".lora_B." in k]
    if ups and all(not v.any() for v in ups):
        raise LoraFormatError(f"{label}: every lora_B/lora_up weight is zero, so it changes nothing; it is untrained")
    if found.unmatched:
        log.warning(
            "%s: %d of %d LoRA modules are not in the base model and are ignored: %s",
            label, len(found.unmatched), len(found.unmatched) + found.count, found.unmatched[:SHOWN],
        )  # fmt: skip
    return found


def injected(pipe, adapter_name: str) -> dict[str, list[str]]:
    """component -> module paths where PEFT holds a LoRA layer for ``adapter_name`` (what really changes outputs)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if model is not None:
            layers = model.named_modules()
            out[component] = [n for n, m in layers if isinstance(m, LoraLayer) and adapter_name in m.lora_A]
    return out


def load_lora(pipe, lora: LoraFile, adapter_name: str, label: str) -> BaseMatch:
    """Check ``lora`` against ``pipe`` (``check_fits``), inject it as ``adapter_name`` with diffusers' loaders, then
    check that every matched module got a LoRA layer. On any failure nothing stays injected.

    Raises:
        LoraFormatError: it does not fit, or fewer modules were injected than matched.
    """
    found = check_fits(pipe, lora, label)
    parts = [c for c in COMPONENTS if found.matched[c]]
    try:
        if "unet" in parts:
            pipe.load_lora_into_unet(
                lora.state, lora.network_alphas, pipe.unet, adapter_name=adapter_name,
                _pipeline=pipe, metadata=lora.metadata,
            )  # fmt: skip
        if "text_encoder" in parts:
            pipe.load_lora_into_text_encoder(
                lora.state, lora.network_alphas, pipe.text_encoder,
                lora_scale=pipe.lora_scale, adapter_name=adapter_name, _pipeline=pipe, metadata=lora.metadata,
            )  # fmt: skip
        got = injected(pipe, adapter_name)
        missing = [f"{c}.{m}" for c in parts for m in sorted(set(found.matched[c]) - set(got.get(c, [])))]
        if missing or not any(got.values()):
            raise LoraFormatError(
                f"{label}: LoRA layers were injected into {sum(map(len, got.values()))} of {found.count} matching "
                f"modules (not injected: {missing[:SHOWN]}); the adapter would not change the images as its file says"
            )
    except Exception:
        drop(pipe, adapter_name)
        raise
    return found


def drop(pipe, adapter_name: str) -> None:
    """Remove whatever a failed load injected under ``adapter_name``, so the pipeline serves as before."""
    parts = (getattr(pipe, c, None) for c in COMPONENTS)
    if any(adapter_name in (getattr(p, "peft_config", None) or {}) for p in parts if p is not None):
        pipe.delete_adapters(adapter_name)


def to_kohya(lora: LoraFile) -> dict[str, torch.Tensor]:
    """The A1111/ComfyUI (kohya) layout of ``lora`` via diffusers' ``convert_state_dict_to_kohya``, with each
    module's ``.alpha`` set to the alpha it was trained with (the converter writes alpha = rank, scale 1, which
    would change every image of an adapter trained with alpha != rank).

    Raises:
        LoraFormatError: a module's alpha cannot be told (no LoraConfig metadata and no kohya alphas).
    """
    from diffusers.utils import convert_state_dict_to_kohya

    out: dict[str, torch.Tensor] = {}
    for component in COMPONENTS:
        part = peft_state(lora, component)
        for module in sorted({k.split(".lora_", 1)[0] for k in part}):
            keys = {f"{component}.{k}": v for k, v in part.items() if k.split(".lora_", 1)[0] == module}
            converted = convert_state_dict_to_kohya(keys)
            rank = part[f"{module}.lora_A.weight"].shape[0]
            alpha = module_alpha(lora, component, module, rank)
            for k, v in converted.items():
                out[k] = torch.tensor(alpha) if k.endswith(".alpha") else v.contiguous()
    return out


def module_alpha(lora: LoraFile, component: str, module: str, rank: int) -> float:
    """The LoRA alpha of one module (scale = alpha / rank): kohya's per-module alpha, else PEFT's ``alpha_pattern`` /
    ``lora_alpha`` from the saved config, else rank (scale 1, what a LoRA saved without either means)."""
    from peft.utils.other import get_pattern_key

    for key, alpha in (lora.network_alphas or {}).items():  # unet.<module>.alpha or unet.<down weight>.alpha
        name = key.removesuffix(".alpha")
        if name.startswith(f"{component}."):
            name = name.removeprefix(f"{component}.")
            if name.endswith(".weight"):
                name = next(iter(_to_peft({name: alpha}, component))).split(".lora_", 1)[0]
            if name == module:
                return float(alpha)
    prefix = f"{component}."
    meta = {k.removeprefix(prefix): v for k, v in (lora.metadata or {}).items() if k.startswith(prefix)}
    if meta:
        pattern = meta.get("alpha_pattern") or {}
        key = get_pattern_key(pattern.keys(), module) if pattern else None
        return float(pattern[key]) if key in pattern else float(meta.get("lora_alpha", rank))
    return float(rank)
