"""One training worker, without Ray: build parts, (resume,) train, validate, checkpoint.

The Ray Train wrapper calls ``run_worker`` with Ray's device, DDP ``prepare`` and ``report``;
tests and the benchmark call it with plain values.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from training.adapter import AdapterMeta, file_sha256, load_into_training, portable_model_name, save_adapter
from training.buckets import resolve_resolution
from training.config import TrainConfig
from training.data import Example
from training.dataset import make_source
from training.heldout import HeldOut
from training.init_adapter import load_init_adapter
from training.loop import TrainState, make_state, train_loop
from training.model import Parts, add_lora, enable_gradient_checkpointing, load_parts
from training.precision import set_matmul_precision
from training.remote import is_uri, local_copy
from training.sampling import generate, image_grid
from training.tracking import NullTracker

log = logging.getLogger(__name__)
STATE_NAME = "trainer_state.pt"
STATE_MANIFEST = "trainer_state.json"  # {"sha256", "bytes"} of trainer_state.pt: a truncated copy is not a checkpoint
ADAPTER_DIR = "adapter"


def sample_path(epoch: int) -> str:
    """Where an epoch's sample grid goes in the MLflow run (next to ``checkpoints/epoch_NNNN/adapter``)."""
    return f"samples/epoch_{epoch:04d}.png"


# sink(metrics, checkpoint_dir or None): Ray's report, or a test's list.append; the dir is gone afterwards
Sink = Callable[[dict[str, float], Path | None], None]


@dataclass
class WorkerSpec:
    """What the driver hands every worker: the validated config and dataset (so workers do not re-validate)."""

    cfg: TrainConfig
    examples: list[Example]
    dataset_hash: str
    heldout: list[Example] = field(default_factory=list)  # scored as val_loss, never trained on

    def to_dict(self) -> dict:
        return {
            "cfg": self.cfg.model_dump(mode="json"),
            "examples": [e.to_row() for e in self.examples],
            "heldout": [e.to_row() for e in self.heldout],
            "dataset_hash": self.dataset_hash,
            "driver_cwd": os.getcwd(),
            # dataset URIs: the driver's mirror folder -> the URI each worker mirrors on its own node
            "mirrors": {
                str(local_copy(u)): u
                for u in (self.cfg.data.path, self.cfg.validation.data_path, self.cfg.data.class_data_dir)
                if is_uri(u)
            },  # fmt: skip
        }

    @classmethod
    def from_dict(cls, d: dict) -> WorkerSpec:
        """On a worker: relative paths mean the driver's cwd when this node has it (a local run), else the
        worker's own cwd (``ray job submit --working-dir`` unpacks the same tree there)."""
        cwd = Path(d.get("driver_cwd", "."))
        cfg = TrainConfig.model_validate(d["cfg"])
        cfg.base_model = _localize(cfg.base_model, cwd)
        if cfg.pretrained_vae_model_name_or_path:
            cfg.pretrained_vae_model_name_or_path = _localize(cfg.pretrained_vae_model_name_or_path, cwd)
        cfg.data.path = _localize(cfg.data.path, cwd)
        if cfg.lora.init_adapter:
            cfg.lora.init_adapter = _localize(cfg.lora.init_adapter, cwd)
        mirrors = {root: str(local_copy(uri)) for root, uri in d.get("mirrors", {}).items()}

        def here(path: str) -> Path:
            for root, mine in mirrors.items():
                if path.startswith(root + os.sep):
                    return Path(mine) / Path(path).relative_to(root)
            return Path(_localize(path, cwd))

        def localized(row: dict | list) -> Example:
            ex = Example.from_row(row)
            return Example.from_row(row, path=here(str(ex.path)))

        examples = [localized(r) for r in d["examples"]]
        heldout = [localized(r) for r in d.get("heldout", [])]
        return cls(cfg, examples, d["dataset_hash"], heldout)


def _localize(path: str, driver_cwd: Path) -> str:
    p = Path(path)
    if p.is_absolute() or not (driver_cwd / p).exists():
        return path
    return str(driver_cwd / p)


def adapter_meta(spec: WorkerSpec, state: TrainState) -> AdapterMeta:
    cfg = spec.cfg
    return AdapterMeta(
        base_model=portable_model_name(cfg.base_model),
        rank=cfg.lora.rank,
        alpha=cfg.lora.alpha or cfg.lora.rank,
        target_modules=list(cfg.lora.target_modules),
        text_encoder=cfg.lora.text_encoder,
        trigger=cfg.data.trigger,
        dataset_hash=spec.dataset_hash,
        training={"step": state.step, "epoch": state.epoch, "optimizer": cfg.train.optimizer, "lr": cfg.train.lr},
    )


