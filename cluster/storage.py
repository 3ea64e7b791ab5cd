"""The multi-node storage rule: with more than one node, every run folder must be shared storage.

Tune keeps its experiment and Train its checkpoints under the pipeline's ``output_dir``; a worker on another
node writes there too, and a restored trial reads there. A node-local path would split a run across disks,
so it is refused before anything starts: at submit time (``cluster.jobs``) and again by the job itself.
"""

from __future__ import annotations

from pathlib import Path

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "abfss://", "az://", "hdfs://")
SHARED_FSTYPES = {
    "nfs", "nfs4", "cifs", "smb3", "lustre", "glusterfs", "ceph", "beegfs", "gpfs", "efs",
    "fuse.gcsfuse", "fuse.s3fs", "fuse.mountpoint-s3", "fuse.juicefs", "fuse.glusterfs", "fuse.cephfs",
}  # fmt: skip


def fstype(path: str | Path, mounts: str = "/proc/mounts") -> str | None:
    """The filesystem type of the mount holding ``path`` (longest mount point that contains it)."""
    target = Path(path).expanduser().resolve()
    best, kind = -1, None
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = Path(fields[1].replace("\\040", " "))
        if (target == point or point in target.parents) and len(point.parts) > best:
            best, kind = len(point.parts), fields[2]
    return kind


def is_shared(path: str, mounts: str = "/proc/mounts") -> bool:
    return path.startswith(REMOTE_SCHEMES) or fstype(path, mounts) in SHARED_FSTYPES


def storage_problems(
    paths: dict[str, str | None], nodes: int, declared_shared: bool = False, mounts: str = "/proc/mounts"
) -> list[str]:
    """One message per config key whose path is node-local while the cluster has ``nodes`` > 1 nodes.

    ``declared_shared``: the user states the paths are the same shared mount on every node (``storage.shared``).
    """
    if nodes <= 1 or declared_shared:
        return []
    problems = []
    for key, path in paths.items():
        if path and not is_shared(path, mounts):
            kind = fstype(path, mounts) or "unknown"
            problems.append(
                f"{key}={path} is on a node-local filesystem ({kind}) but the cluster has {nodes} nodes: use shared "
                "storage (an NFS/EFS/Filestore mount at the same path on every node, or s3:// / gs:// for "
                "ray.storage_path) and set storage.shared=true when it is a shared mount"
            )
    return problems
