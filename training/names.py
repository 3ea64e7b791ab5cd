"""Names derived from a dataset: the pipeline's folder and MLflow names, and its registered model.

    dataset_name("data/ohwx")                          # 'ohwx'
    dataset_name("s3://bucket/datasets/My Cats/")      # 'My-Cats'
    dataset_name("data/café")                          # 'cafe'
    registered_model_name("ohwx")                      # 'ohwx-lora'

One dataset, one registered model: a second concept never lands in the first one's registry entry. A folder name
that loses letters on the way (``猫``, ``My 猫``) or has none (``.``, ``__``) is refused with ``name=`` as the fix
rather than mapped to a name another dataset could also get.
"""

from __future__ import annotations

import posixpath
import re
import unicodedata
from pathlib import Path
from urllib.parse import urlparse

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
# Serve's model names are at most 64 characters (serving.config.MODEL_NAME): room for the "-lora" suffix
MAX_LENGTH = 64 - len("-lora")


class DatasetNameError(ValueError):
    """A dataset or ``name=`` that gives no usable name; the message says to set ``name=``."""


def slug(text: str) -> str:
    """``text`` as a name MLflow (experiments, registered models), Serve and folders all accept: accents dropped
    (NFKD), every run of characters outside ``[A-Za-z0-9_.-]`` replaced by ``-``, starting with a letter or digit,
    at most ``MAX_LENGTH`` (59) characters.

    Raises:
        DatasetNameError: nothing usable is left, or letters were lost (non-Latin scripts: ``猫`` → ``''``), which
            would give two different datasets one name.
    """
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    out = _UNSAFE.sub("-", plain)
    out = re.sub(r"^[^A-Za-z0-9]+", "", out)[:MAX_LENGTH].rstrip("-._")
    lost = sum(c.isalnum() for c in text) - sum(c.isalnum() for c in plain)
    if not out or lost:
        why = f"has letters a name cannot keep (it would be {out!r})" if lost else "has no letter or digit"
        raise DatasetNameError(f"{text!r} {why}: names of the run folder, MLflow experiment and registered model use "
                         "A-Z, a-z, 0-9, '_', '.', '-'; set name= (e.g. name=my-cats)")  # fmt: skip
    return out


def dataset_name(path: str) -> str:
    """The last path part of a dataset folder or ``s3://`` / ``gs://`` / ``file://`` URI, as a slug (``.`` and
    ``..`` resolved first). Raises ``DatasetNameError`` as ``slug`` does."""
    parsed = urlparse(path) if "://" in path else None
    if parsed:
        part = posixpath.basename(posixpath.normpath(parsed.path or "/").rstrip("/")) or parsed.netloc
    else:
        part = Path(path.replace("\\", "/")).expanduser().resolve().name
    return slug(part)


def registered_model_name(name: str) -> str:
    """The MLflow registered model of a dataset's adapters: ``<slug(name)>-lora`` (at most 64 characters)."""
    return f"{slug(name)}-lora"
