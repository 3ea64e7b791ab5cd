"""LoRA files as other tools write them, read and checked against a base model with diffusers' and PEFT's own code.

| format | keys (Stable Diffusion 1.x/2.x) | written by |
| --- | --- | --- |
| ``diffusers`` | ``unet.<module>.lora.down.weight`` or ``.lora_A.weight``; ``text_encoder.…`` | ``save_lora_weights`` |
| ``kohya`` | ``lora_unet_<module_with_underscores>.lora_down.weight``, ``.lora_up…``, ``.alpha`` | sd-scripts, A1111 |
| ``peft`` | ``base_model.model.<module>.lora_A.weight`` + ``adapter_config.json`` | ``PeftModel.save_pretrained`` |

SDXL adds its second text encoder: ``text_encoder_2.…`` (diffusers), ``lora_te1_…`` + ``lora_te2_…`` (kohya).

``read_lora`` turns any of them into one diffusers-layout state dict (kohya through diffusers'
``StableDiffusionPipeline.lora_state_dict``, which calls ``_convert_non_diffusers_lora_to_diffusers``; PEFT's by
its documented key prefix and ``LoraConfig.from_pretrained``), ``match_base`` says which modules of a pipeline the
keys name and whether the shapes fit, and ``load_lora`` injects it under an adapter name — and refuses a file that
injected nothing, the failure that used to serve a PEFT-layout file as the bare base model. ``to_kohya`` writes the
A1111/ComfyUI layout with diffusers' ``convert_state_dict_to_kohya``, each module's real alpha kept. Components are
the pipeline's LoRA-loadable modules (``COMPONENTS``); a pipeline without one (SD has no ``text_encoder_2``) has no
module for that component's keys.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from training.adapter_meta import PICKLE_SUFFIXES, is_pickle  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

KOHYA_PREFIXES = ("lora_te_", "lora_unet_", "lora_te1_", "lora_te2_")  # what diffusers' lora_state_dict converts
PEFT_PREFIX = "base_model.model."  # PeftModel.save_pretrained's keys
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # diffusers' LoRA key prefixes (SDXL: all three)
SHOWN = 5  # keys named in a message


class LoraFormatError(ValueError):
    """The file is not a LoRA this project can read, or it does not fit the base model (the message says which)."""


@dataclass
class LoraFile:
    """A LoRA in diffusers layout, whatever layout it was read from.

    ``state``: ``unet.…`` / ``text_encoder.…`` / ``text_encoder_2.…`` keys;
    ``network_alphas`` (kohya's per-module alpha) or ``metadata``
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
    file_names: dict[str, dict[str, str]] = field(default_factory=dict)  # component -> {module in model: in file}

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.matched.values())


# LyCORIS/PEFT network types whose keys a LoRA loader would misread: a dot-separated part of a key -> its name
UNSUPPORTED = {
    "hada_w1_a": "LoHa (hada_*)", "hada_w2_a": "LoHa (hada_*)", "lokr_w1": "LoKr (lokr_*)", "lokr_w2": "LoKr (lokr_*)",
    "oft_blocks": "OFT (oft_blocks)", "oft_diag": "OFT (oft_diag)", "diff": "LyCORIS full (.diff)",
    "dora_scale": "DoRA (dora_scale)", "lora_magnitude_vector": "DoRA (lora_magnitude_vector)",
}  # fmt: skip
LAYOUTS = {"kohya": KOHYA_PREFIXES, "peft": (PEFT_PREFIX,), "diffusers": tuple(f"{c}." for c in COMPONENTS)}


