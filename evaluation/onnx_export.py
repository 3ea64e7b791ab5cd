"""Export an adapter fused into its base model to ONNX: text encoder, UNet and VAE decoder, checked with onnxruntime.

SD 1.x/2.x base models only: an SDXL base (two text encoders, pooled embeddings, time ids) is refused with the reason
and the alternatives (``check_family``).

    lorafleet export-onnx my-style@champion onnx/my-style                  # registry reference (MLflow)
    lorafleet export-onnx runs/adapters/my-style onnx/my-style --overwrite  # an adapter folder needs no MLflow
    python -m evaluation.onnx_export runs/adapters/my-style onnx/my-style   # the same without the lorafleet CLI

REF is anything ``export-adapter`` accepts (an adapter folder, NAME, NAME@ALIAS, NAME/VERSION, runs:/…, models:/…).
The adapter is loaded into a freshly loaded copy of its base model (fp32, CPU), fused with diffusers'
``pipe.fuse_lora`` and unloaded (the LoRA weights become part of the base weights), then each graph is exported
with ``torch.onnx.export(..., dynamo=True)`` into the layout diffusers' converter writes
(``scripts/convert_stable_diffusion_checkpoint_to_onnx.py``: ``<component>/model.onnx``, same input/output names and
dynamic axes) plus the tokenizer, the scheduler, each component's ``config.json``, a ``model_index.json`` and
``lorafleet_onnx.json`` (inputs, outputs, shapes, dtypes, opset, base model, adapter sha256, measured errors).
With ``--check`` (the default) each graph runs on onnxruntime's CPUExecutionProvider on seeded random inputs and is
compared with the fused PyTorch model; an export whose error passes ``--tolerance`` is not written.
``model_index.json`` names diffusers' ``OnnxStableDiffusionPipeline`` (deprecated after diffusers 0.43), which
hard-codes SD 1.x's VAE scale 0.18215: for any other VAE (the toy's is 0.771) run the loop yourself and divide the
latents by the manifest's ``vae_scaling_factor`` (README "ONNX export" shows the loop).

Why the torch.export-based exporter (``dynamo=True``, torch's default since 2.9) and not the TorchScript one: the
TorchScript exporter is deprecated (it warns on every call) and bakes the UNet's shape-dependent Python branches
into constants (its TracerWarnings in diffusers' upsampling); torch.export traces them symbolically. It costs
more export time (toy UNet: 42 s vs 15 s of CPU on 2 cores) and needs onnxscript.

Why fp32 on the CPU even where CUDA exists: a graph is device-independent (onnxruntime-gpu runs the same file with
CUDAExecutionProvider), and the check compares against onnxruntime's CPU provider, whose reference is fp32 PyTorch.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.adapter import PROJECT_ROOT, AdapterError, base_model_id, load_adapter, portable_model_name

OPSET = 18  # torch.export-based exporter's default opset (onnxruntime >= 1.14 runs it)
# relative error = max |onnxruntime - PyTorch| / max |PyTorch| per output. Measured on the toy model with a random
# LoRA (README "ONNX export"): text encoder 4.9e-7, UNet 2.7e-6, VAE decoder 6.6e-6; 1e-4 leaves 15x room for other
# CPUs' kernels and stays far below what an adapter changes (the test adapter moves outputs by > 1e-2 of their scale)
TOLERANCE = 1e-4
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to model.onnx.data: protobuf caps a file at 2 GiB (SD's UNet)
MANIFEST = "lorafleet_onnx.json"
CHECK_BATCH = 3  # not the export's batch of 2: the check also shows the batch axis is really dynamic
SEED = 0


class OnnxExportError(ValueError):
    """The export cannot be written: OUT is not empty, the reference is unusable, or the check failed."""


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph. Names and dynamic axes follow diffusers' converter script
    (``scripts/convert_stable_diffusion_checkpoint_to_onnx.py``), except: channel axes stay static (a model's
    channel counts are fixed), and the UNet's ``timestep`` is float32, not int64, so schedulers with fractional
    timesteps (Euler, DPM++ with Karras sigmas) run unrounded; diffusers' ONNX pipeline reads the dtype from the
    graph."""

    name: str  # the folder in OUT
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]


