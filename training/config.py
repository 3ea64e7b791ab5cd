"""Typed schemas for LoRA fine-tuning (values live in `configs/train.yaml`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# files read as images (case-insensitive); what each mode becomes: training/images.py. HEIC/HEIF are listed so
# that they are named and refused with the conversion to make, not skipped as "not an image"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif", ".heic", ".heif")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "sgd")
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


class PreflightError(ValueError):
    """A config that validates but cannot run here (e.g. a GPU-only option on CPU); raised before any work."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    path: str = Field(
        ...,
        description="dataset folder: images + metadata.jsonl, images + .txt captions (sub-folders too), or kohya's "
        "<repeats>_<name> folders",
    )
    format: Literal["auto", "metadata", "kohya", "sidecar", "dreambooth"] = Field(
        "auto",
        description="auto: metadata.jsonl if present, else kohya if a sub-folder is named <repeats>_<name> "
        "(e.g. '10_sks dog'), else caption files next to the images, else dreambooth (needs instance_prompt)",
    )
    caption_column: str = Field(
        "text", min_length=1, description="metadata.jsonl key holding the caption (diffusers' --caption_column)"
    )
    image_column: str = Field(
        "file_name",
        min_length=1,
        description="metadata.jsonl key naming the image, relative to data.path (diffusers' --image_column)",
    )
    caption_extension: str = Field(
        ".txt",
        pattern=r"^\.[^./\\]+$",
        description="extension of caption files next to the images, matched in any letter case (kohya's "
        "--caption_extension; e.g. '.caption')",
    )
    instance_prompt: str | None = Field(
        None, description="DreamBooth: one caption for every image, e.g. 'a photo of sks dog'"
    )
    trigger: str | None = Field(None, description="trigger word; DreamBooth captions must contain it")
    class_data_dir: str | None = Field(
        None,
        description="DreamBooth prior preservation (diffusers' --class_data_dir, kohya's reg_data_dir): a folder of "
        "class (regularisation) images of the concept's class without the trigger, in any layout data.path takes; "
        "they train with weight train.prior_loss_weight and are balanced to the instance images × repeats per epoch "
        "(kohya). lorafleet does not generate them: render them with the base model first",
    )
    class_prompt: str | None = Field(
        None,
        description="caption of every class image when data.class_data_dir has no captions (diffusers' "
        "--class_prompt), e.g. 'a photo of a dog'; must not contain the trigger",
    )
    resolution: int = Field(
        64,
        ge=8,
        description="training size in pixels (toy world 64, SD 1.x 512, SDXL 1024): with buckets every bucket's "
        "area is at most resolution² (the square bucket's side); without, the side of the square crop. Not set: "
        "training uses the base model's native size (UNet sample_size × VAE factor, else the family's default)",
    )
    buckets: bool = Field(
        True,
        description="aspect-ratio bucketing: each image is resized to cover the bucket (w, h) nearest its aspect "
        "ratio and cropped to it, batches hold one bucket; false = resize the short side and crop a square",
    )
    bucket_step: int | None = Field(
        None,
        ge=1,
        description="bucket sides are multiples of this many pixels; null = the base model's granularity "
        "(VAE factor × 2^(UNet down blocks − 1): toy-sd 16, SD 1.x 64); `lorafleet validate`, having no model, "
        "guesses from the resolution (16 at 64 px, 64 from 256 px)",
    )
    max_aspect: float = Field(
        2.0,
        ge=1.0,
        le=8.0,
        description="buckets range from 1:max_aspect (portrait) to max_aspect:1 (landscape); at most 8",
    )
    crop: Literal["center", "random"] = Field(
        "center",
        description="crop to the bucket (or square) after resizing to cover it; 'random' disables the latent cache",
    )
    random_flip: bool = Field(False, description="flip images horizontally at random (both flips are cached)")
    background: str = Field(
        "white",
        description="colour transparent pixels (RGBA, LA, palette or tRNS transparency) are composited on: a Pillow "
        "colour name or hex, e.g. 'white', 'black', '#7f7f7f'",
    )
    min_images: int = Field(4, ge=1, description="fewer valid images than this is an error")
    max_images: int | None = Field(None, ge=1, description="use only the first N images (sorted by name)")
    max_pixels: int = Field(4096 * 4096, ge=64 * 64, description="larger images are refused as decompression bombs")

    @field_validator("background", mode="before")
    @classmethod
    def _known_colour(cls, value: Any) -> str:
        from training.images import parse_colour

        if value is None:  # `background: #7f7f7f` unquoted: YAML reads a comment, i.e. null
            raise ValueError("no colour given; quote a hex colour (YAML reads # as a comment): '#7f7f7f'")
        if not isinstance(value, str):
            raise ValueError(f"{value!r} is not a colour; write a name (white, black) or a quoted hex '#7f7f7f'")
        parse_colour(value)  # raises ValueError naming the value and what to write
        return value

    @field_validator("caption_extension")
    @classmethod
    def _not_an_image_extension(cls, value: str) -> str:
        if value.lower() in IMAGE_EXTENSIONS:
            raise ValueError(f"{value!r} is an image extension; caption files are text, e.g. '.txt' or '.caption'")
        return value

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        """``background`` as (r, g, b), 0..255."""
        from training.images import parse_colour

        return parse_colour(self.background)

    @model_validator(mode="after")
    def _bucket_fits(self) -> DataConfig:
        if self.buckets and self.bucket_step and self.resolution < self.bucket_step:
            raise ValueError(
                f"data.resolution={self.resolution} is below data.bucket_step={self.bucket_step}: no bucket fits; "
                "raise data.resolution or lower data.bucket_step"
            )
        return self


