"""Typed schema for evaluating an adapter, gating it and registering it (values live in `configs/eval.yaml`:
the generic config, whose suite is built from the dataset; `configs/eval-toy-sks.yaml`: the toy world's
hand-written suite with its concept word)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from training.config import _Section

# every metric an evaluation measures, and whether higher is better
METRICS: dict[str, Literal["max", "min"]] = {
    # absolute: a number of the adapter's images alone
    "clip_t": "max",  # CLIP-T: trigger images vs their prompts with the trigger spelled out as the concept
    "clip_i": "max",  # CLIP-I: trigger images vs the training images (mean pairwise cosine)
    "concept_hit_rate": "max",  # share of trigger images whose best concept word (among alternatives) is right
    "flexibility": "max",  # trigger images vs their content ("a blue triangle …", the prompt without the trigger)
    "flexibility_hit_rate": "max",  # share of trigger images whose best content phrase (among the suite's) is right
    "heldout_loss": "min",  # denoising loss on held-out images at fixed noise and timesteps
    "latency_p50_s": "min",  # seconds per image
    "latency_p95_s": "min",
    "success_rate": "max",  # generations that returned finite images
    # relative: the adapter against the base model on the same prompts and seeds
    "concept_learned": "max",  # clip_t(adapter) - clip_t(base)
    "concept_gain": "max",  # clip_i(adapter) - clip_i(base): moved toward the training images (no concept word)
    "concept_win_rate": "max",  # share of (prompt, seed) whose adapter image is nearer the training images
    "heldout_loss_ratio": "min",  # heldout_loss(adapter) / heldout_loss(base)
    "flexibility_delta": "max",  # flexibility_hit_rate(adapter) - flexibility_hit_rate(base)
    "prior_similarity": "max",  # base vs adapter images of prompts without the trigger (1 = untouched)
}
RELATIVE = ("concept_learned", "concept_gain", "concept_win_rate", "heldout_loss_ratio", "flexibility_delta",
            "prior_similarity")  # fmt: skip
# what a metric needs besides the base model's and the adapter's images of the trigger prompts
_NEEDS_CONCEPT = ("clip_t", "concept_learned", "concept_hit_rate")
_NEEDS_TRAIN = ("clip_i", "concept_gain", "concept_win_rate")
_NEEDS_HELDOUT = ("heldout_loss", "heldout_loss_ratio")


def words(text: str) -> list[str]:
    """The words of ``text``, one per whitespace-separated piece (so they line up with ``text.split()``), as
    ``training.captions.normalize_word`` makes them: lower-cased, surrounding punctuation stripped ("Sks," -> "sks";
    a piece of punctuation alone gives "")."""
    from training.captions import normalize_word

    return [normalize_word(w) for w in text.split()]


def mentions(text: str, word: str) -> bool:
    """Whether ``word`` is one of ``text``'s words (case and surrounding punctuation ignored)."""
    return word.lower() in words(text)


def _where(path: str | None) -> str | None:
    """An existing local path as an absolute one; anything else (a hub id, None) as it is."""
    return str(Path(path).expanduser().resolve()) if path and Path(path).expanduser().exists() else path


class SuitePrompt(_Section):
    prompt: str = Field(..., min_length=1, description="a prompt containing the trigger word")
    content: str = Field(..., min_length=1, description="what else the prompt asks for, e.g. 'a blue triangle'")