SPECS = (
    GraphSpec("text_encoder", ("input_ids",), ("last_hidden_state", "pooler_output"),
              {"input_ids": {0: "batch", 1: "sequence"}}),
    GraphSpec("unet", ("sample", "timestep", "encoder_hidden_states"), ("out_sample",),
              {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
               "encoder_hidden_states": {0: "batch", 1: "sequence"}}),
    GraphSpec("vae_decoder", ("latent_sample",), ("sample",), {"latent_sample": {0: "batch", 2: "height", 3: "width"}}),
)  # fmt: skip


class _TextEncoder(torch.nn.Module):
    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.text_encoder(input_ids=input_ids)
        return out.last_hidden_state, out.pooler_output


class _UNet(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


@dataclass
class GraphCheck:
    """onnxruntime vs PyTorch on one graph: the worst output's errors (``relative`` = max abs / max |PyTorch|)."""

    output: str
    max_abs_error: float
    output_scale: float
    relative_error: float
    tolerance: float
    passed: bool


@dataclass
class OnnxExport:
    """What ``export_onnx`` wrote."""

    out: Path
    manifest: dict[str, Any]
    checks: dict[str, GraphCheck] = field(default_factory=dict)


def modules(pipe) -> dict[str, torch.nn.Module]:
    """The exported graphs of a (fused) ``StableDiffusionPipeline`` as modules that return plain tensors, by name."""
    return {"text_encoder": _TextEncoder(pipe.text_encoder).eval(), "unet": _UNet(pipe.unet).eval(),
            "vae_decoder": _VaeDecoder(pipe.vae).eval()}  # fmt: skip


def sample_inputs(pipe, batch: int, seed: int) -> dict[str, tuple[torch.Tensor, ...]]:
    """Seeded random inputs per graph at the model's native size: ``input_ids`` int32 ``[batch, model_max_length]``
    (int32 as diffusers' ONNX pipeline feeds them), ``sample`` ``[batch, in_channels, s, s]`` with s the UNet's
    ``sample_size``, ``timestep`` float32 ``[batch]`` in [0, num_train_timesteps), ``encoder_hidden_states``
    ``[batch, model_max_length, cross_attention_dim]``, ``latent_sample`` ``[batch, latent_channels, s, s]``."""
    gen = torch.Generator().manual_seed(seed)
    unet, seq = pipe.unet.config, pipe.tokenizer.model_max_length
    size = unet.sample_size
    ids = torch.randint(0, pipe.text_encoder.config.vocab_size, (batch, seq), generator=gen, dtype=torch.int32)
    steps = pipe.scheduler.config.num_train_timesteps
    return {
        "text_encoder": (ids,),
        "unet": (
            torch.randn(batch, unet.in_channels, size, size, generator=gen),
            torch.randint(0, steps, (batch,), generator=gen).to(torch.float32),
            torch.randn(batch, seq, unet.cross_attention_dim, generator=gen),
        ),
        "vae_decoder": (torch.randn(batch, pipe.vae.config.latent_channels, size, size, generator=gen),),
    }


def fused_pipeline(base_model: str, adapter_dir: Path, lora_scale: float = 1.0):
    """A freshly loaded fp32 CPU copy of ``base_model`` with the adapter fused into its weights and the LoRA layers
    removed (diffusers' ``fuse_lora`` + ``unload_lora_weights``); never a serving replica's pipeline.

    Raises:
        AdapterError: the adapter fails verification or does not fit the model (``training.adapter.load_adapter``).
        FileNotFoundError: the base model cannot be loaded.
    """
    from training.families import load_pipeline

    pipe = load_pipeline(base_model, device="cpu", dtype=torch.float32)
    load_adapter(pipe, adapter_dir, adapter_name="export")
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=lora_scale, safe_fusing=True,
                   adapter_names=["export"])  # fmt: skip
    pipe.unload_lora_weights()  # the fused weights stay; the graphs hold no LoRA branch
    return pipe


