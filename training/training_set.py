"""What a run trains on: the instance images (less any held out), each × its repeats, plus DreamBooth class images.

    report = validate_dataset(cfg.data)                  # the instance images: trigger, held-out split, suite
    spec = build_worker_spec(cfg, report)                # + class images, balanced; the one place a spec is made
    log.info("%s", describe_epoch(spec.examples, cfg))   # "24 samples per epoch: 6 images × repeats …"

Prior preservation (diffusers' ``train_dreambooth_lora.py --with_prior_preservation``, kohya's ``reg_data_dir``):
``data.class_data_dir`` holds images of the concept's class without the trigger (e.g. other dogs); they are
validated like the dataset (any layout ``validate_dataset`` reads; ``data.class_prompt`` captions them when they
have no captions), become ``Example(prior=True)``, and are added to the workers' examples only here — after the
trigger detection, the held-out split and the evaluation suite, which see the instance images alone. As kohya
does, the class images are balanced to as many samples per epoch as the instance images × their repeats, and
their loss is weighted by ``train.prior_loss_weight`` (``training.loop.weighted_loss``). lorafleet does not
generate class images (diffusers' ``--num_class_images`` does): a missing or empty folder is an error.

The run's dataset hash (``WorkerSpec.dataset_hash``, the adapter's ``dataset_hash``) covers the class images too:
they change the trained model. Without class images it is the instance dataset's fingerprint, as before.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from training.captions import caption_length_problems, caption_words, load_tokenizers
from training.config import IMAGE_EXTENSIONS, DataConfig, TrainConfig
from training.data import DatasetError, DatasetReport, Example, Problem, validate_dataset
from training.heldout import select_heldout
from training.loop import optimizer_steps
from training.remote import is_uri
from training.worker import WorkerSpec

log = logging.getLogger(__name__)

# field names of the derived config that validates the class folder -> the user's own field names
_CLASS_FIELDS = {"data.instance_prompt": "data.class_prompt", "data.path": "data.class_data_dir"}


def class_data_config(data: DataConfig) -> DataConfig:
    """The DataConfig that validates ``data.class_data_dir``: its path, ``class_prompt`` as the DreamBooth caption,
    no trigger (class images must not teach the concept), every image used, one image enough."""
    return data.model_copy(
        update={
            "path": data.class_data_dir,
            "format": "auto",
            "instance_prompt": data.class_prompt,
            "trigger": None,
            "min_images": 1,
            "max_images": None,
            "class_data_dir": None,
            "class_prompt": None,
        }
    )


def _user_fields(message: str) -> str:
    for derived, own in _CLASS_FIELDS.items():
        message = message.replace(derived, own)
    return message


def _has_images(root: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.rglob("*") if p.is_file())


def _overlap(data: DataConfig) -> str | None:
    """Why ``data.class_data_dir`` and ``data.path`` cannot both be used (same folder, or the dataset inside the
    class folder: its images would train as class images too), or None. A class folder inside the dataset is fine:
    the dataset's layout skips it."""
    if is_uri(str(data.class_data_dir)) or is_uri(data.path):
        return None
    cls = Path(str(data.class_data_dir)).expanduser().resolve()
    own = Path(data.path).expanduser().resolve()
    if cls == own:
        return (f"data.class_data_dir and data.path are the same folder ({own}): class images are other images of "
                "the concept's class, without the trigger; put them in a folder of their own")  # fmt: skip
    if own.is_relative_to(cls):
        return (f"data.path {own} is inside data.class_data_dir {cls}: the dataset's images would train as class "
                "images too; put the class images in a folder of their own, next to the dataset")  # fmt: skip
    return None


