"""Auto-captioning: one interface, ``Captioner.caption(images) -> captions``, chosen by ``CaptionConfig``.

    from training.captioning import CaptionConfig, build_captioner
    captioner = build_captioner(CaptionConfig(trigger="sks"))        # toy for models/toy-sd, else BLIP
    captioner.caption([Image.open("0000.png")])                      # ['a red circle on a sks background']

``toy`` ranks the toy world's captions with the toy CLIP (``training.captioning.toy``); ``blip`` runs a hub
captioning model (``training.captioning.blip``). ``training.captioning.folder`` writes the captions into a
dataset folder in a layout ``training.layout`` reads; ``python -m training.captioning`` (``lorafleet caption``)
is the command.
"""

from __future__ import annotations

from typing import Protocol

from PIL import Image

from training.captioning.config import CaptionConfig, with_trigger

__all__ = ["CaptionConfig", "Captioner", "build_captioner", "with_trigger"]


class Captioner(Protocol):
    def caption(self, images: list[Image.Image]) -> list[str]:
        """One caption per image, in order, each carrying the trigger when one is configured."""
        ...


def build_captioner(cfg: CaptionConfig) -> Captioner:
    """The captioner ``cfg`` names (auto resolved from ``cfg.base_model``), loaded on its device.

    Raises:
        FileNotFoundError: the model is neither a local folder nor in the Hugging Face cache.
        ValueError: a device or dtype this machine cannot run (the message names the key and the fix).
    """
    if cfg.resolved_captioner() == "toy":
        from training.captioning.toy import ToyCaptioner

        return ToyCaptioner(cfg)
    from training.captioning.blip import BlipCaptioner

    return BlipCaptioner(cfg)