def export_graph(module: torch.nn.Module, args: tuple[torch.Tensor, ...], spec: GraphSpec, path: Path) -> None:
    """``torch.onnx.export(dynamo=True)`` of ``module`` to ``path`` (weights in ``path.data`` past 1 GiB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    with warnings.catch_warnings():
        # dynamic_axes (diffusers' names) become Dim.DYNAMIC: named torch.export.Dims fail a first capture on the
        # UNet's even-size guards and double the export time; the warning suggests exactly those Dims
        warnings.filterwarnings("ignore", message=".*'dynamic_axes' is not recommended when dynamo=True")
        warnings.filterwarnings("ignore", message=".*The axis name: .* will not be used")  # timestep's batch = sample's
        torch.onnx.export(
            module, args, str(path), dynamo=True, input_names=list(spec.inputs), output_names=list(spec.outputs),
            dynamic_axes=spec.dynamic_axes, opset_version=OPSET, external_data=size > EXTERNAL_DATA_BYTES,
            verbose=False,
        )  # fmt: skip


def check_graph(
    path: Path, module: torch.nn.Module, args: tuple[torch.Tensor, ...], spec: GraphSpec, tolerance: float
) -> GraphCheck:
    """Run ``path`` with onnxruntime's CPUExecutionProvider and ``module`` with PyTorch on ``args``; the output with
    the largest relative error (max abs error / max |PyTorch output|) decides."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(list(spec.outputs), {n: a.numpy() for n, a in zip(spec.inputs, args, strict=True)})
    with torch.no_grad():
        want = module(*args)
    want = want if isinstance(want, tuple) else (want,)
    worst = None
    for name, g, w in zip(spec.outputs, got, want, strict=True):
        w = w.numpy()
        err, scale = float(np.abs(g - w).max()), float(np.abs(w).max())
        rel = err / max(scale, 1e-12)
        if worst is None or rel > worst.relative_error:
            worst = GraphCheck(name, err, scale, rel, tolerance, bool(rel <= tolerance))
    return worst


def _io(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs as the ONNX file declares them: name, dtype, shape (an axis name where dynamic)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def entry(v) -> dict[str, Any]:
        t = v.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape}

    return {"inputs": [entry(v) for v in model.graph.input], "outputs": [entry(v) for v in model.graph.output]}


def resolve_base(name: str) -> str:
    """A base model as the adapter names it: a project-relative folder (``models/toy-sd``) is found from any working
    directory; hub ids and existing paths are unchanged."""
    path = Path(name).expanduser()
    if not path.is_absolute() and not path.exists() and (PROJECT_ROOT / path).exists():
        return str(PROJECT_ROOT / path)
    return name


def check_family(base: str) -> None:
    """Only SD 1.x/2.x bases export: the graphs and ``model_index.json`` are ``OnnxStableDiffusionPipeline``'s.

    Raises:
        OnnxExportError: ``base`` is another family's model (SDXL) or one no family knows.
        FileNotFoundError: ``base`` has no readable ``model_index.json`` (``training.families.family_of``).
    """
    from training.families import FamilyError, family_of

    try:
        family = family_of(base)
    except FamilyError as exc:
        raise OnnxExportError(str(exc)) from exc
    if family.name != "sd":
        raise OnnxExportError(
            f"export-onnx exports SD 1.x/2.x models only (one text encoder; OnnxStableDiffusionPipeline's layout); "
            f"base model {base_model_id(base)!r} is a {family.pipeline_class.__name__} ({family.name}), whose second "
            "text encoder, pooled embeddings and size/crop time ids these graphs do not carry. Serve it with PyTorch "
            "(lorafleet serve), or fuse the adapter (pipe.fuse_lora(); pipe.save_pretrained(DIR)) and export DIR with "
            "Hugging Face Optimum (`optimum-cli export onnx --model DIR OUT`), which has SDXL ONNX pipelines"
        )


