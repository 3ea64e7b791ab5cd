"""Toy-world adapters made in-process (no Ray): a trained one with configs/train.yaml's recipe, and broken
ones. Tests use them to check that the evaluation gate tells them apart; ``benchmarks/eval_gate.py``
measures the same adapters for the README's table.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from training.adapter import META_NAME, WEIGHTS_NAME, file_sha256

# The gate calibration's "properly trained" recipe: configs/train.yaml with rank 16, alpha 4 (LoRA scale 0.25)
# and 60 epochs. configs/train.yaml's own recipe (rank 8, alpha 8, 30 epochs) learns dotted, striped and framed
# but overwrites the prompted shapes on checkered (flexibility_hit_rate 0.25); the gentler scale learns all
# four and keeps the content (README, "Calibration"; benchmarks/eval_gate.py).
CALIBRATION_RECIPE = {"lora.rank": "16", "lora.alpha": "4", "train.epochs": "60"}


def train_toy_adapter(repo: Path, data: Path, out: Path, **overrides: str) -> Path:
    """configs/train.yaml's recipe (rank 8, AdamW 1e-3, 30 epochs) on ``data``, trained by one plain worker
    (``overrides``: dotted keys, e.g. ``**{"train.epochs": "2"}``). Returns the adapter folder."""
    from training.config import TrainConfig
    from training.configuration import load_config
    from training.data import validate_dataset
    from training.worker import ADAPTER_DIR, WorkerSpec, adapter_meta, run_worker, write_checkpoint

    values = {
        "base_model": str(repo / "models" / "toy-sd"),
        "output_dir": str(out),
        "data.path": str(data),
        "validation.prompts": "[]",
        "mlflow.enabled": "false",
    } | overrides
    cfg = load_config(TrainConfig, repo / "configs" / "train.yaml", [f"{k}={v}" for k, v in values.items()])
    report = validate_dataset(cfg.data)
    spec = WorkerSpec(cfg, report.examples, report.fingerprint())
    parts, state = run_worker(spec)
    write_checkpoint(out, parts, state, adapter_meta(spec, state))
    return out / ADAPTER_DIR


def randomize_adapter(src: Path, dst: Path, std: float = 0.3, seed: int = 0) -> Path:
    """Same keys and shapes as ``src``, random weights (a broken training run); metadata re-hashed.
    ``std=1e30`` gives an adapter whose images are NaN (the UNet overflows; NaN weights are refused at load)."""
    dst.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen) * std for k, v in load_file(str(src / WEIGHTS_NAME)).items()}
    save_file(state, str(dst / WEIGHTS_NAME), metadata={"format": "pt"})
    meta = json.loads((src / META_NAME).read_text())
    meta["sha256"] = file_sha256(dst / WEIGHTS_NAME)
    (dst / META_NAME).write_text(json.dumps(meta))
    return dst


def random_adapter(
    pipe,
    base_model: str | Path,
    out: Path,
    seed: int,
    rank: int = 4,
    std: float = 0.3,
    *,
    text_encoders: bool = False,
) -> Path:
    """A LoRA on ``pipe``'s UNet attention with random (non-zero) weights, saved in lorafleet's adapter format
    for ``base_model``: distinct adapters in seconds, for serving tests and load benchmarks. Works for every model
    family (``training.families``); ``text_encoders``: also a LoRA on the attention of every text encoder of the
    family (SD: ``text_encoder``; SDXL: ``text_encoder`` and ``text_encoder_2``)."""
    import copy

    from peft import LoraConfig

    from training.adapter import AdapterMeta, save_adapter
    from training.families import family_for

    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    te_targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
    gen = torch.Generator().manual_seed(seed)
    encoders = family_for(pipe).text_encoders(pipe) if text_encoders else {}
    parts = {"unet": (copy.deepcopy(pipe.unet), targets)} | {
        name: (copy.deepcopy(encoder), te_targets) for name, encoder in encoders.items()
    }
    for model, wrapped in parts.values():
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=wrapped, init_lora_weights="gaussian"))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=gen) * std
    meta = AdapterMeta(
        base_model=str(base_model),
        rank=rank,
        alpha=float(rank),
        target_modules=targets + (te_targets if encoders else []),
        text_encoder=bool(encoders),
        trigger="sks",
    )
    te = {name: model for name, (model, _) in parts.items() if name != "unet"}
    family = family_for(pipe).name
    return save_adapter(
        out, parts["unet"][0], meta, te.get("text_encoder"), text_encoder_2=te.get("text_encoder_2"), family=family
    )
