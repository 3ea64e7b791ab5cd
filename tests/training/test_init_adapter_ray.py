"""A real continued run (Ray Train, MLflow over HTTP, the toy dataset): the second run's held-out loss before its
first step equals the first run's loss at its end — it starts from the earlier adapter, not from the base model."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from training.adapter import verify_adapter
from training.train import run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def test_a_continued_run_starts_at_the_earlier_adapters_loss(local_ray, train_config, toy_dataset, mlflow_server):
    common = {"lora.rank": 4, "lora.alpha": 4, "train.lr": 5e-3, "mlflow.enabled": True,
              "mlflow.tracking_uri": mlflow_server, "mlflow.experiment": "test-continue",
              "validation.data_path": str(toy_dataset / "heldout")}  # fmt: skip
    first = run(train_config(**common, **{"train.epochs": 2, "run_name": "first"}))
    earlier = verify_adapter(first.adapter_dir)
    then = {"train.epochs": 1, "run_name": "second", "lora.init_adapter": first.adapter_dir}
    second = run(train_config(**common, **then))

    client = MlflowClient(mlflow_server)
    before = {m.step: m.value for m in client.get_metric_history(first.run_id, "val_loss")}
    after = {m.step: m.value for m in client.get_metric_history(second.run_id, "val_loss")}
    assert after[0] == pytest.approx(before[2], rel=1e-5)  # the continued run starts where the first ended
    assert abs(before[2] - before[0]) > 1e-3  # which is not the base model's loss: the check can fail
    assert verify_adapter(second.adapter_dir).sha256 != earlier.sha256  # and it trained on
