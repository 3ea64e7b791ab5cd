"""Typed schema of the end-to-end pipeline job (values live in ``configs/pipeline.yaml``).

Each stage points at the config file its own module reads (tune, evaluation, serve) plus dotted overrides,
so ``python -m tuning.tune --config configs/tune.yaml`` and the pipeline's tune stage run the same search.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from training.config import _Section
from training.configuration import MERGE

STAGES = ("validate", "tune", "evaluate", "gate", "register", "deploy", "smoke")


class StageArgs(_Section):
    config: str = Field(..., description="the stage's own config file")
    overrides: list[str] = Field(
        default_factory=list,
        description="dotted overrides for it; on the command line a list is added to these (later ones win), "
        "`[]` clears them",
        json_schema_extra=MERGE,
    )


class EvalStage(StageArgs):
    candidates: int = Field(
        2, ge=1, description="while the gate refuses the best trial's adapter, evaluate the next-best (this many)"
    )


class ServeStage(_Section):
    enabled: bool = Field(True, description="deploy (or refresh) the Serve application and smoke-test it")
    config: str = Field("configs/serve.yaml", description="the Serve config file (its first application)")
    overrides: list[str] = Field(
        default_factory=list,
        description="dotted overrides of the application args; on the command line a list is added to these, "
        "`[]` clears them",
        json_schema_extra=MERGE,
    )
    app_name: str = Field("lorafleet", description="Serve application name")
    route_prefix: str = Field("/", description="where the application is mounted")
    port: int | None = Field(None, ge=1, le=65535, description="HTTP port; null = the config's http_options.port")
    smoke_prompt: str | None = Field(
        None, min_length=1, description="the smoke test's prompt; null = the first trigger prompt of the suite"
    )


class MlflowStage(_Section):
    tracking_uri: str | None = Field(None, description="tracking server URL; null = $MLFLOW_TRACKING_URI")
    experiment: str | None = Field(None, description="the pipeline run's experiment; null = the search's")


class SampleArgs(_Section):
    """Sample grids while the trials train, for a user to pick a checkpoint by eye (``lorafleet promote``)."""

    prompts: int = Field(
        6, ge=0, le=16, description="trigger prompts of the dataset's suite per grid (held-out captions); 0 = none"
    )
    every_n_epochs: int = Field(
        4, ge=1, description="a grid (and that epoch's adapter) goes to each trial's MLflow run every N epochs"
    )
    steps: int = Field(20, ge=1, le=200, description="denoising steps per sample image")


class StorageArgs(_Section):
    shared: bool = Field(
        False, description="output_dir is the same shared mount (NFS/EFS/Filestore) on every node of the cluster"
    )


class CaptionStage(_Section):
    """Captioning before validation (``training.captioning``) of the dataset's images that have no caption."""

    enabled: bool = Field(
        False,
        description="caption the dataset's images that lack a caption, in the dataset folder, before validate (a "
        "local folder only; needs trigger=); a fine-tuning job on an upload without captions sets it",
    )
    captioner: Literal["auto", "toy", "blip"] = Field(
        "auto",
        description="auto: toy when the tune config's trial.base_model is a toy-world model, else blip (a hub "
        "captioning model); see caption.captioner of `lorafleet caption`",
    )
    model: str | None = Field(
        None, description="toy: the CLIP scorer folder; blip: hub id or folder in BLIP's layout; null = default"
    )
    template: str | None = Field(
        None, description="how caption and trigger combine, e.g. '{trigger}, {caption}'; null = the captioner's own"
    )
    batch_size: int = Field(16, ge=1, le=1024, description="images per forward pass")
    max_new_tokens: int = Field(30, ge=1, le=512, description="blip: longest caption in tokens")
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="blip weights: auto = bf16/fp16 on CUDA, fp32 on CPU; half precision needs CUDA"
    )


class PipelineConfig(_Section):
    name: str | None = Field(
        None,
        description="the pipeline's name: its folder under output_dir, its MLflow experiment (lorafleet-<name>) and "
        "runs, its registered model (<name>-lora); null = the dataset's folder name",
    )
    output_dir: str = Field("runs/pipeline", description="pipelines live in <output_dir>/<name>")
    dataset: str = Field(
        "data/toy-sks", description="training images: a folder, or an s3:// gs:// file:// URI mirrored on each node"
    )
    heldout: str | None = Field(
        None,
        description="held-out images (val_loss, evaluation); null = <dataset>/heldout when it exists, else "
        "holdout images taken out of the dataset",
    )
    holdout: int = Field(
        2, ge=1, description="without a held-out folder: this many images (evenly spaced) are held out of the dataset"
    )
    trigger: str | None = Field(
        None,
        description="the trigger word; null = detected from the captions (the word in every caption that the base "
        "model's tokenizer knows least); the choice and its evidence are logged",
    )
    caption: CaptionStage = Field(default_factory=CaptionStage)
    samples: SampleArgs = Field(default_factory=SampleArgs)
    until: Literal[STAGES] = Field("smoke", description="the last stage to run, e.g. tune: search only")
    tune: StageArgs = Field(default_factory=lambda: StageArgs(config="configs/tune.yaml"))
    evaluation: EvalStage = Field(default_factory=lambda: EvalStage(config="configs/eval.yaml"))
    serve: ServeStage = Field(default_factory=ServeStage)
    mlflow: MlflowStage = Field(default_factory=MlflowStage)
    storage: StorageArgs = Field(default_factory=StorageArgs)