def detect_format(keys: list[str]) -> str:
    """``diffusers``, ``kohya`` or ``peft`` from a state dict's keys (see the module's table).

    Raises:
        LoraFormatError: a network type other than plain LoRA (LoHa, LoKr, OFT, DoRA: ``UNSUPPORTED``), keys of
            several layouts in one file, or none of them — naming the first keys.
    """
    parts = {k: set(k.split(".")) & UNSUPPORTED.keys() for k in keys}
    kinds = sorted({UNSUPPORTED[p] for found in parts.values() for p in found})
    if kinds:
        first = [k for k, found in parts.items() if found][:SHOWN]
        raise LoraFormatError(
            f"{' and '.join(kinds)} weights are not supported, only plain LoRA (lora_down/lora_up, lora_A/lora_B); "
            f"e.g. {first}. Retrain as LoRA, or merge it into the base model with the tool that made it"
        )
    found = {name: [k for k in keys if k.startswith(prefixes)] for name, prefixes in LAYOUTS.items()}
    for name, matching in found.items():
        if keys and len(matching) == len(keys):
            return name
    present = [name for name, matching in found.items() if matching]
    if len(present) > 1:
        examples = {name: found[name][0] for name in present}
        raise LoraFormatError(
            f"mixed layouts ({' and '.join(present)} keys in one file, e.g. {examples}); a LoRA file holds one "
            "layout — re-save it from the tool that trained it"
        )
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
        found = found or sorted(p for p in path.iterdir() if p.suffix.lower() == ".safetensors")
        if len(found) != 1:
            pickles = sorted(p.name for p in path.iterdir() if is_pickle(p))
            why = f"pickle files {pickles} are not loaded (they can run code)" if pickles else "none found"
            raise LoraFormatError(f"{path}: expected one .safetensors LoRA file, {why}; name the file instead")
        path = found[0]
    if is_pickle(path):
        raise LoraFormatError(
            f"{path}: pickle files are not loaded (they can run code); convert it once where you trust it: "
            "safetensors.torch.save_file(torch.load(f), 'lora.safetensors')"
        )
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        raise LoraFormatError(f"{path} is not a .safetensors file")
    return path