_TEXT_ENCODER_ARGS = ("text_encoder", "text_encoder_2")


def _lora_text_encoders(parts: Parts) -> dict[str, torch.nn.Module | None]:
    """``text_encoder`` / ``text_encoder_2`` keyword arguments of save_adapter / load_into_training: the encoders
    that carry a LoRA, None for the others."""
    return {n: parts.text_encoders[n] if n in parts.lora_text_encoders else None for n in _TEXT_ENCODER_ARGS}


def write_checkpoint(directory: Path, parts: Parts, state: TrainState, meta: AdapterMeta) -> Path:
    """adapter/ (the deliverable format) + trainer_state.pt (optimizer, schedule, step, epoch, RNG) + its
    manifest trainer_state.json (sha256 and size), so that a copy cut short by a full disk is never resumed from."""
    try:
        save_adapter(directory / ADAPTER_DIR, parts.unet, meta, **_lora_text_encoders(parts), family=parts.family.name)
        torch.save(state.state_dict(), directory / STATE_NAME)
        manifest = {"sha256": file_sha256(directory / STATE_NAME), "bytes": (directory / STATE_NAME).stat().st_size}
        (directory / STATE_MANIFEST).write_text(json.dumps(manifest))
    except OSError as exc:  # safetensors and torch name neither the folder nor always the errno
        raise OSError(exc.errno, f"[Errno {exc.errno}] cannot write checkpoint files in {directory}: {exc}") from exc
    return directory


def trainer_state_is_whole(directory: Path) -> bool:
    """True when ``trainer_state.pt`` is there and matches its manifest's sha256 and size.

    A storage copy that hit a full disk can leave a non-empty but truncated state file next to a whole
    adapter; only the manifest tells them apart. Checkpoints written before the manifest existed are
    accepted when ``torch.load`` reads them (a truncated zip archive does not load).
    """
    path = directory / STATE_NAME
    if not path.is_file():
        return False
    try:
        manifest = json.loads((directory / STATE_MANIFEST).read_text())
    except FileNotFoundError:
        try:
            torch.load(path, weights_only=True, map_location="cpu")
        except Exception:  # noqa: BLE001 - any unreadable state is "not whole"
            return False
        return True
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or path.stat().st_size != manifest.get("bytes"):
        return False
    return file_sha256(path) == manifest.get("sha256")


def read_checkpoint(directory: Path, parts: Parts, state: TrainState) -> None:
    """Resume: weights into the existing adapter, then optimizer/schedule/step (tensors only, no pickled code)."""
    load_into_training(directory / ADAPTER_DIR, parts.unet, **_lora_text_encoders(parts))
    state.load_state_dict(torch.load(directory / STATE_NAME, weights_only=True))
    log.info("resumed from %s at epoch %d, step %d", directory, state.epoch, state.step)


def validation_grid(parts: Parts, cfg: TrainConfig) -> Image.Image:
    """One image per ``validation.prompts`` entry, fixed seeds (the same every epoch), as a grid (≤ 6 per row).

    Runs the pipeline as it is served: modules in their stored dtypes (``parts.precision``), no autocast, LoRA
    dropout off. The pipeline makes latents in the text encoder's dtype; ``load_parts`` made the VAE cast them to
    its own at ``vae.decode`` (``training.precision.cast_latents_at_decode``), so an fp32 VAE under fp16 decodes.
    """
    v = cfg.validation
    modules = (parts.raw_unet, *parts.raw_text_encoders.values())
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        images = generate(parts.pipe, v.prompts, seed=v.seed, steps=v.steps, guidance=v.guidance)
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    return image_grid(images)