def check_class_images(data: DataConfig) -> DatasetReport:
    """``data.class_data_dir`` validated as a dataset, every problem in the report (nothing raised): what training
    uses (``validate_class_images``) and ``lorafleet validate`` shows. Every example has ``prior=True``; problems
    name the user's fields (``data.class_data_dir``, ``data.class_prompt``), not the derived config's.

    Errors: the folder is the dataset's (or holds it), is missing, is a file or holds no images;
    ``data.class_prompt`` contains the trigger; a class image cannot be used. Warnings: a class caption contains
    the trigger.
    """
    root = Path(str(data.class_data_dir)).expanduser()
    report = DatasetReport(root, "class images")
    if why := _overlap(data):
        report.problems.append(Problem(".", "error", why))
        return report
    if not is_uri(str(data.class_data_dir)) and not (root.is_dir() and _has_images(root)):
        state = "holds no images" if root.is_dir() else "is a file, not a folder" if root.exists() else "does not exist"
        report.problems.append(
            Problem(
                ".",
                "error",
                f"data.class_data_dir {root} {state}: prior preservation (train.with_prior_preservation) needs "
                "class images — images of the concept's class without the trigger, e.g. 100-200 drawn by the base "
                "model from data.class_prompt (lorafleet does not generate them); add them, or drop "
                "data.class_data_dir (in a training config: train.with_prior_preservation=false). A relative "
                "path is read from the current folder",
            )
        )
        return report
    trigger = data.trigger
    if trigger and data.class_prompt and trigger.lower() in caption_words(data.class_prompt):
        msg = f"data.class_prompt {data.class_prompt!r} contains the trigger {trigger!r}; class images must not"
        report.problems.append(Problem(".", "error", msg))
        return report
    found = validate_dataset(class_data_config(data))
    report = DatasetReport(
        found.root,
        f"class images, {found.format}",
        [replace(e, prior=True) for e in found.examples],
        [Problem(p.file, p.severity, _user_fields(p.message)) for p in found.problems],
        found.buckets,
        found.bucket_rule,
    )
    if trigger:
        for e in report.examples:
            if trigger.lower() in caption_words(e.caption):
                name = e.path.name
                report.problems.append(
                    Problem(name, "warning", f"class caption contains the trigger {trigger!r}; it teaches the concept")
                )
    return report


def validate_class_images(cfg: TrainConfig) -> DatasetReport | None:
    """``check_class_images`` for a run; None when prior preservation is off.

    Raises:
        DatasetError: any error of ``check_class_images`` (every problem listed; nothing has been written).
    """
    if not cfg.prior_preservation:
        if cfg.data.class_data_dir:
            log.warning("train.with_prior_preservation=false: the class images in data.class_data_dir are ignored")
        return None
    report = check_class_images(cfg.data)
    if not report.errors:
        log.info("%s (weight train.prior_loss_weight=%g)", report.summary(), cfg.train.prior_loss_weight)
    report.raise_if_errors()
    return report


def balance_class_examples(instance: list[Example], classes: list[Example]) -> list[Example]:
    """Class examples with repeats set so an epoch draws as many class samples as instance samples, as kohya-ss
    sd-scripts' ``DreamBoothDataset`` does (``train_util.py``): class images are taken in order, each with its own
    repeats, until their sum reaches the instance images × repeats; later rounds add one repeat per image in
    order. Images not reached in the first round are not used (kohya warns "some of reg images are not used").

    Args:
        instance: the training examples (their ``repeats`` summed is the target).
        classes: the class examples in a fixed order (by path).

    Returns:
        The class examples used, with their repeats; empty when either list is.
    """
    target = sum(e.repeats for e in instance)
    if not classes or target == 0:
        return []
    repeats: list[int] = []
    n = 0
    for e in classes:  # first round: each image registers with its own repeats
        repeats.append(e.repeats)
        n += e.repeats
        if n >= target:
            break
    i = 0
    while n < target:  # later rounds (every image registered): one more repeat each, in order
        repeats[i % len(repeats)] += 1
        n += 1
        i += 1
    return [replace(e, repeats=r) for e, r in zip(classes, repeats)]


def run_fingerprint(report: DatasetReport, classes: DatasetReport | None) -> str:
    """The run's dataset hash: the instance dataset's fingerprint, combined with the class images' when any."""
    if classes is None or not classes.examples:
        return report.fingerprint()
    return hashlib.sha256(f"{report.fingerprint()}\0class\0{classes.fingerprint()}".encode()).hexdigest()


