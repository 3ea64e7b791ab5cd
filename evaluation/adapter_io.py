"""Bring your own LoRA: import a file trained elsewhere, export one for A1111/ComfyUI.

    lorafleet import-adapter my_lora.safetensors --name my-style --trigger ohwx     # kohya/A1111, diffusers or PEFT
    lorafleet import-adapter peft_out/ --name my-style --base-model models/toy-sd   # a PEFT save_pretrained folder
    lorafleet export-adapter my-style@champion --format kohya my_style.safetensors
    lorafleet export-adapter runs/adapters/my-style --format kohya out.safetensors  # a folder needs no MLflow
    lorafleet import-adapter sdxl_lora.safetensors --name my-xl --base-model stabilityai/stable-diffusion-xl-base-1.0

SDXL files work the same way: kohya's ``lora_unet_…``, ``lora_te1_…`` and ``lora_te2_…`` keys (Stability's block
names too) are converted by diffusers, and export writes them back with SDXL's ``lora_te1_``/``lora_te2_`` names.

Import reads the file with diffusers'/PEFT's converters (``training.lora_formats``), loads it into the base model
(every key must name one of its modules with fitting shapes; the first that do not are named), writes the project's
adapter folder (diffusers-layout weights + ``lorafleet_adapter.json`` with sha256, ``source: imported`` and the
original layout) and registers it in the MLflow registry with the tag ``source=imported``. A model with no champion
yet gets the ``champion`` alias, so the Serve app serves it by its name next to trained ones (``GET /v1/models``
lists it); otherwise it is served as ``NAME/VERSION`` and ``lorafleet promote NAME VERSION`` makes it the champion
(imported files skip the evaluation gate: ``lorafleet evaluate --adapter FOLDER`` scores one first if you want).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from pydantic import ValidationError

from serving.config import BASE, ChampionArgs
from training.adapter import (
    AdapterError,
    AdapterMeta,
    canonical_safetensors,
    file_sha256,
    portable_model_name,
    save_adapter,
)
from training.lora_formats import COMPONENTS, LoraFile, LoraFormatError, drop, load_lora, read_lora
from training.lora_formats import to_kohya as kohya_layout

IMPORT_SLOT = "imported"
IMPORT_EXPERIMENT = "lorafleet-imports"
DEFAULT_BASE = "models/toy-sd"
NAME_MAX = 64
NAME = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9_.-]{{0,{NAME_MAX - 1}}}\Z")  # a registered model name clients can send
# model ids the Serve app gives a meaning of its own (serving.config): an adapter named so would be shadowed
RESERVED_NAMES = (BASE, ChampionArgs.model_fields["name"].default)


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a registered adapter name clients send as ``model``, or None."""
    if len(name) > NAME_MAX:
        return f"--name is {len(name)} characters; the limit is {NAME_MAX}"
    if name.lower() in RESERVED_NAMES:
        return (f"--name {name!r} is reserved: clients send {', '.join(map(repr, RESERVED_NAMES))} for the base model "
                "and the current champion; choose another name")  # fmt: skip
    if not NAME.match(name):
        return f"--name {name!r}: use letters, digits, '-', '_' and '.', starting with a letter or digit"
    return None


def import_adapter(
    source: str | Path, out_dir: str | Path, base_model: str, trigger: str | None = None, pipe=None
) -> tuple[Path, AdapterMeta]:
    """Convert a LoRA file (or folder) into the project's adapter folder ``out_dir`` after checking it against
    ``base_model`` (``pipe``: that model already loaded, else it is loaded on the CPU).

    Raises:
        AdapterError: unreadable, an unknown layout, pickle, keys or shapes that do not fit (named), or ``out_dir``
            is not empty (nothing is overwritten).
    """
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise AdapterError(f"{out} is not empty; choose another --out (nothing is overwritten)")
    try:
        lora = read_lora(source)  # a bad file is refused before a base model is loaded
        if pipe is None:
            from training.families import load_pipeline

            pipe = load_pipeline(base_model, device="cpu")
        lora = read_lora(source, unet_config=pipe.unet.config)  # SDXL kohya files in Stability's block names map too
        found = load_lora(pipe, lora, IMPORT_SLOT, f"{Path(source).name}")
    except (LoraFormatError, OSError) as exc:
        raise AdapterError(str(exc)) from exc
    try:
        from training.families import family_for

        parts = {c: getattr(pipe, c) if found.matched[c] else None for c in COMPONENTS}
        text_encoders = any(m is not None for c, m in parts.items() if c != "unet")
        meta = _meta(pipe, lora, base_model, trigger, text_encoders)
        save_adapter(
            out,
            parts["unet"],
            meta,
            parts["text_encoder"],
            IMPORT_SLOT,
            text_encoder_2=parts["text_encoder_2"],
            family=family_for(pipe).name,
        )
    except ValidationError as exc:
        why = exc.errors()[0]["msg"]
        raise AdapterError(f"{Path(source).name}: its rank/alpha cannot be recorded ({why})") from exc
    finally:
        drop(pipe, IMPORT_SLOT)
    return out, meta