class SuiteArgs(_Section):
    """The fixed prompt suite of one dataset: what the trigger means and what must survive it."""

    trigger: str = Field(..., min_length=1, description="the trigger word the adapter was trained with")
    concept: str | None = Field(
        None,
        min_length=1,
        description="the trigger spelled out in words the scorer knows, e.g. 'dotted'; null (a suite built from "
        "the dataset): clip_t, concept_learned and concept_hit_rate are not measured, the concept is judged by "
        "image-image similarity to the training images (concept_gain, concept_win_rate)",
    )
    alternatives: list[str] = Field(
        default_factory=list,
        description="other words in the trigger's place (e.g. white, striped); concept_hit_rate needs them",
    )
    prompts: list[SuitePrompt] = Field(..., min_length=1, description="trigger prompts with their content")
    prior_prompts: list[str] = Field(
        default_factory=list, description="prompts without the trigger: the adapter should leave them alone"
    )
    images_per_prompt: int = Field(2, ge=1, le=16, description="seeded images per prompt (seed, seed+1, …)")

    @model_validator(mode="after")
    def _trigger_used(self) -> SuiteArgs:
        problems = []
        missing = [p.prompt for p in self.prompts if not mentions(p.prompt, self.trigger)]
        if missing:
            problems.append(f"suite.prompts must contain the trigger {self.trigger!r}; these do not: {missing[:3]}")
        leaking = [p for p in self.prior_prompts if mentions(p, self.trigger)]
        if leaking:
            problems.append(f"suite.prior_prompts must not contain the trigger {self.trigger!r}: {leaking[:3]}")
        leaking = [p.content for p in self.prompts if mentions(p.content, self.trigger)]
        if leaking:
            problems.append(f"suite.prompts[].content must not contain the trigger {self.trigger!r}: {leaking[:3]}")
        if self.concept is None and self.alternatives:
            problems.append("suite.alternatives need suite.concept (the word they are compared with); set both")
        if self.concept is not None and self.concept in self.alternatives:
            problems.append(f"suite.alternatives must not list the concept {self.concept!r} itself")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def spelled_out(self, prompt: str, word: str | None = None) -> str:
        """``prompt`` with the trigger replaced by ``word`` (default: the concept).

        Raises:
            ValueError: no ``word`` and the suite has no concept (a suite built from the dataset).
        """
        word = self.concept if word is None else word
        if word is None:
            raise ValueError("this suite has no concept word (suite.concept is null): nothing to spell out")
        return " ".join(word if w == self.trigger else w for w in prompt.split())

    def sha(self) -> str:
        """Identifies the suite: evaluations with the same suite (and generation) compare directly."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


class AutoSuiteArgs(_Section):
    """How the suite is built from the dataset's captions when ``suite`` is null (``evaluation.suite.build_suite``)."""

    images_per_prompt: int = Field(2, ge=1, le=16, description="seeded images per prompt (seed, seed+1, …)")
    max_prompts: int = Field(
        18, ge=1, le=200, description="at most this many trigger prompts: held-out captions, then content swaps"
    )
    seed: int = Field(0, description="which captions and swaps are chosen when there are more than max_prompts")
    concept: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="the built suite's concept word (suite.concept: the trigger spelled out in words the scorer "
        "knows, e.g. 'dotted'): clip_t and concept_learned are then measured too; null = none",
    )


class GenerationArgs(_Section):
    steps: int = Field(20, ge=1, le=200, description="denoising steps per image")
    guidance: float = Field(4.0, ge=1.0, le=30.0, description="classifier-free guidance scale")
    resolution: int | None = Field(
        None,
        ge=8,
        description="image side in pixels; null = the model's default (toy 64, SD 1.5 512, SDXL 1024). A search "
        "(tuning.handoff) sets its trials' data.resolution when that differs from the model's default",
    )
    seed: int = Field(100, description="image j of a prompt uses seed + j, for the base model and the adapter")
    batch_size: int = Field(1, ge=1, description="images per pipeline call; latency = call time / batch size")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available (fp16), else CPU")


class DataArgs(_Section):
    train_path: str | None = Field(
        None,
        description="the training images + captions: CLIP-I references (clip_i, concept_gain, concept_win_rate), "
        "the captions a suite is built from (suite: null), the registered model's name; null skips them",
    )
    heldout_path: str | None = Field(
        None,
        description="held-out images + captions (dataset layout): heldout_loss(_ratio), and the trigger prompts of "
        "a suite built from the dataset; null skips the loss (the training captions become the prompts)",
    )
    instance_prompt: str | None = Field(
        None, description="DreamBooth folders (images only): the caption of every image, e.g. 'a photo of sks dog'"
    )
    caption_column: str = Field("text", min_length=1, description="as training's data.caption_column")
    background: str = Field(
        "white", description="as training's data.background: transparent reference images are composited on it"
    )
    image_column: str = Field("file_name", min_length=1, description="as training's data.image_column")
    caption_extension: str = Field(".txt", pattern=r"^\.[^./\\]+$", description="as training's data.caption_extension")
    holdout: int = Field(
        0,
        ge=0,
        description="without heldout_path: this many images of train_path (evenly spaced, as training's "
        "validation.holdout takes them) are the held-out set, and not CLIP-I references; 0 = none",
    )
    loss_timesteps: int = Field(8, ge=1, le=1000, description="noise levels per held-out image")
    loss_seed: int = Field(0, description="seeds the held-out noise (same problems for every adapter)")
    max_references: int = Field(64, ge=1, description="at most this many training images as CLIP-I references")


