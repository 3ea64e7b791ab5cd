"""Typed schema for evaluating an adapter, gating it and registering it (values live in `configs/eval.yaml`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from training.config import _Section

# every metric an evaluation measures, and whether higher is better
METRICS: dict[str, Literal["max", "min"]] = {
    "clip_t": "max",  # CLIP-T: trigger images vs their prompts with the trigger spelled out as the concept
    "clip_i": "max",  # CLIP-I: trigger images vs the training images (mean pairwise cosine)
    "concept_learned": "max",  # clip_t(adapter) - clip_t(base), same prompts and seeds
    "concept_hit_rate": "max",  # share of trigger images whose best concept word (among alternatives) is right
    "flexibility": "max",  # trigger images vs their content words alone ("a blue triangle")
    "flexibility_hit_rate": "max",  # share of trigger images whose best content phrase (among the suite's) is right
    "prior_similarity": "max",  # base vs adapter images of prompts without the trigger (1 = untouched)
    "heldout_loss": "min",  # denoising loss on held-out images at fixed noise and timesteps
    "latency_p50_s": "min",  # seconds per image
    "latency_p95_s": "min",
    "success_rate": "max",  # generations that returned finite images
}


def _where(path: str | None) -> str | None:
    """An existing local path as an absolute one; anything else (a hub id, None) as it is."""
    return str(Path(path).expanduser().resolve()) if path and Path(path).expanduser().exists() else path


class SuitePrompt(_Section):
    prompt: str = Field(..., min_length=1, description="a prompt containing the trigger word")
    content: str = Field(..., min_length=1, description="what else the prompt asks for, e.g. 'a blue triangle'")


class SuiteArgs(_Section):
    """The fixed prompt suite of one dataset: what the trigger means and what must survive it."""

    trigger: str = Field(..., min_length=1, description="the trigger word the adapter was trained with")
    concept: str = Field(
        ..., min_length=1, description="the trigger spelled out in words the scorer knows, e.g. 'dotted'"
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
        missing = [p.prompt for p in self.prompts if self.trigger not in p.prompt.split()]
        if missing:
            raise ValueError(f"suite.prompts must contain the trigger {self.trigger!r}; these do not: {missing[:3]}")
        leaking = [p for p in self.prior_prompts if self.trigger in p.split()]
        if leaking:
            raise ValueError(f"suite.prior_prompts must not contain the trigger {self.trigger!r}: {leaking[:3]}")
        if self.concept in self.alternatives:
            raise ValueError(f"suite.alternatives must not list the concept {self.concept!r} itself")
        return self

    def spelled_out(self, prompt: str, word: str | None = None) -> str:
        """``prompt`` with the trigger replaced by ``word`` (default: the concept)."""
        word = self.concept if word is None else word
        return " ".join(word if w == self.trigger else w for w in prompt.split())

    def sha(self) -> str:
        """Identifies the suite: evaluations with the same suite (and generation) compare directly."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


class GenerationArgs(_Section):
    steps: int = Field(20, ge=1, le=200, description="denoising steps per image")
    guidance: float = Field(4.0, ge=1.0, le=30.0, description="classifier-free guidance scale")
    resolution: int | None = Field(None, ge=8, description="image side in pixels; null = the model's default")
    seed: int = Field(100, description="image j of a prompt uses seed + j, for the base model and the adapter")
    batch_size: int = Field(1, ge=1, description="images per pipeline call; latency = call time / batch size")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available (fp16), else CPU")


class DataArgs(_Section):
    train_path: str | None = Field(None, description="the training images (CLIP-I references); null skips clip_i")
    heldout_path: str | None = Field(
        None, description="held-out images + captions (dataset layout) for heldout_loss; null skips it"
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
    primary_metric: str = Field("clip_t", description="the metric a new adapter must beat the champion on")
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
    model_name: str = Field("lorafleet-adapter", min_length=1, description="registered model name")
    on_fail: Literal["tag", "skip"] = Field(
        "tag", description="tag: register a failed adapter with validation_status=rejected | skip: do not register"
    )
    alias: str = Field("champion", description="the alias a passing adapter gets")
    previous_alias: str = Field("previous", description="the alias the replaced champion gets (rollback target)")


class EvalMlflowArgs(_Section):
    enabled: bool = Field(True, description="log the evaluation (metrics, report, grids, adapter) to MLflow")
    tracking_uri: str | None = Field(
        None, description="tracking server URL; null = $MLFLOW_TRACKING_URI, else SQLite in output_dir"
    )
    experiment: str = Field("lorafleet-eval", description="experiment of the evaluation run (created if missing)")
    parent_run_id: str | None = Field(None, description="make the evaluation a child of this run (search, pipeline)")


class EvalConfig(_Section):
    base_model: str | None = Field(
        None, description="diffusers SD-1.x folder or hub id; null = the one the adapter was trained on"
    )
    clip_model: str = Field("models/toy-clip", description="CLIPModel folder or hub id (openai/clip-vit-large-patch14)")
    output_dir: str = Field("runs/eval", description="reports go to <output_dir>/<adapter sha256[:12]>/")
    suite: SuiteArgs
    generation: GenerationArgs = Field(default_factory=GenerationArgs)
    data: DataArgs = Field(default_factory=DataArgs)
    gate: GateArgs = Field(default_factory=GateArgs)
    registry: RegistryArgs = Field(default_factory=RegistryArgs)
    mlflow: EvalMlflowArgs = Field(default_factory=EvalMlflowArgs)

    @model_validator(mode="after")
    def _consistent(self) -> EvalConfig:
        problems = []
        if "concept_hit_rate" in self.gate.checks and not self.suite.alternatives:
            problems.append("gate.checks.concept_hit_rate needs suite.alternatives (words to compare the concept with)")
        if "prior_similarity" in self.gate.checks and not self.suite.prior_prompts:
            problems.append("gate.checks.prior_similarity needs suite.prior_prompts")
        if "clip_i" in self.gate.checks and not self.data.train_path:
            problems.append("gate.checks.clip_i needs data.train_path (the training images)")
        if "heldout_loss" in self.gate.checks and not self.data.heldout_path:
            problems.append("gate.checks.heldout_loss needs data.heldout_path (held-out images)")
        if self.registry.enabled and not self.mlflow.enabled:
            problems.append("registry.enabled=true needs mlflow.enabled=true (the registry is MLflow's)")
        if self.registry.alias == self.registry.previous_alias:
            problems.append("registry.alias and registry.previous_alias must differ")
        if problems:
            raise ValueError("\n  - ".join(problems))
        return self

    def comparable_key(self) -> str:
        """Evaluations with equal keys scored the same images the same way: their metrics compare directly.
        Local paths count by their content's location, not their spelling (relative = absolute)."""
        data = self.data.model_dump()
        for key in ("train_path", "heldout_path"):
            data[key] = _where(data[key])
        parts = {
            "suite": self.suite.sha(),
            "generation": self.generation.model_dump(exclude={"batch_size", "device"}),
            "clip": _where(self.clip_model),
            "data": data,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
