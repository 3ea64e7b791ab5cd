"""A CLIP model that embeds images and texts: the scorer evaluation, captioning and curation share.

Any ``transformers.CLIPModel`` folder or hub id loads (the toy CLIP ``models/toy-clip``, or real CLIP such as
``openai/clip-vit-large-patch14``). Embeddings are L2-normalised, so ``a @ b.T`` is a cosine in [-1, 1].
It lives in ``training/`` (the lowest floor) so that ``training.captioning`` and ``training.curation`` use the very
scorer ``evaluation.metrics`` re-exports, without a lower package importing a higher one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image


@dataclass
class ClipScorer:
    """A CLIP model and its processor, embedding images and texts in batches (no gradients)."""

    model: object  # transformers.CLIPModel
    processor: object  # transformers.CLIPProcessor
    batch_size: int = 64

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def load(cls, name_or_path: str, device: str | torch.device = "cpu") -> ClipScorer:
        """``CLIPModel/CLIPProcessor.from_pretrained`` on a local folder or hub id, on ``device`` (fp32).

        Raises:
            FileNotFoundError: neither a local CLIP folder nor in the Hugging Face cache.
        """
        from transformers import CLIPModel, CLIPProcessor

        try:
            model = CLIPModel.from_pretrained(name_or_path).eval().to(device)
            processor = CLIPProcessor.from_pretrained(name_or_path)
        except OSError as exc:
            raise FileNotFoundError(
                f"cannot load clip_model {name_or_path!r}: not a local CLIP folder and not in the Hugging Face "
                "cache (HF_HUB_OFFLINE=1 forbids downloads); use models/toy-clip or a downloaded snapshot"
            ) from exc
        return cls(model, processor)

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        from training.toy_world.clip import image_embeds

        out = []
        for i in range(0, len(images), self.batch_size):
            pix = self.processor(images=images[i : i + self.batch_size], return_tensors="pt").pixel_values
            out.append(image_embeds(self.model, pix.to(self.device)).cpu())
        return torch.cat(out) if out else torch.empty(0)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        from training.toy_world.clip import text_embeds

        out = []
        for i in range(0, len(texts), self.batch_size):
            tok = self.processor.tokenizer(
                texts[i : i + self.batch_size], padding=True, truncation=True, return_tensors="pt"
            )
            ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
            out.append(text_embeds(self.model, ids, mask).cpu())
        return torch.cat(out) if out else torch.empty(0)
