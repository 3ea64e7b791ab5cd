"""Keep job logs to what a user reads: stage progress and our own messages, not library noise.

    from training.quiet import quiet_libraries
    quiet_libraries()          # in every entry point's main, and where Ray starts a worker (Train, Tune, Serve)

What it drops, and why each is noise here:

- transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back to
  `CLIPImageProcessorPil`" (and SigLIP's twin): diffusers' IP-adapter loader imports both processors whenever a
  Stable Diffusion pipeline module is imported, so every command and every Ray worker printed it; the PIL
  processor is the one we want on installs without torchvision.
- diffusers' "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'": printed at every load
  of a UNet-only adapter, which is what lorafleet trains by default (the message itself says it is safe to ignore).
- diffusers' and transformers' loading progress bars ("Loading pipeline components…", "Loading weights…"): one
  per model load, in every trial and evaluation; in a job log each update is a line.

Nothing else is silenced: other warnings of these libraries still reach the log.
"""

from __future__ import annotations

import logging
import os
import re
import warnings


class _DropMessages(logging.Filter):
    """Drops records whose message matches ``pattern``; everything else passes."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


# (logger, message) pairs; the loggers are the ones the libraries log these messages to (stdlib logging)
DROPPED = {
    "transformers.utils.import_utils": (
        r"`(\w+)ImageProcessor` requires torchvision \(not installed\); falling back to `\1ImageProcessorPil`"
    ),
    **{
        f"diffusers.loaders.{module}": r"No LoRA keys associated to \w+ found with the prefix"
        for module in ("lora_base", "lora_pipeline", "peft")
    },
}


def quiet_libraries() -> None:
    """Install the filters above and turn the loading progress bars off (idempotent; safe before the libraries
    are imported, since the filters attach to loggers by name)."""
    # MLflow's artifact download bars fill job logs (promote, evaluate of models:/ refs) with carriage returns
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # evaluation and serving hold several adapters on one UNet on purpose (PEFT warns on the second one)
    warnings.filterwarnings("ignore", message=r"Already found a `peft_config` attribute", category=UserWarning)
    for name, pattern in DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropMessages(pattern))
    try:
        import diffusers.utils.logging as diffusers_logging
        import transformers.utils.logging as transformers_logging
    except ImportError:  # pragma: no cover - both are dependencies
        return
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