class LoraArgs(_Section):
    rank: int = Field(8, ge=1, le=256, description="LoRA rank r; each adapted projection gains r·(d_in+d_out) params")
    alpha: float | None = Field(None, gt=0, description="scale numerator (scale = alpha / rank); defaults to rank")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA branch input")
    target_modules: list[str] = Field(
        ["to_q", "to_k", "to_v", "to_out.0"], min_length=1, description="UNet attention projections to adapt"
    )
    text_encoder: bool = Field(False, description="also train a LoRA on the text encoder (disables the text cache)")
    text_encoder_target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "out_proj"], description="text-encoder projections adapted when enabled"
    )
    init_adapter: str | None = Field(
        None,
        description="continue training this adapter folder (lorafleet_adapter.json + safetensors): the LoRA starts "
        "from its weights (optimizer and schedule start fresh); rank, alpha, target_modules, text_encoder and "
        "base_model must match it (training/init_adapter.py); null = a new LoRA (B zero-initialised)",
    )


class OptimArgs(_Section):
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "sgd"] = Field(
        "adamw", description="adamw | adamw8bit (bitsandbytes, CUDA only) | prodigy (lr ~1.0) | sgd (momentum 0.9)"
    )
    lr: float = Field(1e-3, gt=0, description="peak learning rate (use ~1.0 with prodigy)")
    weight_decay: float = Field(1e-2, ge=0, description="decoupled weight decay")
    d_coef: float = Field(1.0, gt=0, description="prodigy only: scales its adaptive step size estimate")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = Field("constant_with_warmup", description="diffusers.optimization.get_scheduler name")
    warmup_steps: int = Field(10, ge=0, description="optimizer steps of linear warmup")
    epochs: int = Field(10, ge=1, description="passes over the dataset")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (overrides epochs)")
    batch_size: int = Field(4, ge=1, description="images per worker per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the LoRA gradient norm; null disables")
    gradient_checkpointing: bool = Field(False, description="recompute UNet activations in backward (saves memory)")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto",
        description="auto: bf16 on CUDA GPUs with native bf16 (Ampere+), else fp16; fp32 off CUDA. fp16/bf16 need "
        "the worker on a CUDA device; fp16 trains with loss scaling (torch.amp.GradScaler) and keeps the VAE in "
        "fp32 when its config says force_upcast. Rules: training/precision.py",
    )
    allow_tf32: bool = Field(
        True,
        description="on CUDA (Ampere+), fp32 matmuls use TensorFloat-32 (torch.set_float32_matmul_precision('high'); "
        "diffusers' --allow_tf32); false = full IEEE fp32. Matters most with mixed_precision=no",
    )
    snr_gamma: float | None = Field(5.0, gt=0, description="min-SNR loss weighting gamma; null = plain MSE")
    noise_offset: float = Field(0.0, ge=0, description="add this much per-channel offset noise (0 disables)")
    with_prior_preservation: bool | None = Field(
        None,
        description="train on data.class_data_dir's class images too (diffusers' --with_prior_preservation); "
        "null = on exactly when data.class_data_dir is set (kohya's reg_data_dir); true needs data.class_data_dir; "
        "false ignores it",
    )
    prior_loss_weight: float = Field(
        1.0,
        ge=0,
        description="loss weight of class images (diffusers' and kohya's --prior_loss_weight); instance images "
        "weigh 1; 0 = class images are seen but give no gradient",
    )
    cache_latents: bool | None = Field(
        None, description="encode images/captions once before training; null = on unless data.crop=random"
    )
    seed: int = Field(0, description="seeds shuffling, noise and timesteps; one worker is reproducible")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: object) -> object:
        return "no" if value is False else value  # YAML reads a bare `no` as false