def build_worker_parts(cfg: TrainConfig, device: torch.device) -> Parts:
    """The frozen base in ``train.mixed_precision``'s dtypes on ``device``, with a fresh LoRA adapter, or one
    initialized from ``lora.init_adapter`` (``training.init_adapter``).

    On CUDA, fp32 matmuls use TF32 when ``train.allow_tf32`` (``training.precision.set_matmul_precision``).

    Raises:
        PrecisionError: fp16/bf16 off CUDA, naming train.mixed_precision and the fix.
        InitAdapterError: ``lora.init_adapter`` does not fit this LoRA config (naming the keys to set).
    """
    parts = load_parts(cfg.base_model, device, cfg.train.mixed_precision, vae=cfg.pretrained_vae_model_name_or_path)
    set_matmul_precision(device, cfg.train.allow_tf32)
    torch.manual_seed(cfg.train.seed)  # LoRA A is drawn from the global RNG: same init on every run and rank
    add_lora(parts, cfg.lora)
    if cfg.lora.init_adapter:  # continue an existing adapter: its weights, not a fresh init
        load_init_adapter(parts, cfg)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(parts)
    return parts


def run_worker(
    spec: WorkerSpec,
    *,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    prepare: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
    resume_from: Path | None = None,
    sink: Sink = lambda metrics, ckpt: None,
    tracker: NullTracker | None = None,
) -> tuple[Parts, TrainState]:
    """Train this worker's shard to the end; checkpoint every ``ray.checkpoint_every_n_epochs`` and at the end.

    ``device`` decides the precision (``train.mixed_precision``: fp16/bf16 need a CUDA device; ``ray.use_gpu`` is
    not read here — it only tells Ray Train what kind of workers to start).

    Raises:
        PrecisionError: fp16/bf16 on a device that is not CUDA.
    """
    spec = replace(spec, cfg=resolve_resolution(spec.cfg))  # data.resolution unset: the base model's own size
    cfg, tracker = spec.cfg, tracker or NullTracker()
    parts = build_worker_parts(cfg, torch.device(device))
    source = make_source(spec.examples, cfg.data, parts, cfg.use_cache, rank=rank, world_size=world_size)
    state = make_state(cfg, parts, source.batches_per_epoch(cfg.train.batch_size), rank)
    n_class = sum(e.prior for e in source.examples)
    log.info(
        "rank %d: %d images (%d class images, weight train.prior_loss_weight=%g) in buckets %s; %d samples per "
        "epoch with repeats = %d batches of <= %d; %d optimizer steps in all",
        *(rank, source.num_images, n_class, cfg.train.prior_loss_weight, source.histogram(), len(source)),
        *(source.batches_per_epoch(cfg.train.batch_size), cfg.train.batch_size, state.total_steps),
    )
    if resume_from is not None:
        read_checkpoint(Path(resume_from), parts, state)
    parts.unet = prepare(parts.unet)  # DDP after loading: the wrapper shares the same parameters
    for name in parts.lora_text_encoders:
        parts.text_encoders[name] = prepare(parts.text_encoders[name])

    held = HeldOut(spec.heldout, cfg, parts, rank, world_size) if spec.heldout else None
    validate = bool(cfg.validation.prompts) and rank == 0
    if state.epoch == 0:  # the base model: "before"
        if held:
            tracker.log_metrics({"val_loss": held.loss(parts)}, step=0)
        if validate:
            tracker.log_image(validation_grid(parts, cfg), sample_path(0))

    def on_epoch_end(metrics: dict[str, float], st: TrainState) -> None:
        last = st.done or st.epoch >= cfg.train.epochs
        if held:
            metrics["val_loss"] = held.loss(parts)  # every rank: a collective
        tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=st.epoch)
        sampled = validate and (last or st.epoch % cfg.validation.every_n_epochs == 0)
        if sampled:
            tracker.log_image(validation_grid(parts, cfg), sample_path(st.epoch))
        checkpoint = last or st.epoch % cfg.ray.checkpoint_every_n_epochs == 0
        if not (checkpoint or (sampled and cfg.validation.log_adapters)):
            sink(metrics, None)
            return
        # every rank reports (Ray's report is a barrier); only rank 0 writes the checkpoint
        with tempfile.TemporaryDirectory(prefix="lorafleet-ckpt-") as tmp:
            ckpt = write_checkpoint(Path(tmp), parts, st, adapter_meta(spec, st)) if rank == 0 else None
            if ckpt is not None and sampled and cfg.validation.log_adapters:
                # the adapter under the grid, so the user can promote the epoch they liked (evaluation.promote)
                tracker.log_artifacts(ckpt / ADAPTER_DIR, f"checkpoints/epoch_{st.epoch:04d}/{ADAPTER_DIR}")
            sink(metrics, ckpt if checkpoint else None)

    train_loop(cfg, parts, source, state, report=on_epoch_end, rank=rank, world_size=world_size)
    return parts, state
