"""The toy world's captioner: the toy CLIP ranks every caption of the world's grammar against each image.

Every (colour, shape, background) of ``training.toy_world.world`` (6 x 3 x 5 = 90 full captions) is embedded once;
an image's caption is the candidate of highest cosine similarity (CLIP zero-shot classification, Radford et al.
2021, "Learning Transferable Visual Models From Natural Language Supervision", §3.1.2). With a trigger the caption
takes the form ``lorafleet dataset toy`` writes: the trigger replaces the background word, because the toy
datasets teach a background pattern (``a red circle on a sks background`` where ``sks`` is ``dotted``).
Measured on the toy-sks dataset and on wider-world scenes by ``benchmarks/caption_accuracy.py``.

This is the toy base model's captioner, as models/toy-clip is its scorer: it is chosen only for a toy-world base
model (``CaptionConfig.resolved_captioner``), and imported only then.
"""

from __future__ import annotations

import itertools

import torch
from PIL import Image

from training.captioning.config import CaptionConfig, with_trigger
from training.clip_scorer import ClipScorer
from training.toy_world import world

Attributes = tuple[str, str, str]  # (colour, shape, background)


class ToyCaptioner:
    """CLIP-ranked captions over the toy world's vocabulary; see the module docstring."""

    def __init__(self, cfg: CaptionConfig, scorer: ClipScorer | None = None):
        """Load the scorer (``cfg.resolved_model()``, a ``CLIPModel`` folder) on ``cfg``'s device in float32 and embed
        the candidate captions.

        Raises:
            FileNotFoundError: the scorer is not a CLIP folder (``ClipScorer.load`` says what to use).
            ValueError: a CUDA device on a machine without one, or a half-precision dtype asked for.
        """
        if cfg.dtype not in ("auto", "float32"):
            raise ValueError(f"caption.dtype={cfg.dtype}: the toy captioner's CLIP runs in float32; use auto")
        self.cfg = cfg
        self.scorer = scorer or ClipScorer.load(cfg.resolved_model(), cfg.resolved_device())
        self.scorer.batch_size = cfg.batch_size
        self.candidates: list[Attributes] = list(itertools.product(world.COLOURS, world.SHAPES, world.BACKGROUNDS))
        self.text_emb = self.scorer.texts([world.caption_for(*a) for a in self.candidates])  # (90, d)

    def predict(self, images: list[Image.Image]) -> list[Attributes]:
        """The best (colour, shape, background) for each image (converted to RGB); ``[]`` for no images."""
        if not images:
            return []
        emb = self.scorer.images([im.convert("RGB") for im in images])  # (n, d), normalised
        best = (emb @ self.text_emb.T).argmax(dim=1)
        return [self.candidates[int(i)] for i in best]

    @torch.no_grad()
    def caption(self, images: list[Image.Image]) -> list[str]:
        """One caption per image, in order: ``an orange circle on a dotted background``, or with
        ``cfg.trigger='sks'`` ``an orange circle on a sks background`` (``cfg.template`` null), or the template
        filled with the full caption and the trigger."""
        out = []
        for colour, shape, background in self.predict(images):
            if self.cfg.trigger and self.cfg.template is None:
                out.append(world.caption_for(colour, shape, self.cfg.trigger))
            else:
                full = world.caption_for(colour, shape, background)
                out.append(with_trigger(full, self.cfg.trigger, self.cfg.template or "{caption}"))
        return out