class ValidationArgs(_Section):
    prompts: list[str] = Field(
        default_factory=list,
        description="prompts of the sample grid (MLflow: samples/epoch_NNNN.png); empty disables",
    )
    every_n_epochs: int = Field(5, ge=1, description="render the grid every N epochs (and after the last)")
    log_adapters: bool = Field(
        True,
        description="log each grid's epoch adapter too (MLflow: checkpoints/epoch_NNNN/adapter), so a checkpoint "
        "picked by eye can be promoted: `lorafleet promote <model> --trial <id> --epoch N`",
    )
    steps: int = Field(20, ge=1, description="denoising steps per validation image")
    guidance: float = Field(4.0, ge=1.0, description="classifier-free guidance scale")
    seed: int = Field(0, description="image i uses seed + i, so grids compare across epochs; also seeds val_loss")
    data_path: str | None = Field(
        None, description="held-out images (same layout as data.path) scored every epoch as val_loss"
    )
    holdout: int = Field(
        0, ge=0, description="or: take this many images (evenly spaced) out of data.path for val_loss; 0 = none"
    )
    loss_timesteps: int = Field(8, ge=1, le=1000, description="noise levels per held-out image in val_loss")


class RayArgs(_Section):
    num_workers: int = Field(1, ge=1, description="data-parallel Ray Train workers (DDP)")
    use_gpu: bool = Field(False, description="one GPU per worker (nccl); false = CPU workers (gloo)")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker")
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint (-1 = forever)")
    num_to_keep: int | None = Field(2, ge=1, description="checkpoints kept in storage (null = all)")
    checkpoint_every_n_epochs: int = Field(1, ge=1, description="checkpoint cadence (the last epoch always is)")
    storage_path: str | None = Field(None, description="Ray Train storage (shared FS or s3://); default output_dir")


class MlflowArgs(_Section):
    enabled: bool = Field(True, description="log params, metrics, grids and the adapter to MLflow")
    tracking_uri: str | None = Field(None, description="tracking server URL; null = $MLFLOW_TRACKING_URI")
    experiment: str = Field("lorafleet-train", description="experiment name (created if missing)")
    run_id: str | None = Field(None, description="log into this existing run (set by tuning/pipeline drivers)")
    parent_run_id: str | None = Field(None, description="make the new run a child of this run")
    run_name: str | None = Field(None, description="MLflow run name; null = run_name")
    system_metrics: bool = Field(True, description="sample CPU/memory/GPU into the run while training")