def _require_onnx() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise OnnxExportError(f"export-onnx needs {', '.join(missing)}: pip install 'lorafleet[onnx]'")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OnnxExportError(f"{out} is a file; OUT must be a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OnnxExportError(f"{out} is not empty; choose another OUT or add --overwrite (it is replaced only after "
                              "a successful export)")  # fmt: skip


def _overlaps(a: Path, b: Path) -> bool:
    """Whether one of two resolved paths is the other or lies inside it."""
    return a == b or a in b.parents or b in a.parents


def _check_out_is_not_precious(out: Path, keep: dict[str, Path]) -> None:
    """OUT is replaced as a whole with ``--overwrite``: refuse the current folder or one above it, and any OUT that is,
    holds or lies inside a folder the export reads (``keep``: what -> resolved path)."""
    here = Path.cwd().resolve()
    if out == here or out in here.parents:
        raise OnnxExportError(f"OUT {out} is the current folder or one above it; name a new folder, e.g. onnx/<name>")
    for what, path in keep.items():
        if _overlaps(out, path):
            raise OnnxExportError(f"OUT {out} overlaps the {what} {path}; name a folder outside it, e.g. onnx/<name>")


def export_onnx(
    ref: str,
    out_dir: str | Path,
    *,
    base_model: str | None = None,
    tracking_uri: str | None = None,
    check: bool = True,
    tolerance: float = TOLERANCE,
    lora_scale: float = 1.0,
    overwrite: bool = False,
) -> OnnxExport:
    """Fuse the adapter ``ref`` names into a fresh copy of its base model and export text encoder, UNet and VAE
    decoder to ``out_dir`` (layout: module docstring). Everything is written in a staging folder next to
    ``out_dir`` and moved there only when every graph exported (and passed the check, with ``check``).

    Args:
        ref: an adapter folder, NAME, NAME@ALIAS, NAME/VERSION, runs:/… or models:/… (``export-adapter``'s REF).
        base_model: the model to fuse into (default: the adapter's own); must be the adapter's base model.
        tolerance: the largest relative error (max abs / max |PyTorch output|) any output may have.
        lora_scale: multiplies the adapter's alpha/rank scale when fusing (diffusers' ``fuse_lora(lora_scale=…)``).

    Raises:
        OnnxExportError: ``out_dir`` is not empty (without ``overwrite``); is the current folder or above it, or
            overlaps the adapter, REF or base-model folder; the base model is not SD 1.x/2.x (SDXL); the onnx
            packages are missing; or a graph failed the check.
        AdapterError / RegistryError: the reference names nothing, fails verification, is for another base model.
        FileNotFoundError: the base model cannot be loaded.
    """
    from evaluation.adapter_io import fetch_ref

    out = Path(out_dir).expanduser().resolve()  # "." has no name; a resolved path always has one
    _check_out(out, overwrite)
    _check_out_is_not_precious(out, {})
    if not math.isfinite(lora_scale):
        raise OnnxExportError(f"--lora-scale {lora_scale} must be a finite number (1 = the adapter as trained)")
    if not tolerance > 0:
        raise OnnxExportError(f"--tolerance {tolerance} must be > 0 (a relative error; default {TOLERANCE:g})")
    downloads = Path(tempfile.mkdtemp(prefix="lorafleet-onnx-"))  # registry copies; nothing is written near OUT yet
    staging = None
    try:
        fetched = fetch_ref(ref, downloads, tracking_uri, expected_base=base_model)
        base = resolve_base(base_model or fetched.meta.base_model)
        check_family(base)  # an SDXL base is refused before the onnx packages are even asked for
        _require_onnx()
        keep = {"adapter folder": Path(fetched.path).resolve()}
        if Path(base).expanduser().exists():
            keep["base model folder"] = Path(base).expanduser().resolve()
        if Path(ref).expanduser().exists():
            keep["REF folder"] = Path(ref).expanduser().resolve()
        _check_out_is_not_precious(out, keep)
        pipe = fused_pipeline(base, fetched.path, lora_scale)
        graphs, example = modules(pipe), sample_inputs(pipe, 2, SEED)
        probe = sample_inputs(pipe, CHECK_BATCH, SEED + 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.onnx-", dir=out.parent))  # same file system: one rename
        result = OnnxExport(out, {})
        for spec in SPECS:
            path = staging / spec.name / "model.onnx"
            export_graph(graphs[spec.name], example[spec.name], spec, path)
            if check:
                result.checks[spec.name] = check_graph(path, graphs[spec.name], probe[spec.name], spec, tolerance)
        failed = {n: c for n, c in result.checks.items() if not c.passed}
        if failed:
            raise OnnxExportError(
                "onnxruntime's outputs differ from PyTorch's past the tolerance "
                f"{tolerance:g} (relative to the output's scale): "
                + "; ".join(f"{n}.{c.output} {c.relative_error:.3g} (max abs {c.max_abs_error:.3g})"
                            for n, c in failed.items())
                + f"; nothing was written to {out}. Report it with your torch/onnxruntime versions, or write the "
                "graphs anyway with --no-check"
            )  # fmt: skip
        result.manifest = _write_pipeline_files(pipe, staging, fetched, base, lora_scale, result.checks)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
        return result
    finally:
        shutil.rmtree(downloads, ignore_errors=True)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _write_pipeline_files(pipe, root: Path, fetched, base: str, lora_scale: float, checks) -> dict[str, Any]:
    """Tokenizer, scheduler, per-component config.json, model_index.json and the manifest, next to the graphs."""
    import diffusers
    import onnx
    import onnxruntime

    pipe.tokenizer.save_pretrained(root / "tokenizer")
    pipe.scheduler.save_pretrained(root / "scheduler")
    pipe.text_encoder.config.save_pretrained(root / "text_encoder")
    pipe.unet.save_config(root / "unet")
    pipe.vae.save_config(root / "vae_decoder")
    onnx_model = ["diffusers", "OnnxRuntimeModel"]
    index = {"_class_name": "OnnxStableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "text_encoder": onnx_model, "unet": onnx_model, "vae_decoder": onnx_model, "vae_encoder": [None, None],
             "tokenizer": ["transformers", type(pipe.tokenizer).__name__],
             "scheduler": ["diffusers", type(pipe.scheduler).__name__],
             "safety_checker": [None, None], "feature_extractor": [None, None],
             "requires_safety_checker": False}  # fmt: skip
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    meta = fetched.meta
    manifest = {
        "format": "lorafleet-onnx",
        "schema_version": 1,
        "base_model": portable_model_name(base),
        "base_model_id": base_model_id(base),
        "adapter": {
            "ref": fetched.ref,
            "sha256": meta.sha256,
            "trigger": meta.trigger,
            "rank": meta.rank,
            "alpha": meta.alpha,
            "text_encoder": meta.text_encoder,
            "lora_scale": lora_scale,
            "registered": f"{fetched.name}/{fetched.version}" if fetched.version else None,
        },  # fmt: skip
        "exporter": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "method": "torch.onnx.export(dynamo=True)",
            "opset": OPSET,
            "dtype": "float32",
        },  # fmt: skip
        "vae_scaling_factor": pipe.vae.config.scaling_factor,  # latents / scaling_factor go into vae_decoder
        "graphs": {
            spec.name: {
                "file": f"{spec.name}/model.onnx",
                "external_data": (root / spec.name / "model.onnx.data").is_file(),
                **_io(root / spec.name / "model.onnx"),
                "check": asdict(checks[spec.name]) if spec.name in checks else None,
            }
            for spec in SPECS
        },
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lorafleet export-onnx", description=__doc__.split("\n")[0])
    p.add_argument("ref", help="an adapter folder, NAME (its champion), NAME@ALIAS, NAME/VERSION, runs:/… or models:/…")
    p.add_argument("out", help="the folder to write (must be empty or new; see --overwrite)")
    p.add_argument("--base-model", help="the model to fuse into (default: the adapter's own base model)")
    p.add_argument("--tracking-uri", help="MLflow server for registry references (default $MLFLOW_TRACKING_URI)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="scale of the fused adapter (default 1.0)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="compare each graph on onnxruntime (CPU) with PyTorch before writing (default on)")  # fmt: skip
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help=f"largest max-abs error relative to an output's scale (default {TOLERANCE:g})")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT (after a successful export)")
    a = p.parse_args(argv)
    from evaluation.registry import RegistryError

    try:
        result = export_onnx(a.ref, a.out, base_model=a.base_model, tracking_uri=a.tracking_uri, check=a.check,
                             tolerance=a.tolerance, lora_scale=a.lora_scale, overwrite=a.overwrite)  # fmt: skip
    except (OnnxExportError, AdapterError, RegistryError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, c in result.checks.items():
        print(f"{name}: onnxruntime vs PyTorch max abs error {c.max_abs_error:.3g} on {c.output} "
              f"(scale {c.output_scale:.3g}, relative {c.relative_error:.3g} <= {c.tolerance:g})")  # fmt: skip
    if not a.check:
        print("not checked (--no-check)")
    adapter = result.manifest["adapter"]
    print(f"wrote {result.out}: text_encoder, unet, vae_decoder (opset {OPSET}, fp32) fused with adapter sha256 "
          f"{adapter['sha256'][:12]}… on {result.manifest['base_model']}; manifest {MANIFEST}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