def read_lora(path: str | Path, unet_config=None) -> LoraFile:
    """Read a LoRA file (or a folder holding one) in any layout of the module's table into diffusers layout.

    ``unet_config``: the base UNet's config, with which diffusers maps kohya keys in Stability's block naming
    (sd-scripts' SDXL files: ``lora_unet_input_blocks_4_1_…``) to diffusers' modules, as
    ``StableDiffusionXLPipeline.load_lora_weights`` does; without it only diffusers-named kohya keys convert.

    Raises:
        LoraFormatError: not safetensors, not readable, or keys of no known layout.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils.state_dict_utils import _load_sft_state_dict_metadata
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = weights_file(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            raw_keys = list(f.keys())
            for key in raw_keys:  # black images, never a served adapter: NaN/Inf in any tensor, .alpha included
                check_finite(f.get_tensor(key), f"{file.name}: key {key!r}")
    except LoraFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise LoraFormatError(f"{file}: not a readable safetensors file ({exc})") from exc
    if not raw_keys:
        raise LoraFormatError(f"{file} holds no tensors; it is not a LoRA (an empty or failed save)")
    fmt = detect_format(raw_keys)
    if fmt == "peft":
        lora = _read_peft(file, raw_keys)
    else:
        try:  # diffusers' own reader: kohya/A1111 keys (and their .alpha) converted, saved LoraConfig metadata kept;
            # given the tensors, not the file name, which diffusers only takes ending in lower-case .safetensors
            state, alphas = StableDiffusionPipeline.lora_state_dict(load_file(str(file)), unet_config=unet_config)
            metadata = _load_sft_state_dict_metadata(str(file))
        except Exception as exc:  # noqa: BLE001 - diffusers' converters refuse keys they cannot map
            why = _first_line(exc)
            raise LoraFormatError(f"{file}: diffusers cannot convert its {fmt}-layout keys ({why})") from exc
        lora = LoraFile(file, fmt, state, alphas or None, metadata or None, raw_keys)
    check_config(lora)
    return lora


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def check_finite(value, what: str) -> None:
    """Refuse a NaN or infinite tensor or number (it turns every image black or noise).

    Raises:
        LoraFormatError: naming ``what``.
    """
    if isinstance(value, torch.Tensor):
        bad = value.is_floating_point() and not bool(torch.isfinite(value).all())
    else:
        bad = isinstance(value, float) and not math.isfinite(value)
    if bad:
        raise LoraFormatError(f"{what} holds NaN or infinite values; the file is corrupt or diverged in training")


def check_config(lora: LoraFile) -> None:
    """The saved LoraConfig (PEFT's adapter_config.json or diffusers' metadata) must describe the weights: a finite
    ``lora_alpha``/``alpha_pattern`` and, per module, the rank ``r``/``rank_pattern`` says (``get_pattern_key``, as
    PEFT matches them); kohya alphas must be finite.

    Raises:
        LoraFormatError: naming the file, the key and the rank the weights have.
    """
    from peft.utils.other import get_pattern_key

    for key, alpha in (lora.network_alphas or {}).items():
        check_finite(float(alpha), f"{lora.path.name}: alpha of {key}")
    for component in COMPONENTS:
        prefix = f"{component}."
        meta = {k.removeprefix(prefix): v for k, v in (lora.metadata or {}).items() if k.startswith(prefix)}
        if not meta:
            continue
        where = f"{lora.path.name}: the LoraConfig of {component}"
        for name in ("r", "lora_alpha"):
            value = meta.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise LoraFormatError(f"{where}: {name}={value!r} is not a number")
            if value is not None:
                check_finite(float(value), f"{where}: {name}")
        for name in ("rank_pattern", "alpha_pattern"):
            for key, value in (meta.get(name) or {}).items():
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise LoraFormatError(f"{where}: {name}[{key!r}]={value!r} is not a number")
                check_finite(float(value), f"{where}: {name}[{key!r}]")
        if meta.get("use_dora"):
            raise LoraFormatError(f"{where}: DoRA (use_dora) is not supported, only plain LoRA")
        pattern = meta.get("rank_pattern") or {}
        for module, rank in module_ranks(lora, component).items():
            key = get_pattern_key(pattern.keys(), module) if pattern else None
            said = pattern[key] if key in pattern else meta.get("r")
            if said is not None and int(said) != rank:
                which = f"rank_pattern[{key!r}]" if key in pattern else "r"
                raise LoraFormatError(
                    f"{where}: {which}={said} but the weights of {module} have rank {rank}; fix the config "
                    "saved with the weights (r / rank_pattern)"
                )


def module_ranks(lora: LoraFile, component: str) -> dict[str, int]:
    """module (PEFT naming) -> its rank, ``lora_A``'s first dimension."""
    part = peft_state(lora, component)
    return {k.split(".lora_A.", 1)[0]: int(v.shape[0]) for k, v in part.items() if ".lora_A." in k}


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
        raw = json.loads(config_path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LoraFormatError(f"{config_path}: not readable JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise LoraFormatError(f"{config_path}: must hold a JSON object (PEFT's LoraConfig), not {type(raw).__name__}")
    if raw.get("peft_type", "LORA") != "LORA":
        raise LoraFormatError(
            f"{config_path}: peft_type {raw['peft_type']!r} is not supported; only LoRA (peft_type LORA) adapters"
        )
    try:
        config = LoraConfig.from_pretrained(str(file.parent)).to_dict()
    except Exception as exc:  # noqa: BLE001 - unreadable or not a LoRA config
        raise LoraFormatError(f"{config_path}: not a PEFT LoraConfig ({_first_line(exc)})") from exc
    # the text encoder's modules: text_model.… (transformers < 5) or encoder.layers.… (its flattened CLIPTextModel)
    te = all(k[len(PEFT_PREFIX) :].startswith(("text_model.", "encoder.layers.")) for k in raw_keys)
    component = "text_encoder" if te else "unet"
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

    done = {k: v for k, v in part.items() if ".lora_A." in k or ".lora_B." in k}
    rest = {k: v for k, v in part.items() if k not in done}  # files mix namings (diffusers saves conv keys as lora_A)
    if not rest:
        return done
    if component == "unet":
        return {**done, **convert_unet_state_dict_to_peft(rest)}
    from diffusers.utils.state_dict_utils import StateDictType

    # diffusers infers the naming from the whole dict (a to_out_lora key somewhere = its old naming), so a part
    # without one (a single alpha's key, a file without out_proj) is named here: kohya's text encoder converts to
    # the old naming (``self_attn.to_k_lora.down.weight``), diffusers' own saves to ``lora_linear_layer``
    if any("lora_linear_layer" in k for k in rest):
        kind = StateDictType.DIFFUSERS
    elif any(re.search(r"\.to_(q|k|v|out)_lora\.", k) for k in rest):
        kind = StateDictType.DIFFUSERS_OLD
    else:
        kind = None
    return {**done, **convert_state_dict_to_peft(rest, original_type=kind)}


def model_module(model, component: str, name: str) -> str:
    """The module path in ``model`` that the file's module ``name`` means, as diffusers' loader maps it: a
    transformers >= 5 ``CLIPTextModel`` has no ``text_model.`` level, so kohya's ``lora_te_text_model_…`` (and old
    PEFT/diffusers files) name ``encoder.layers.…`` there
    (``diffusers.loaders.lora_base._load_lora_into_text_encoder`` strips the prefix the same way). SDXL's
    ``CLIPTextModelWithProjection`` keeps its ``text_model.`` level, so its names stay as they are."""
    if component.startswith("text_encoder") and model is not None and not hasattr(model, "text_model"):
        return name.removeprefix("text_model.")
    return name


def match_base(pipe, lora: LoraFile) -> BaseMatch:
    """Compare the file's LoRA modules with ``pipe``'s: which exist, and whether ``lora_A`` takes the module's input
    width and ``lora_B`` gives its output width (Linear weight ``[out, in]``, Conv2d ``[out, in, kh, kw]``).
    ``matched`` names modules as the base model does (``model_module``), ``file_names`` maps them back."""
    modules, matched, unmatched, mismatched, file_names = {}, {}, [], [], {}
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        part = peft_state(lora, component)
        names = sorted({k.split(".lora_", 1)[0] for k in part if ".lora_A." in k or ".lora_B." in k})
        modules[component], matched[component], file_names[component] = names, [], {}
        for name in names:
            in_model = model_module(model, component, name)
            try:
                target = model.get_submodule(in_model) if model is not None else None
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
            matched[component].append(in_model)
            file_names[component][in_model] = name
    return BaseMatch(modules, matched, unmatched, mismatched, file_names)


def module_delta(lora: LoraFile, component: str, name: str, part: dict | None = None) -> tuple[float, torch.Tensor]:
    """(scale, B·A) of one module as diffusers/PEFT apply it: the weight changes by scale × B·A with scale =
    alpha / rank (``module_alpha``); ``B·A`` is ``[out, in·kh·kw]`` (conv kernels flattened). ``name``: PEFT naming."""
    part = peft_state(lora, component) if part is None else part
    a, b = part[f"{name}.lora_A.weight"].float(), part[f"{name}.lora_B.weight"].float()
    rank = a.shape[0]
    return module_alpha(lora, component, name, rank) / rank, b.reshape(b.shape[0], rank) @ a.reshape(rank, -1)


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
    # the change each module makes is scale × B·A (scale = alpha / rank): zero B, zero A, or alpha 0 all change nothing
    scales, zero_ba = [], []
    for component in COMPONENTS:
        part = peft_state(lora, component)
        for name in found.file_names.get(component, {}).values():
            scale, ba = module_delta(lora, component, name, part)
            scales.append(scale)
            zero_ba.append(not bool(ba.any()))
    ups = [v for c in COMPONENTS for k, v in peft_state(lora, c).items() if ".lora_B." in k]
    if ups and all(not v.any() for v in ups):
        raise LoraFormatError(f"{label}: every lora_B/lora_up weight is zero, so it changes nothing; it is untrained")
    if all(s == 0 for s in scales):
        raise LoraFormatError(
            f"{label}: alpha is 0 in every module, so the adapter changes nothing (scale = alpha / rank = 0). "
            "kohya's sd-scripts reads alpha 0 as alpha = rank: if it was trained there, set each .alpha to its rank"
        )
    if all(zero or s == 0 for zero, s in zip(zero_ba, scales)):
        raise LoraFormatError(f"{label}: scale × lora_B·lora_A is zero in every module, so it changes nothing")
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
    state = lora.state
    if lora.network_alphas is None:  # one naming (PEFT's) for every key: diffusers' own saves mix conv lora_A keys
        state = {f"unet.{k}": v for k, v in peft_state(lora, "unet").items()}  # with linear lora.down
        state |= {k: v for k, v in lora.state.items() if not k.startswith("unet.")}  # the TE loader converts its own
    try:
        if "unet" in parts:
            pipe.load_lora_into_unet(
                state, lora.network_alphas, pipe.unet, adapter_name=adapter_name,
                _pipeline=pipe, metadata=lora.metadata,
            )  # fmt: skip
        for component in (c for c in parts if c != "unet"):  # text_encoder, and SDXL's text_encoder_2
            pipe.load_lora_into_text_encoder(
                state, lora.network_alphas, getattr(pipe, component), prefix=component,
                lora_scale=pipe.lora_scale, adapter_name=adapter_name, _pipeline=pipe, metadata=lora.metadata,
            )  # fmt: skip
        got = injected(pipe, adapter_name)
        missing = [f"{c}.{m}" for c in parts for m in sorted(set(found.matched[c]) - set(got.get(c, [])))]
        if missing or not any(got.values()):
            raise LoraFormatError(
                f"{label}: LoRA layers were injected into {sum(map(len, got.values()))} of {found.count} matching "
                f"modules (not injected: {missing[:SHOWN]}); the adapter would not change the images as its file says"
            )
    except LoraFormatError:
        drop(pipe, adapter_name)
        raise
    except Exception as exc:  # noqa: BLE001 - diffusers/PEFT refusing a user's file is a format error, not a crash
        drop(pipe, adapter_name)
        raise LoraFormatError(f"{label}: diffusers could not load it ({_first_line(exc)})") from exc
    return found


def drop(pipe, adapter_name: str) -> None:
    """Remove whatever a failed load injected under ``adapter_name``, so the pipeline serves as before."""
    parts = (getattr(pipe, c, None) for c in COMPONENTS)
    if any(adapter_name in (getattr(p, "peft_config", None) or {}) for p in parts if p is not None):
        pipe.delete_adapters(adapter_name)


def to_kohya(lora: LoraFile, sdxl: bool | None = None) -> dict[str, torch.Tensor]:
    """The A1111/ComfyUI (kohya) layout of ``lora`` via diffusers' ``convert_state_dict_to_kohya``, with each
    module's ``.alpha`` set to the alpha it was trained with (the converter writes alpha = rank, scale 1, which
    would change every image of an adapter trained with alpha != rank).

    Conv (LoCon) modules keep their 4-D ``lora_down``/``lora_up`` kernels, as kohya's LoCon files hold them. Text
    encoder keys name ``text_model.…`` (a transformers >= 5 ``CLIPTextModel`` has no such level, every kohya file
    does): SD 1.x/2.x kohya's ``lora_te_text_model_…``, or with ``sdxl`` sd-scripts' SDXL names ``lora_te1_…`` and
    ``lora_te2_…`` as diffusers' converter writes them. ``sdxl=None``: SDXL when the file has ``text_encoder_2``
    keys (a UNet-only file has no text-encoder keys, so the choice changes nothing there).

    Raises:
        LoraFormatError: diffusers' converter refuses a module (named).
    """
    from diffusers.utils import convert_state_dict_to_kohya

    if sdxl is None:
        sdxl = any(k.startswith("text_encoder_2.") for k in lora.state)
    out: dict[str, torch.Tensor] = {}
    for component in COMPONENTS:
        part = peft_state(lora, component)
        for module in sorted({k.split(".lora_", 1)[0] for k in part}):
            named = module
            if component != "unet" and not module.startswith("text_model."):
                named = f"text_model.{module}"  # the name every kohya/A1111 SD 1.x file uses
            keys = {f"{component}.{named}.lora_{k.split('.lora_', 1)[1]}": v for k, v in part.items()
                    if k.split(".lora_", 1)[0] == module}  # fmt: skip
            try:
                converted = convert_state_dict_to_kohya(keys)
            except Exception as exc:  # noqa: BLE001 - name the module instead of a bare converter error
                raise LoraFormatError(f"{component}.{module}: diffusers cannot write it in kohya layout "
                                      f"({_first_line(exc)})") from exc  # fmt: skip
            rank = part[f"{module}.lora_A.weight"].shape[0]
            alpha = module_alpha(lora, component, module, rank)
            for k, v in converted.items():
                k = k.replace("lora_te1_", "lora_te_", 1) if k.startswith("lora_te1_") and not sdxl else k
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
