"""Ray Train V2 integration on CPU: 2 DDP workers, MLflow over HTTP, and recovery from a killed worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from mlflow import MlflowClient

from training.adapter import load_adapter, verify_adapter
from training.config import PreflightError
from training.families import load_pipeline
from training.sampling import generate
from training.train import CheckpointWriteError, complete_checkpoints, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def _history(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_two_workers_train_log_and_write_a_loadable_adapter(
    local_ray, train_config, toy_dataset, mlflow_server, tmp_path
):
    cfg = train_config(
        **{
            "ray.num_workers": 2,
            "train.epochs": 4,
            "train.batch_size": 2,
            "ray.checkpoint_every_n_epochs": 2,
            "mlflow.enabled": True,
            "mlflow.tracking_uri": mlflow_server,
            "mlflow.experiment": "test-ray-train",
            "validation.prompts": "[a red circle on a sks background, a blue square on a white background]",
            "validation.every_n_epochs": 2,
            "validation.steps": 4,
            "validation.data_path": str(toy_dataset / "heldout"),
        }
    )
    result = run(cfg)
    # 8 images over 2 workers = 4 each, batch 2 -> 2 steps per epoch on every rank
    assert result.metrics["epoch"] == 4 and result.metrics["step"] == 8
    assert all(h["val_loss"] > 0 for h in result.history)  # the held-out set, all-reduced over both ranks

    pipe = load_pipeline(cfg.base_model, device="cpu")
    base = np.asarray(generate(pipe, ["a red circle on a sks background"], steps=6)[0], dtype=float)
    meta = load_adapter(pipe, result.adapter_dir)
    tuned = np.asarray(generate(pipe, ["a red circle on a sks background"], steps=6)[0], dtype=float)
    assert meta.trigger == "sks" and np.abs(tuned - base).mean() > 0.5
    assert meta.base_model == "models/toy-sd"  # portable: the project-relative folder, not this machine's path

    client = MlflowClient(mlflow_server)
    mlrun = client.get_run(result.run_id)
    assert mlrun.info.status == "FINISHED"
    assert _history(client, result.run_id, "loss") == [1, 2, 3, 4]
    assert _history(client, result.run_id, "val_loss") == [0, 1, 2, 3, 4]  # 0 = the base model
    val = {m.step: m.value for m in client.get_metric_history(result.run_id, "val_loss")}
    assert val[4] < val[0]  # the held-out images show the concept: learning it lowers their loss
    assert {"images_per_s", "epoch_time_s", "lr"} <= set(mlrun.data.metrics)
    assert mlrun.data.params["ray.num_workers"] == "2" and mlrun.data.params["lora.rank"] == "8"
    assert mlrun.data.tags["dataset_hash"] == meta.dataset_hash
    assert mlrun.data.tags["adapter_sha256"] == meta.sha256
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "adapter")}
    assert artifacts == {"adapter/pytorch_lora_weights.safetensors", "adapter/lorafleet_adapter.json"}
    grids = {a.path for a in client.list_artifacts(result.run_id, "samples")}
    assert grids == {f"samples/epoch_{e:04d}.png" for e in (0, 2, 4)}
    # each grid's adapter is logged beside it, so a checkpoint picked by eye can be promoted
    picked = {a.path for a in client.list_artifacts(result.run_id, "checkpoints")}
    assert picked == {f"checkpoints/epoch_{e:04d}" for e in (2, 4)}
    logged = client.download_artifacts(result.run_id, "checkpoints/epoch_0002/adapter", str(tmp_path / "picked"))
    assert verify_adapter(logged).training["epoch"] == 2


def _train_workers() -> list[psutil.Process]:
    me = psutil.Process()
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "RayTrainWorker" in cmd and proc.pid != me.pid:
            found.append(proc)
    return found


def test_killed_worker_resumes_from_the_last_checkpoint(local_ray, train_config, mlflow_server):
    cfg = train_config(
        **{
            "train.epochs": 15,
            "train.batch_size": 1,  # 8 steps per epoch: slow enough to be killed mid-run
            "ray.checkpoint_every_n_epochs": 3,
            "ray.max_failures": 1,
            "mlflow.enabled": True,
            "mlflow.tracking_uri": mlflow_server,
            "mlflow.experiment": "test-ray-kill",
            "mlflow.system_metrics": False,
        }
    )
    run_dir = Path(cfg.output_dir) / "ray" / cfg.run_name
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", run(cfg)), daemon=True)
    thread.start()
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 240
    # kill once Ray's controller has registered a checkpoint (a checkpoint still uploading is not resumable)
    while not (snapshot.exists() and json.loads(snapshot.read_text()).get("latest_checkpoint_result")):
        assert time.monotonic() < deadline and thread.is_alive(), "no checkpoint was registered"
        time.sleep(0.05)
    assert (run_dir / "epoch_0003").is_dir()
    workers = _train_workers()
    assert workers, "no Ray Train worker process found"
    killed_at = time.monotonic()
    for proc in workers:
        os.kill(proc.pid, signal.SIGKILL)
    thread.join(timeout=300)
    client = MlflowClient(mlflow_server)
    assert not thread.is_alive() and "result" in outcome
    result = outcome["result"]
    assert result.metrics["epoch"] == 15 and result.metrics["step"] == 120

    steps = _history(client, result.run_id, "loss")
    redone = len(steps) - len(set(steps))
    assert set(steps) == set(range(1, 16))
    assert steps.count(1) == 1, "restarted from scratch instead of the checkpoint"
    assert 0 <= redone <= cfg.ray.checkpoint_every_n_epochs, (redone, killed_at)
    assert verify_adapter(result.adapter_dir).training["step"] == 120
    print(f"worker killed; epochs redone: {redone} (checkpoint every 3); kill→done {time.monotonic() - killed_at:.1f}s")


_LISTENERS = """
import ipaddress, time, psutil, ray
from training.ray_train import init_ray  # imports ray before init_ray sets anything: the real entry-point order
init_ray()
time.sleep(3)
def loopback(ip):
    addr = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback
