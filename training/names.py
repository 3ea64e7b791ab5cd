"""Names derived from a dataset: the pipeline's folder and MLflow names, and its registered model.

    dataset_name("data/ohwx")                          # 'ohwx'
    dataset_name("s3://bucket/datasets/My Cats/")      # 'My-Cats'
    registered_model_name("ohwx")                      # 'ohwx-lora'

One dataset, one registered model: a second concept never lands in the first one's registry entry.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from urllib.parse import urlparse

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def slug(text: str, fallback: str = "dataset") -> str:
    """``text`` with every run of characters outside ``[A-Za-z0-9_.-]`` replaced by ``-`` (MLflow registered
    model names, run folders and Ray names all accept these), at most 64 characters."""
    return _UNSAFE.sub("-", text).strip("-.")[:64] or fallback


def dataset_name(path: str) -> str:
    """The last path part of a dataset folder or ``s3://`` / ``gs://`` / ``file://`` URI, as a slug."""
    parsed = urlparse(path) if "://" in path else None
    part = PurePosixPath(parsed.path if parsed else path.replace("\\", "/")).name
    if not part and parsed:  # s3://bucket with no folder
        part = parsed.netloc
    return slug(part)


def registered_model_name(name: str) -> str:
    """The MLflow registered model of a dataset's adapters: ``<name>-lora``."""
    return f"{slug(name)}-lora"
