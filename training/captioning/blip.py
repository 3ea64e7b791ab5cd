"""Captions from a hub captioning model: BLIP (Li et al. 2022, "BLIP: Bootstrapping Language-Image Pre-training")
through transformers' ``BlipForConditionalGeneration`` + ``BlipProcessor``.

    cfg = CaptionConfig(captioner="blip", model="Salesforce/blip-image-captioning-base", trigger="sks")
    BlipCaptioner(cfg).caption([Image.open("dog.jpg")])   # ['sks, a dog sitting on the grass']

Loaded with ``from_pretrained`` from a hub id (from the Hugging Face cache when ``HF_HUB_OFFLINE=1``) or a local
folder in the same layout; bf16 (else fp16) on CUDA, fp32 on CPU. Decoding is greedy, so a caption depends only on
its image: the same in every batch and every run.
"""

from __future__ import annotations

import torch
from PIL import Image

from training.captioning.config import CaptionConfig, with_trigger

DEFAULT_TEMPLATE = "{trigger}, {caption}"


class BlipCaptioner:
    """A BLIP captioning model on one device; see the module docstring."""

    def __init__(self, cfg: CaptionConfig):
        """Load ``cfg.resolved_model()`` on ``cfg``'s device and dtype.

        Raises:
            FileNotFoundError: neither a local BLIP folder nor in the Hugging Face cache.
            ValueError: a CUDA device or half precision asked for on a machine without CUDA.
        """
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.cfg = cfg
        self.device = cfg.resolved_device()
        self.dtype = cfg.resolved_dtype(self.device)
        name = cfg.resolved_model()
        try:
            self.processor = BlipProcessor.from_pretrained(name)
            model = BlipForConditionalGeneration.from_pretrained(name, dtype=self.dtype)
        except (OSError, ValueError) as exc:  # ValueError: huggingface_hub's HFValidationError for a bad id
            raise FileNotFoundError(
                f"cannot load caption.model {name!r} as BLIP: not a local folder in BLIP's layout and not in the "
                f"Hugging Face cache (HF_HUB_OFFLINE=1 forbids downloads): `hf download {name}` where the Hub is "
                "reachable, or point caption.model at a local folder"
            ) from exc
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def describe(self, images: list[Image.Image]) -> list[str]:
        """The model's own caption of each image (greedy decoding, special tokens dropped), in order."""
        out: list[str] = []
        for i in range(0, len(images), self.cfg.batch_size):
            batch = [im.convert("RGB") for im in images[i : i + self.cfg.batch_size]]
            inputs = self.processor(images=batch, return_tensors="pt").to(self.device)
            ids = self.model.generate(
                pixel_values=inputs.pixel_values.to(self.dtype),
                max_new_tokens=self.cfg.max_new_tokens,
                do_sample=False,
                num_beams=1,
            )
            out += [" ".join(t.split()) for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return out

    def caption(self, images: list[Image.Image]) -> list[str]:
        """One caption per image with the trigger placed by ``cfg.template`` (null: ``'{trigger}, {caption}'``)."""
        template = self.cfg.template or DEFAULT_TEMPLATE
        return [with_trigger(c, self.cfg.trigger, template) for c in self.describe(images)]