def check_caption_lengths(cfg: TrainConfig, report: DatasetReport, tokenizer: Any = None) -> list[Problem]:
    """Captions of ``report`` (class images too) that one of the base model's tokenizers cuts
    (``caption_length_problems`` for each; SDXL has two): warnings are logged, and returned with the errors — one
    problem per caption, the worst of the tokenizers'. Needs the tokenizers, so it runs on the driver
    (``build_worker_spec``, the pipeline's validate stage, ``lorafleet validate --base-model``), not in
    ``validate_dataset``. ``tokenizer``: one tokenizer, or ``{subfolder: tokenizer}``; None loads every tokenizer of
    ``cfg.base_model`` (``captions.load_tokenizers``); if that fails the check is skipped with a warning (the
    workers name the model problem when they load it).

    Raises:
        DatasetError: a caption's trigger lies past a tokenizer's limit (it would never be trained).
    """
    if tokenizer is None:
        try:
            tokenizer = load_tokenizers(cfg.base_model)
        except OSError as exc:
            log.warning("caption lengths not checked: %s", exc)
            return []
    tokenizers = tokenizer if isinstance(tokenizer, dict) else {"tokenizer": tokenizer}
    names = [(_name(e.path, report.root), e.caption) for e in report.examples]
    worst: dict[str, Problem] = {}
    for sub, tok in tokenizers.items():
        for p in caption_length_problems(names, tok, cfg.data.trigger):
            if len(tokenizers) > 1:
                p = replace(p, message=f"{p.message} ({sub})")
            if p.file not in worst or (p.severity == "error" and worst[p.file].severity != "error"):
                worst[p.file] = p
    problems = [worst[f] for f, _ in names if f in worst]
    for p in problems:
        if p.severity == "warning":
            log.warning("%s: %s", p.file, p.message)
    if any(p.severity == "error" for p in problems):
        raise DatasetError(DatasetReport(report.root, report.format, [], problems))
    return problems


def _name(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def build_worker_spec(cfg: TrainConfig, report: DatasetReport) -> WorkerSpec:
    """The workers' examples: ``report``'s images less the held-out ones, then the balanced class images.

    Raises:
        DatasetError: the held-out folder or the class images have problems, or a caption's trigger lies past the
            base model's token limit (``check_caption_lengths``).
        PreflightError: ``validation.holdout`` leaves no training images.
    """
    train, heldout = select_heldout(cfg, report.examples)
    check_caption_lengths(cfg, report)
    classes = validate_class_images(cfg)
    used = balance_class_examples(train, classes.examples) if classes else []
    if classes and len(used) < len(classes.examples):
        log.warning(
            "%d of %d class images are used: an epoch takes as many class samples as instance samples (%d); "
            "raise the dataset's repeats to use them all",
            len(used),
            len(classes.examples),
            sum(e.repeats for e in train),
        )
    return WorkerSpec(cfg, train + used, run_fingerprint(report, classes), heldout)


def epoch_counts(examples: list[Example]) -> dict[str, int]:
    """Images and samples per epoch (images × repeats), instance and class: what a run's step count is made of."""
    instance = [e for e in examples if not e.prior]
    classes = [e for e in examples if e.prior]
    return {
        "num_images": len(instance),
        "samples_per_epoch": sum(e.repeats for e in instance),
        "num_class_images": len(classes),
        "class_samples_per_epoch": sum(e.repeats for e in classes),
    }


def describe_epoch(cfg: TrainConfig, examples: list[Example], batches_per_epoch: int | None = None) -> str:
    """One line of epoch arithmetic for the log, e.g. ``an epoch is 30 samples: 6 images × repeats = 15, 4 class
    images (weight train.prior_loss_weight=1) balanced to 15; 8 batches of ≤ 4 per worker (1 worker) = 8 optimizer
    steps per epoch, 80 in all``. ``batches_per_epoch``: per worker (``training.dataset.planned_batches``); None
    leaves the step count out."""
    c = epoch_counts(examples)
    total = c["samples_per_epoch"] + c["class_samples_per_epoch"]
    text = f"an epoch is {total} samples: {c['num_images']} images × repeats = {c['samples_per_epoch']}"
    if c["num_class_images"]:
        text += (
            f", {c['num_class_images']} class images (weight train.prior_loss_weight={cfg.train.prior_loss_weight:g})"
            f" balanced to {c['class_samples_per_epoch']}"
        )
    if batches_per_epoch is not None:
        t = cfg.train
        steps = -(-batches_per_epoch // t.grad_accum)
        text += (
            f"; {batches_per_epoch} batches of ≤ {t.batch_size} per worker ({cfg.ray.num_workers} worker(s)) = "
            f"{steps} optimizer steps per epoch, {optimizer_steps(t, batches_per_epoch)} in all"
        )
    return text