class Bound(_Section):
    min: float | None = Field(None, description="the metric must be at least this")
    max: float | None = Field(None, description="the metric must be at most this")

    @model_validator(mode="after")
    def _one(self) -> Bound:
        if self.min is None and self.max is None:
            raise ValueError("a gate check needs min or max")
        return self


class GateArgs(_Section):
    checks: dict[str, Bound] = Field(default_factory=dict, description="metric -> {min: x} and/or {max: y}")
    primary_metric: str = Field("concept_gain", description="the metric a new adapter must beat the champion on")
    beat_champion: bool = Field(True, description="require primary_metric better than the current champion's")
    min_improvement: float = Field(0.0, ge=0, description="by at least this much (in the metric's units)")

    @model_validator(mode="after")
    def _known(self) -> GateArgs:
        problems = [
            f"gate.checks.{k}: unknown metric; use one of {', '.join(METRICS)}" for k in self.checks if k not in METRICS
        ]
        if self.primary_metric not in METRICS:
            problems.append(f"gate.primary_metric={self.primary_metric!r}: use one of {', '.join(METRICS)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class RegistryArgs(_Section):
    enabled: bool = Field(True, description="register the adapter in the MLflow model registry")
    model_name: str | None = Field(
        None,
        min_length=1,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="registered model name; null = '<folder name of data.train_path>-lora' (one per dataset)",
    )
    on_fail: Literal["tag", "skip"] = Field(
        "tag", description="tag: register a failed adapter with validation_status=rejected | skip: do not register"
    )
    alias: str = Field("champion", description="the alias a passing adapter gets")
    previous_alias: str = Field("previous", description="the alias the replaced champion gets (rollback target)")
    promote_to: Literal["champion", "challenger"] = Field(
        "champion",
        description="champion: a passing adapter gets `alias` at once | challenger: it gets the `challenger` alias "
        "and the Serve app's canary.share of the champion's traffic until `lorafleet canary promote` (serving/"
        "canary.py; with no champion yet it becomes the champion)",
    )


class EvalMlflowArgs(_Section):
    enabled: bool = Field(True, description="log the evaluation (metrics, report, grids, adapter) to MLflow")
    tracking_uri: str | None = Field(
        None, description="tracking server URL; null = $MLFLOW_TRACKING_URI, else SQLite in output_dir"
    )
    experiment: str = Field("lorafleet-eval", description="experiment of the evaluation run (created if missing)")
    parent_run_id: str | None = Field(None, description="make the evaluation a child of this run (search, pipeline)")


class EvalConfig(_Section):
    base_model: str | None = Field(
        None,
        description="diffusers folder or hub id of any supported family (SD 1.x/2.x, SDXL; docs/model-families.md); "
        "null = the one the adapter was trained on",
    )
    clip_model: str = Field("models/toy-clip", description="CLIPModel folder or hub id (openai/clip-vit-large-patch14)")
    output_dir: str = Field("runs/eval", description="reports go to <output_dir>/<adapter sha256[:12]>/")
    trigger: str | None = Field(
        None,
        min_length=1,
        description="the adapter's trigger word; null = suite.trigger, else the trigger in the adapter's "
        "lorafleet_adapter.json",
    )
    suite: SuiteArgs | None = Field(
        None,
        description="the prompt suite; null = built from the captions of data.train_path and data.heldout_path "
        "at evaluation time (auto_suite), judged against the base model with no concept word",
    )
    auto_suite: AutoSuiteArgs = Field(default_factory=AutoSuiteArgs)
    generation: GenerationArgs = Field(default_factory=GenerationArgs)
    data: DataArgs = Field(default_factory=DataArgs)
    gate: GateArgs = Field(default_factory=GateArgs)
    registry: RegistryArgs = Field(default_factory=RegistryArgs)
    mlflow: EvalMlflowArgs = Field(default_factory=EvalMlflowArgs)

    @model_validator(mode="after")
    def _consistent(self) -> EvalConfig:
        problems = self.gate_problems()
        if self.suite is None and not self.data.train_path:
            problems.append(
                "suite: null builds the suite from the dataset's captions: set data.train_path, or write a suite "
                "(see configs/eval-toy-sks.yaml)"
            )
        concept = self.auto_suite.concept
        if self.suite is not None and concept is not None and concept != self.suite.concept:
            problems.append(f"auto_suite.concept={concept!r} but suite.concept={self.suite.concept!r}: auto_suite "
                            "applies to a suite built from the dataset (suite: null); set suite.concept")  # fmt: skip
        if self.trigger and self.suite is not None and self.trigger != self.suite.trigger:
            problems.append(f"trigger={self.trigger!r} but suite.trigger={self.suite.trigger!r}; make them agree")
        if self.registry.enabled and not self.registry.model_name and not self.data.train_path:
            problems.append("registry.model_name is derived from data.train_path: set one of them")
        if self.registry.enabled and not self.mlflow.enabled:
            problems.append("registry.enabled=true needs mlflow.enabled=true (the registry is MLflow's)")
        if self.registry.alias == self.registry.previous_alias:
            problems.append("registry.alias and registry.previous_alias must differ")
        if problems:
            raise ValueError("\n  - ".join(problems))
        return self

    def gate_problems(self) -> list[str]:
        """Every gate metric (checks, and the primary metric when the champion must be beaten) that this config
        cannot measure, each with its fix. A suite built from the dataset (``suite`` null) has no concept word."""
        wanted = {k: f"gate.checks.{k}" for k in self.gate.checks}
        if self.gate.beat_champion:
            wanted.setdefault(self.gate.primary_metric, f"gate.primary_metric={self.gate.primary_metric}")
        suite, problems = self.suite, []
        concept = suite.concept if suite is not None else self.auto_suite.concept
        for metric, key in wanted.items():
            if metric in _NEEDS_CONCEPT and concept is None:
                where = "a suite built from the dataset has none" if suite is None else "suite.concept is null"
                problems.append(
                    f"{key} needs a concept word ({where}): use concept_gain / concept_win_rate, set "
                    "auto_suite.concept, or a hand-written suite with suite.concept (configs/eval-toy-sks.yaml)"
                )
            elif metric == "concept_hit_rate" and (suite is None or not suite.alternatives):
                problems.append(f"{key} needs suite.alternatives (words to compare the concept with)")
            if metric == "prior_similarity" and suite is not None and not suite.prior_prompts:
                problems.append(f"{key} needs suite.prior_prompts")
            if metric in _NEEDS_TRAIN and not self.data.train_path:
                problems.append(f"{key} needs data.train_path (the training images)")
            if metric in _NEEDS_HELDOUT and not (self.data.heldout_path or self.data.holdout):
                problems.append(f"{key} needs held-out images: data.heldout_path, or data.holdout")
            one_content = suite is not None and len({p.content for p in suite.prompts}) < 2
            if metric in ("flexibility_hit_rate", "flexibility_delta") and one_content:
                problems.append(
                    f"{key} needs at least 2 different prompt contents to choose between; the suite has one "
                    "(captions that differ only by the trigger): vary the captions or remove the check"
                )
        return problems

    def comparable_key(self) -> str:
        """Evaluations with equal keys scored the same images the same way: their metrics compare directly.
        Local paths count by their content's location, not their spelling (relative = absolute); the scorer
        inside the project counts by its project-relative path.

        Raises:
            ValueError: the suite is not built yet (``evaluation.suite.materialise`` builds it).
        """
        if self.suite is None:
            raise ValueError("the suite is built at evaluation time: materialise the config first")
        from training.adapter import portable_model_name

        data = self.data.model_dump()
        for key in ("train_path", "heldout_path"):
            data[key] = _where(data[key])
        parts = {
            "suite": self.suite.sha(),
            "generation": self.generation.model_dump(exclude={"batch_size", "device"}),
            # the scorer by a name that is the same in a job's unpacked copy of the project and in the checkout
            # (models/toy-clip), so `lorafleet promote` on the laptop compares with the pipeline's evaluations
            "clip": portable_model_name(self.clip_model),
            "data": data,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
