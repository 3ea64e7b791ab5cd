"""Names derived from a dataset (training/names.py): valid for MLflow and Serve, never one name for two datasets."""

from __future__ import annotations

import pytest

from serving.config import MODEL_NAME
from training.names import DatasetNameError, dataset_name, registered_model_name, slug


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("data/ohwx", "ohwx"),
        ("data/ohwx/", "ohwx"),
        ("s3://bucket/datasets/My Cats/", "My-Cats"),
        ("gs://bucket", "bucket"),
        ("s3://b/a/..", "b"),
        ("file:///tmp/x/toy-sks", "toy-sks"),
        ("data/café", "cafe"),
        ("data/_private", "private"),
        ("data/" + "x" * 80, "x" * 59),
    ],
)
def test_dataset_names_are_valid_mlflow_and_serve_names(path, name):
    assert dataset_name(path) == name
    assert MODEL_NAME.match(registered_model_name(name)), registered_model_name(name)  # Serve accepts it by name


def test_dot_folders_are_named_after_the_folder_they_mean(tmp_path, monkeypatch):
    (tmp_path / "dogs" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "dogs" / "sub")
    assert dataset_name(".") == "sub" and dataset_name("..") == "dogs"


@pytest.mark.parametrize("folder", ["猫", "狗", "My 猫", "__", "..."])
def test_a_name_that_would_lose_its_letters_is_refused_with_the_fix(folder):
    """`猫` and `狗` would both become the same fallback name and share one registered model; refused instead."""
    with pytest.raises(DatasetNameError, match=r"set name="):
        slug(folder)
