"""The multi-node storage rule and datasets behind URIs (file:// here; s3:// and gs:// take the same path)."""

from __future__ import annotations

import json
import shutil

import pytest

from cluster.storage import fstype, storage_problems
from training.config import DataConfig
from training.data import validate_dataset
from training.remote import DONE, local_copy

MOUNTS = """\
overlay / overlay rw 0 0
/dev/sda1 /work ext4 rw 0 0
fs-1.efs.us-west-2.amazonaws.com:/ /mnt/shared nfs4 rw 0 0
10.0.0.2:/share /mnt/shared/filestore nfs rw 0 0
"""


@pytest.fixture
def mounts(tmp_path) -> str:
    path = tmp_path / "mounts"
    path.write_text(MOUNTS)
    return str(path)


def test_fstype_is_the_longest_mount_holding_the_path(mounts):
    assert fstype("/work/runs/pipeline", mounts) == "ext4"
    assert fstype("/mnt/shared/runs", mounts) == "nfs4"
    assert fstype("/mnt/shared/filestore/x", mounts) == "nfs"
    assert fstype("/tmp/x", mounts) == "overlay"


def test_one_node_needs_nothing_shared(mounts):
    assert storage_problems({"output_dir": "/work/runs"}, nodes=1, mounts=mounts) == []


def test_several_nodes_refuse_node_local_paths_with_the_fix(mounts):
    problems = storage_problems(
        {"output_dir": "/work/runs", "ray.storage_path": "s3://bucket/ray", "other": "/mnt/shared/x"},
        nodes=3,
        mounts=mounts,
    )
    assert len(problems) == 1
    assert problems[0].startswith("output_dir=/work/runs is on a node-local filesystem (ext4)")
    assert "3 nodes" in problems[0] and "storage.shared=true" in problems[0]
    # a mount the user declares shared (e.g. a FUSE type not in the list) passes
    assert storage_problems({"output_dir": "/work/runs"}, nodes=3, declared_shared=True, mounts=mounts) == []


def test_local_copy_mirrors_a_file_uri_once_and_again_when_it_changes(toy_dataset, tmp_path):
    uri = toy_dataset.as_uri()
    first = local_copy(uri, tmp_path / "cache")
    assert (first / DONE).is_file() and (first / "metadata.jsonl").is_file()
    assert sorted(p.name for p in first.rglob("*.png")) == sorted(p.name for p in toy_dataset.rglob("*.png"))
    assert local_copy(uri, tmp_path / "cache") == first  # unchanged listing: the same mirror
    (toy_dataset / "extra.txt").write_text("x")
    second = local_copy(uri, tmp_path / "cache")
    assert second != first and (second / "extra.txt").is_file()


def test_local_copy_names_a_uri_that_is_not_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        local_copy((tmp_path / "missing").as_uri(), tmp_path / "cache")
    with pytest.raises(ValueError, match="cannot open nope://x"):
        local_copy("nope://x", tmp_path / "cache")


def test_validate_dataset_reads_a_uri(toy_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLEET_CACHE_DIR", str(tmp_path / "cache"))
    local = validate_dataset(DataConfig(path=str(toy_dataset), trigger="sks", resolution=64))
    remote = validate_dataset(DataConfig(path=toy_dataset.as_uri(), trigger="sks", resolution=64))
    assert not remote.errors and remote.fingerprint() == local.fingerprint()
    assert str(remote.root).startswith(str(tmp_path / "cache"))
    missing = validate_dataset(DataConfig(path=(tmp_path / "nope").as_uri(), trigger="sks"))
    assert missing.errors and "data.path file://" in missing.errors[0].message


def test_workers_mirror_the_uri_on_their_own_node(toy_dataset, train_config, tmp_path, monkeypatch):
    """The driver hands out its mirror's paths; a worker whose node lacks them mirrors the URI itself."""
    from training.worker import WorkerSpec

    monkeypatch.setenv("LORAFLEET_CACHE_DIR", str(tmp_path / "driver-cache"))
    cfg = train_config(**{"data.path": toy_dataset.as_uri()})
    report = validate_dataset(cfg.data)
    spec = json.loads(json.dumps(WorkerSpec(cfg, report.examples, report.fingerprint()).to_dict()))
    shutil.rmtree(tmp_path / "driver-cache")  # "another node": the driver's mirror is not here
    monkeypatch.setenv("LORAFLEET_CACHE_DIR", str(tmp_path / "worker-cache"))
    worker = WorkerSpec.from_dict(spec)
    assert [e.path.name for e in worker.examples] == [e.path.name for e in report.examples]
    assert all(e.path.is_file() and str(e.path).startswith(str(tmp_path / "worker-cache")) for e in worker.examples)
    assert worker.cfg.data.path == toy_dataset.as_uri()  # the URI stays the source of truth