def _meta(pipe, lora: LoraFile, base_model: str, trigger: str | None, text_encoder: bool) -> AdapterMeta:
    """What the JSON says about an imported file: rank/alpha when one value holds for every module, the targets
    PEFT injected, whether text-encoder weights are saved (``text_encoder``: what is written, not what the file
    had), where it came from."""
    configs = [getattr(pipe, c).peft_config[IMPORT_SLOT] for c in COMPONENTS
               if IMPORT_SLOT in (getattr(getattr(pipe, c, None), "peft_config", None) or {})]  # fmt: skip
    ranks = {r for c in configs for r in [c.r, *c.rank_pattern.values()]}
    alphas = {a for c in configs for a in [c.lora_alpha, *c.alpha_pattern.values()]}
    targets = sorted({t.split(".lora")[0] for c in configs for t in (c.target_modules or [])})
    return AdapterMeta(
        base_model=portable_model_name(base_model),
        rank=ranks.pop() if len(ranks) == 1 else None,
        alpha=float(alphas.pop()) if len(alphas) == 1 else None,
        target_modules=targets,
        text_encoder=text_encoder,
        trigger=trigger,
        source="imported",
        source_format=lora.source_format,
        training={"imported_from": lora.path.name, "original_sha256": file_sha256(lora.path)},
    )


def export_kohya(folder: str | Path, out_file: str | Path, meta: AdapterMeta) -> Path:
    """Write the adapter in ``folder`` in A1111/ComfyUI's (kohya) layout, with kohya's ``ss_network_dim`` /
    ``ss_network_alpha`` metadata. Returns ``out_file``.

    Raises:
        AdapterError: ``out_file`` exists (nothing is overwritten) or is not a .safetensors name.
    """
    from safetensors.torch import save_file

    out = Path(out_file).expanduser()
    if out.suffix.lower() != ".safetensors":
        raise AdapterError(f"{out}: the output must be a .safetensors file")
    if out.exists():
        raise AdapterError(f"{out} exists; choose another name (nothing is overwritten)")
    from training.adapter import adapter_family

    try:
        lora = read_lora(Path(folder) / meta.weights)
        state = kohya_layout(lora, sdxl=(meta.family or adapter_family(meta.base_model, lora)) == "sdxl")
    except LoraFormatError as exc:
        raise AdapterError(str(exc)) from exc
    alphas = {float(v) for k, v in state.items() if k.endswith(".alpha")}
    ranks = {int(v.shape[0]) for k, v in state.items() if k.endswith(".lora_down.weight")}
    extra = {"ss_network_module": "networks.lora", "ss_base_model_version": meta.base_model,
             "ss_output_name": out.stem, "lorafleet_sha256": meta.sha256}  # fmt: skip
    if len(ranks) == 1:
        extra["ss_network_dim"] = str(ranks.pop())
    if len(alphas) == 1:
        extra["ss_network_alpha"] = str(alphas.pop())
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"format": "pt", **extra})
    canonical_safetensors(out)  # safetensors writes __metadata__ in a per-process order: sort it (same bytes)
    return out


def _tracking_uri(given: str | None) -> str | None:
    return given or os.environ.get("MLFLOW_TRACKING_URI")


