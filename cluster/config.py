"""Typed schema of the end-to-end pipeline job (values live in ``configs/pipeline.yaml``).

Each stage points at the config file its own module reads (tune, evaluation, serve) plus dotted overrides,
so ``python -m tuning.tune --config configs/tune.yaml`` and the pipeline's tune stage run the same search.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from training.config import _Section

STAGES = ("validate", "tune", "evaluate", "gate", "register", "deploy", "smoke")


class StageArgs(_Section):
    config: str = Field(..., description="the stage's own config file")
    overrides: list[str] = Field(default_factory=list, description="dotted overrides for it")


class EvalStage(StageArgs):
    candidates: int = Field(
        2, ge=1, description="while the gate refuses the best trial's adapter, evaluate the next-best (this many)"
    )


class ServeStage(_Section):
    enabled: bool = Field(True, description="deploy (or refresh) the Serve application and smoke-test it")
    config: str = Field("configs/serve.yaml", description="the Serve config file (its first application)")
    overrides: list[str] = Field(default_factory=list, description="dotted overrides of the application args")
    app_name: str = Field("lorafleet", description="Serve application name")
    route_prefix: str = Field("/", description="where the application is mounted")
    port: int | None = Field(None, ge=1, le=65535, description="HTTP port; null = the config's http_options.port")
    smoke_prompt: str = Field(
        "a red circle on a sks background", min_length=1, description="the smoke test's prompt (to the champion)"
    )


class MlflowStage(_Section):
    tracking_uri: str | None = Field(None, description="tracking server URL; null = $MLFLOW_TRACKING_URI")
    experiment: str | None = Field(None, description="the pipeline run's experiment; null = the search's")


class StorageArgs(_Section):
    shared: bool = Field(
        False, description="output_dir is the same shared mount (NFS/EFS/Filestore) on every node of the cluster"
    )


class PipelineConfig(_Section):
    name: str = Field("toy-sks", description="the pipeline's name: its folder under output_dir, its MLflow run")
    output_dir: str = Field("runs/pipeline", description="pipelines live in <output_dir>/<name>")
    dataset: str = Field(
        "data/toy-sks", description="training images: a folder, or an s3:// gs:// file:// URI mirrored on each node"
    )
    heldout: str | None = Field(
        "data/toy-sks/heldout", description="held-out images (val_loss, evaluation); null = the tune config's"
    )
    until: Literal[STAGES] = Field("smoke", description="the last stage to run, e.g. tune: search only")
    tune: StageArgs = Field(default_factory=lambda: StageArgs(config="configs/tune.yaml"))
    evaluation: EvalStage = Field(default_factory=lambda: EvalStage(config="configs/eval.yaml"))
    serve: ServeStage = Field(default_factory=ServeStage)
    mlflow: MlflowStage = Field(default_factory=MlflowStage)
    storage: StorageArgs = Field(default_factory=StorageArgs)