mine = {p.pid for p in psutil.Process().children(recursive=True)} | {psutil.Process().pid}
found = [c for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.pid in mine]
bad = sorted({f"{c.laddr.ip}:{c.laddr.port}" for c in found if not loopback(c.laddr.ip)})
ray.shutdown()
print("LISTENING", len(found), "NON_LOOPBACK", bad)
"""


def test_a_local_ray_from_the_entry_points_listens_on_loopback_only(repo):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    out = subprocess.run(
        [sys.executable, "-c", _LISTENERS], cwd=repo, env=env, capture_output=True, text=True, timeout=180
    )
    assert "NON_LOOPBACK []" in out.stdout and "LISTENING 0 " not in out.stdout, out.stdout + out.stderr[-2000:]


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs: room for one toy checkpoint (1.2 MB), not two. Needs root (CI and these machines are)."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_stops_with_the_path_and_keeps_earlier_checkpoints(local_ray, train_config, small_disk):
    cfg = train_config(
        **{
            "train.epochs": 3,
            "ray.checkpoint_every_n_epochs": 1,
            "ray.num_to_keep": 2,
            "ray.max_failures": 0,
            "ray.storage_path": str(small_disk),
        }
    )
    run_dir = small_disk / cfg.run_name
    with pytest.raises(CheckpointWriteError) as info:
        run(cfg)
    message = str(info.value)
    assert str(run_dir) in message and "no space left" in message and "--resume" in message
    complete = complete_checkpoints(run_dir)
    assert [p.name for p in complete] == ["epoch_0001"] and "epoch_0001" in message
    assert verify_adapter(complete[0] / "adapter").training["epoch"] == 1

    # room again (the tmpfs grows): --resume continues from epoch 1, not from scratch
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    result = run(cfg, resume=True)
    assert result.metrics["epoch"] == 3
    assert [h["epoch"] for h in result.history] == [2, 3]


def test_an_unwritable_storage_path_is_refused_before_ray_starts(train_config, small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    cfg = train_config(**{"ray.storage_path": str(small_disk / "ckpt")})
    with pytest.raises(
        PreflightError, match=r"cannot be written to .*ckpt/lora: Read-only file system.*ray.storage_path"
    ):
        run(cfg)


def test_training_goes_on_while_mlflow_is_down_and_the_run_is_complete_afterwards(
    local_ray, train_config, tmp_path, caplog
):
    from training.mlflow_server import start_mlflow_server

    state = tmp_path / "mlflow-state"
    server = start_mlflow_server(state)
    port = int(server.uri.rsplit(":", 1)[1])
    epochs = 16
    cfg = train_config(
        **{
            "train.epochs": epochs,
            "train.batch_size": 1,
            "ray.checkpoint_every_n_epochs": 1,
            "mlflow.enabled": True,
            "mlflow.tracking_uri": server.uri,
            "mlflow.experiment": "test-mlflow-outage",
            "mlflow.system_metrics": False,
            "validation.every_n_epochs": 2,
        }
    )
    run_dir = Path(cfg.storage_path) / cfg.run_name
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", run(cfg)), daemon=True)
    thread.start()
    client = MlflowClient(server.uri)
    deadline = time.monotonic() + 240
    while not (run_dir / "epoch_0002").is_dir():
        assert time.monotonic() < deadline and thread.is_alive(), "training did not reach epoch 2"
        time.sleep(0.1)
    server.stop()  # the server goes away for as long as training needs for two more epochs
    down_at = time.monotonic()

    def latest() -> int:  # older checkpoint folders are pruned (num_to_keep): read the newest epoch number
        return max(int(p.name.split("_")[1]) for p in run_dir.glob("epoch_*"))

    start = latest()
    while latest() < start + 4:
        assert time.monotonic() < deadline and thread.is_alive(), "training stalled while MLflow was down"
        time.sleep(0.1)
    server = start_mlflow_server(state, port=port)  # back, same store, same address
    outage = time.monotonic() - down_at
    try:
        thread.join(timeout=300)
        assert not thread.is_alive() and "result" in outcome, "training did not finish"
        result = outcome["result"]
        assert result.metrics["epoch"] == epochs
        run_info = client.get_run(result.run_id)
        assert run_info.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(result.run_id, "loss")) == list(range(1, epochs + 1))
        assert "adapter_sha256" in run_info.data.tags
        tags = run_info.data.tags  # images are not kept: the run says which (rank 0's gap tag, and the driver's)
        gaps = [tags.get(k, "") for k in ("lorafleet.mlflow_gap.rank0", "lorafleet.mlflow_gap")]
        gap = "; ".join(g for g in gaps if g)
        missing = [n for g in gaps if g for n in g.removeprefix("not logged: ").split(", ")]
        assert all(name.startswith(("samples/epoch_", "checkpoints/epoch_")) for name in missing), gap
        print(f"MLflow down {outage:.1f} s over epochs {start + 1}..{start + 4}; every epoch's loss in the run; {gap}")
    finally:
        server.stop()


def test_two_workers_train_the_tiny_sdxl_and_plain_sdxl_loads_the_adapter(local_ray, train_config, tiny_sdxl_dir):
    """SDXL through Ray Train: 2 DDP workers (UNet and text_encoder_2 LoRA wrapped; the tiny first encoder's only
    layer cannot reach the UNet), held-out loss with center-crop time ids, a validation grid, and an adapter that a
    plain ``StableDiffusionXLPipeline.load_lora_weights`` reads."""
    from diffusers import StableDiffusionXLPipeline

    cfg = train_config(
        **{
            "base_model": str(tiny_sdxl_dir),
            "ray.num_workers": 2,
            "train.epochs": 2,
            "train.batch_size": 2,
            "lora.text_encoder": True,
            "validation.holdout": 2,
            "validation.prompts": "[a red circle on a sks background]",
            "validation.steps": 2,
        }
    )
    result = run(cfg)
    assert result.metrics["epoch"] == 2 and np.isfinite(result.metrics["loss"])  # 6 images / 2 ranks / batch 2
    assert all(np.isfinite(h["val_loss"]) for h in result.history)
    meta = verify_adapter(result.adapter_dir)
    assert meta.text_encoder and meta.base_model == str(tiny_sdxl_dir)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    base = np.asarray(generate(pipe, ["a red circle on a sks background"], steps=3)[0], dtype=float)
    pipe.load_lora_weights(result.adapter_dir, weight_name=meta.weights)
    assert {"unet", "text_encoder_2"} <= set(pipe.get_list_adapters())
    tuned = np.asarray(generate(pipe, ["a red circle on a sks background"], steps=3)[0], dtype=float)
    assert np.abs(tuned - base).mean() > 0  # the trained adapter changes the image