def main_import(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lorafleet import-adapter", description=__doc__.split("\n")[0])
    p.add_argument("source", help="a .safetensors LoRA (diffusers, kohya/A1111, PEFT) or a folder holding one")
    p.add_argument("--name", required=True, help="registered model name, e.g. my-style (what clients send)")
    p.add_argument("--trigger", help="the word the LoRA was trained on (shown on /v1/models and model cards)")
    p.add_argument("--base-model", default=DEFAULT_BASE, help=f"base model it is for (default {DEFAULT_BASE})")
    p.add_argument("--out", help="adapter folder to write (default runs/adapters/<name>)")
    p.add_argument("--tracking-uri", help="MLflow server (default $MLFLOW_TRACKING_URI, else up's)")
    p.add_argument("--alias", help="alias to point at the new version (default: champion if the model has none)")
    p.add_argument("--no-register", action="store_true", help="only write the folder")
    a = p.parse_args(argv)
    if problem := name_problem(a.name):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    uri = _tracking_uri(a.tracking_uri)
    if not uri and not a.no_register:  # before anything is written: a script would go on to `generate --model NAME`
        print("error: no MLflow server to register the adapter in: pass --tracking-uri, set MLFLOW_TRACKING_URI or "
              "run `lorafleet up`; or add --no-register to only write the adapter folder", file=sys.stderr)  # fmt: skip
        return 2
    out = Path(a.out or f"runs/adapters/{a.name}")
    try:
        folder, meta = import_adapter(a.source, out, a.base_model, a.trigger)
    except AdapterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"adapter folder: {folder} ({meta.source_format} layout, rank {meta.rank}, alpha {meta.alpha}, "
          f"sha256 {meta.sha256[:12]}…)")  # fmt: skip
    if a.no_register:
        print(f"not registered (--no-register); serve the folder with `adapters.{a.name}={folder}` in the serve config")
        return 0
    return _register(uri, a.name, folder, a.alias)
    return _register(uri, a.name, folder, a.alias)


def _register(uri: str, name: str, folder: Path, alias: str | None) -> int:
    from mlflow.exceptions import MlflowException

    from evaluation.registry import TAG_SOURCE, client_for, current, promote, register_folder

    client = client_for(uri)
    try:
        version = str(register_folder(client, name, folder, {TAG_SOURCE: "imported"}, IMPORT_EXPERIMENT).version)
        alias = alias or (None if current(client, name, "champion") else "champion")
        if alias:
            promote(client, name, version, alias)
    except MlflowException as exc:
        print(f"error: registering {name} at {uri} failed: {exc.message}", file=sys.stderr)
        return 1
    served = name if alias == "champion" else (f"{name}@{alias}" if alias else f"{name}/{version}")
    print(f"registered {name} version {version} (source=imported){f', alias {alias}' if alias else ''}; "
          f"served as model {served!r}" + ("" if alias else f"; `lorafleet promote {name} {version}` serves it "
                                           "as the champion"))  # fmt: skip
    return 0


def fetch_ref(ref: str, staging: str | Path, tracking_uri: str | None = None, expected_base: str | None = None):
    """The verified adapter (``evaluation.registry.FetchedAdapter``) that ``ref`` names: an adapter folder, NAME (its
    champion), NAME@ALIAS, NAME/VERSION, runs:/… or models:/…; registry downloads go under ``staging``, the server is
    ``tracking_uri`` or ``$MLFLOW_TRACKING_URI``. Used by ``export-adapter`` and ``export-onnx``.

    Raises:
        AdapterError: a folder that is not one, failed verification, or not for ``expected_base``.
        RegistryError: the registry names no such adapter, or no tracking URI is set for a registry reference.
    """
    from evaluation.registry import fetch_adapter

    registry_name = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(@[A-Za-z0-9][A-Za-z0-9_-]*|/[0-9]+)?", ref)
    if registry_name and not Path(ref).expanduser().is_dir():  # NAME, NAME@ALIAS, NAME/VERSION; else a folder
        ref = f"models:/{ref}" if registry_name.group(1) else f"models:/{ref}@champion"
    return fetch_adapter(ref, staging, _tracking_uri(tracking_uri), expected_base)


def main_export(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lorafleet export-adapter", description="Write an adapter for A1111/ComfyUI.")
    p.add_argument("ref", help="an adapter folder, NAME (its champion), NAME@ALIAS, NAME/VERSION or models:/…")
    p.add_argument("out", help="the .safetensors file to write")
    p.add_argument("--format", choices=["kohya"], default="kohya", help="kohya = A1111/ComfyUI/Forge layout")
    p.add_argument("--tracking-uri", help="MLflow server for registry references (default $MLFLOW_TRACKING_URI)")
    a = p.parse_args(argv)
    from evaluation.registry import RegistryError

    staging = Path(tempfile.mkdtemp(prefix="lorafleet-export-"))
    try:
        fetched = fetch_ref(a.ref, staging, a.tracking_uri)
        out = export_kohya(fetched.path, a.out, fetched.meta)
    except (AdapterError, RegistryError, LoraFormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {out} (kohya layout: A1111, ComfyUI, Forge; alpha per module kept)")
    return 0