class TrainConfig(_Section):
    base_model: str = Field(
        "models/toy-sd",
        description="diffusers pipeline folder or hub id (frozen): SD 1.x/2.x or SDXL, detected from its "
        "model_index.json (training.families)",
    )
    pretrained_vae_model_name_or_path: str | None = Field(
        None,
        description="a VAE folder or hub id used instead of the base model's own (diffusers' name), e.g. "
        "madebyollin/sdxl-vae-fp16-fix: SDXL's own VAE overflows in fp16 and is kept in fp32 under mixed precision; "
        "a VAE whose config says force_upcast=false runs in fp16/bf16",
    )
    output_dir: str = Field("runs/train", description="where the final adapter and run files go")
    run_name: str = Field("lora", description="Ray Train / MLflow run name (no timestamps: names must be stable)")
    data: DataConfig
    lora: LoraArgs = Field(default_factory=LoraArgs)
    train: OptimArgs = Field(default_factory=OptimArgs)
    validation: ValidationArgs = Field(default_factory=ValidationArgs)
    ray: RayArgs = Field(default_factory=RayArgs)
    mlflow: MlflowArgs = Field(default_factory=MlflowArgs)

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if problems := self.config_problems(self.model_dump()):
            raise ValueError("; ".join(problems))
        return self

    @classmethod
    def combination_problems(cls, values: dict[str, Any]) -> list[str]:
        """Everything the Ray entry points (``training.train``, tuning) refuse before they start: ``config_problems``
        plus ``ray_problems``. When a field also fails, ``load_config`` lists them with the field errors, all at once;
        a config whose fields all validate is checked by the entry points' preflights (``training.train``,
        ``tuning.tune``), since the Ray-free worker accepts what its device runs."""
        return cls.config_problems(values) + cls.ray_problems(values)

    @staticmethod
    def _getter(values: dict[str, Any]) -> Any:
        def get(key: str, default: Any) -> Any:
            node: Any = values
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    return default
                node = node[part]
            return node

        return get

    @classmethod
    def ray_problems(cls, values: dict[str, Any], prefix: str = "") -> list[str]:
        """Choices the Ray Train path cannot run because ``ray.use_gpu=false`` starts CPU workers. Not part of the
        model's validation: the Ray-free worker (``training.worker.run_worker``) never reads the ``ray`` section;
        its device decides (``training.precision.resolve_precision``). ``prefix`` names where the section sits
        (``"trial."`` in a search config)."""
        get = cls._getter(values)
        choice = get("train.mixed_precision", "auto")
        if choice in ("fp16", "bf16") and get("ray.use_gpu", False) is not True:
            return [
                f"{prefix}train.mixed_precision: {choice} needs GPU workers; set {prefix}ray.use_gpu=true "
                f"or {prefix}train.mixed_precision=auto (fp32 on CPU)"
            ]
        return []

    @classmethod
    def config_problems(cls, values: dict[str, Any]) -> list[str]:
        """Values that are each valid but do not work together, read from the raw mapping (so they are
        reported alongside field errors, all at once). Defaults fill what is missing."""
        get = cls._getter(values)
        problems = []
        gpu = get("ray.use_gpu", False) is True
        if get("train.optimizer", "adamw") == "adamw8bit" and not gpu:
            problems.append(
                "train.optimizer: 'adamw8bit' needs a CUDA GPU (bitsandbytes); on CPU use 'adamw' or 'prodigy', "
                "or set ray.use_gpu=true on a GPU cluster"
            )
        if get("data.class_prompt", None) and not get("data.class_data_dir", None):
            problems.append(
                "data.class_prompt is set but data.class_data_dir is not: set the folder of class images "
                "(prior preservation) or drop data.class_prompt"
            )
        if get("validation.data_path", None) and get("validation.holdout", 0):
            problems.append(
                "validation.data_path and validation.holdout are alternatives; set one (holdout=0 with a data_path)"
            )
        if get("train.cache_latents", None) is True and get("data.crop", "center") == "random":
            problems.append(
                "train.cache_latents=true cannot be combined with data.crop=random (each step needs a new crop); "
                "set train.cache_latents=null/false or data.crop=center"
            )
        prior = get("train.with_prior_preservation", None)
        if prior is True and not get("data.class_data_dir", None):
            problems.append(
                "train.with_prior_preservation=true needs class images: set data.class_data_dir to a folder of "
                "images of the class (and data.class_prompt unless they have captions), or drop it"
            )
        return problems

    @property
    def prior_preservation(self) -> bool:
        """Whether class images train (``train.with_prior_preservation``, null = when data.class_data_dir is set)."""
        wanted = self.train.with_prior_preservation
        return bool(self.data.class_data_dir) if wanted is None else wanted

    @property
    def storage_path(self) -> str:
        """Where Ray Train keeps checkpoints: ``ray.storage_path`` (shared FS / s3://) or ``<output_dir>/ray``."""
        if self.ray.storage_path:
            return self.ray.storage_path
        return str((Path(self.output_dir).expanduser() / "ray").resolve())

    @property
    def has_heldout(self) -> bool:
        """Whether workers report ``val_loss`` (held-out images are configured)."""
        return bool(self.validation.data_path or self.validation.holdout)

    @property
    def use_cache(self) -> bool:
        """Whether latents are encoded once (text embeddings are cached unless the text encoder trains)."""
        return self.train.cache_latents if self.train.cache_latents is not None else self.data.crop != "random"
