"""Evaluation metrics as pure functions of CLIP embeddings, images and numbers (no files, no MLflow).

Any ``transformers.CLIPModel`` scores: the toy CLIP by default, real CLIP by path or hub id.
Embeddings are L2-normalised, so every similarity below is a cosine in [-1, 1].

    scorer = ClipScorer.load("models/toy-clip")
    clip_t(scorer.images(imgs), scorer.texts(prompts))      # text alignment
    clip_i(scorer.images(imgs), scorer.images(references))  # concept fidelity
"""

from __future__ import annotations

import math

import numpy as np
import torch

from training.clip_scorer import ClipScorer as ClipScorer  # moved down to training/ (curation, captioning use it)


def paired_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of row i of ``a`` with row i of ``b`` (both normalised): shape (n,)."""
    if a.shape != b.shape:
        raise ValueError(f"paired embeddings must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (a * b).sum(dim=-1)


def clip_t(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """CLIP-T: mean cosine between each image and its own prompt."""
    return float(paired_similarity(image_emb, text_emb).mean())


def clip_i(image_emb: torch.Tensor, reference_emb: torch.Tensor) -> float:
    """CLIP-I (DreamBooth): mean cosine over every (generated, reference) image pair."""
    return float((image_emb @ reference_emb.T).mean())


def concept_gain(adapter_emb: torch.Tensor, base_emb: torch.Tensor, reference_emb: torch.Tensor) -> float:
    """CLIP-I of the adapter's images minus CLIP-I of the base model's: how far the adapter moved toward the
    training images (row i of both: the same prompt and seed). In cosine units; 0 = no closer than the base."""
    return clip_i(adapter_emb, reference_emb) - clip_i(base_emb, reference_emb)


def win_rate(adapter_emb: torch.Tensor, base_emb: torch.Tensor, reference_emb: torch.Tensor) -> float:
    """Share of pairs (row i: the same prompt and seed) whose adapter image has a higher mean cosine to the
    training images than the base model's image; a tie is not a win.

    Args:
        adapter_emb, base_emb: (n, d) normalised image embeddings, n >= 1.
        reference_emb: (m, d) the training images.
    """
    if adapter_emb.shape != base_emb.shape or not len(adapter_emb):
        raise ValueError(f"need paired non-empty embeddings, got {tuple(adapter_emb.shape)}, {tuple(base_emb.shape)}")
    ours, theirs = (adapter_emb @ reference_emb.T).mean(dim=1), (base_emb @ reference_emb.T).mean(dim=1)
    return float((ours > theirs).float().mean())


def relative_metrics(adapter: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """The metrics that compare two measured dicts: ``heldout_loss_ratio`` (adapter / base; NaN when the base's
    loss is missing or not positive) and ``flexibility_delta`` (adapter - base); each only when the adapter's
    value was measured."""
    out = {}
    if "heldout_loss" in adapter:
        b = base.get("heldout_loss", math.nan)
        out["heldout_loss_ratio"] = adapter["heldout_loss"] / b if b > 0 else math.nan
    if "flexibility_hit_rate" in adapter:
        out["flexibility_delta"] = adapter["flexibility_hit_rate"] - base.get("flexibility_hit_rate", math.nan)
    return out


def retrieval_accuracy(similarity: torch.Tensor, truth: list[int]) -> float:
    """Share of rows whose most similar column is the true one."""
    return int((similarity.argmax(dim=1) == torch.tensor(truth)).sum()) / len(truth)


def hit_rate(image_emb: torch.Tensor, option_emb: torch.Tensor, truth: list[int]) -> float:
    """Share of images whose most similar option is the true one.

    Args:
        image_emb: (n, d) images.
        option_emb: (k, d) options shared by all images, or (n, k, d) options per image.
        truth: index of the right option for each image.
    """
    per_image = option_emb.dim() == 3
    sim = torch.einsum("nd,nkd->nk", image_emb, option_emb) if per_image else image_emb @ option_emb.T
    return retrieval_accuracy(sim, truth)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation; NaN for no values."""
    return float(np.percentile(values, q)) if values else math.nan


def finite_image(array: np.ndarray) -> bool:
    """A generation succeeded when every pixel is a finite number (NaN weights give NaN images)."""
    return bool(np.isfinite(array).all())
