"""Typed schema of the serving app (values live in `configs/serve.yaml` under ``applications[0].args``).

``serve run configs/serve.yaml`` hands the ``args`` mapping to ``serving.app:build_app``, which Ray validates
against ``ServeArgs``; ``load_serve_args`` reads the same mapping for tests, benchmarks and the CLI.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from serving.records import RecordsArgs
from training.config import _Section

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BASE = "base"  # the model name of the bare base model
# what a client may write as `model`: a configured name, or <registered model>@<alias> / <registered model>/<version>
MODEL_NAME = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(@[A-Za-z0-9][A-Za-z0-9_-]{0,63}|/[0-9]{1,9})?\Z"
)  # \Z, not $: no trailing newline


# a tenant's name: lower-case words joined by single '-' or '_', so '<tenant>--<name>' splits at its first '--'
TENANT_NAME = re.compile(r"^[a-z0-9]+(?:[_-][a-z0-9]+)*\Z")
TENANT_MAX = 32  # characters: leaves 30 of MODEL_NAME's 64 for the model's own name


def is_folder_ref(ref: str) -> bool:
    """An adapter reference that names a local folder (not runs:/, models:/ or another URI)."""
    return "://" not in ref and not ref.startswith(("runs:/", "models:/"))


def project_path(path: str) -> str:
    """A relative path as it is when it exists from the working directory, else against the project root
    (Serve replicas do not share the working directory of ``serve run``); other strings (hub ids) unchanged."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or not (PROJECT_ROOT / p).exists():
        return str(p.resolve()) if p.exists() else path
    return str(PROJECT_ROOT / p)


def workdir_path(path: str) -> Path:
    """A path the server writes or an operator's CLI wrote (``files.root``, ``tenants.keys_file``) as an absolute
    path: a relative one is under ``$LORAFLEET_WORKDIR`` when set (the checkout ``lorafleet serve`` / ``submit``
    started from: a Ray job's working directory is an uploaded copy without ``runs/``), else the project root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(os.environ.get("LORAFLEET_WORKDIR") or PROJECT_ROOT) / p


class ChampionArgs(_Section):
    model: str | None = Field(
        "toy-sks-lora", description="registered model whose alias is served as `name`; null = no champion"
    )
    alias: str = Field("champion", description="registry alias to follow")
    name: str = Field("champion", description="the model name clients ask for")
    poll_s: float = Field(
        30.0, ge=0, description="seconds between registry checks for a moved alias; 0 = only POST /admin/reload"
    )


class CanaryRollbackArgs(_Section):
    """When a replica stops the challenger on its own (serving/canary.py): a 5xx spike in its recent requests."""

    window: int = Field(50, ge=1, description="the challenger's (and the champion's) last this many requests")
    min_requests: int = Field(20, ge=1, description="no stop before the window holds this many requests")
    max_error_rate: float = Field(0.2, ge=0, le=1, description="stop when the challenger's 5xx rate is above this ...")
    margin: float = Field(0.1, ge=0, le=1, description="... and above the champion's 5xx rate plus this")


class CanaryDecisionArgs(_Section):
    """The test `lorafleet canary status` states (serving/canary.py decide): Wilson intervals and p95 latency."""

    confidence: float = Field(0.95, gt=0, lt=1, description="confidence of the Wilson score intervals")
    min_requests: int = Field(100, ge=1, description="requests per arm before error rate and latency are compared")
    min_ratings: int = Field(30, ge=1, description="ratings per arm before the positive-rating rates are compared")
    latency_tolerance: float = Field(
        0.2, ge=0, description="the challenger's p95 latency may exceed the champion's by this fraction"
    )


class CanaryArgs(_Section):
    """A share of the champion's traffic for the registry's challenger alias (serving/canary.py)."""

    share: float = Field(
        0.0,
        ge=0,
        le=1,
        description="fraction of requests for the champion that go to champion.model's `alias` version while it "
        "exists (chosen by a hash of the client's X-Request-Id, so a retry lands on the same arm); 0 = no canary",
    )
    alias: str = Field("challenger", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$", description="the challenger alias")
    latency_samples: int = Field(1000, ge=10, description="latency samples kept per arm and version in a replica")
    rollback: CanaryRollbackArgs = Field(default_factory=CanaryRollbackArgs)
    decision: CanaryDecisionArgs = Field(default_factory=CanaryDecisionArgs)


class GenerationDefaults(_Section):
    steps: int = Field(20, ge=1, description="denoising steps when a request gives none")
    guidance: float = Field(4.0, ge=0, description="classifier-free guidance scale when a request gives none")
    size: int = Field(
        64,
        ge=8,
        description="image side in pixels when a request gives none (toy world 64, SD 1.x 512, SDXL 1024); a multiple "
        "of the base model's size multiple (checked when the model loads)",
    )


class RequestLimits(_Section):
    max_prompt_chars: int = Field(500, ge=1, description="longer prompts are refused (400)")
    max_n: int = Field(4, ge=1, description="images per request")
    max_steps: int = Field(50, ge=1, description="denoising steps per request")
    max_guidance: float = Field(20.0, gt=0, description="guidance scale per request")
    min_size: int = Field(
        32,
        ge=8,
        description="smallest image side in pixels (sides must also be multiples of the "
        "model's size multiple: VAE factor x 2^(UNet levels - 1), 16 on the toy model, 32 on SDXL)",
    )
    max_size: int = Field(128, ge=8, description="largest image side in pixels; bounds memory per request")
    max_body_bytes: int = Field(
        65536, ge=1024, description="larger request bodies get 413 before they are read (prompts are ≤ a few KB)"
    )


class BatchingArgs(_Section):
    max_batch_size: int = Field(8, ge=1, description="images per UNet pass (@serve.batch counts images, not requests)")
    batch_wait_timeout_s: float = Field(
        0.02, ge=0, description="how long a batch waits to fill after its first request"
    )
    max_concurrent_batches: int = Field(
        4,
        ge=1,
        description="batches @serve.batch hands over at once; the replica merges them and runs one UNet pass "
        "at a time, so batches formed during a pass join the next one instead of waiting frozen",
    )

    mixed_adapters: bool = Field(
        True, description="run requests for different adapters in one UNet pass (false: one adapter per sub-batch)"
    )


class SpeedArgs(_Section):
    """How a replica runs its passes: the speed options diffusers users expect (measured in benchmarks/)."""

    lora_batching: Literal["batched", "peft"] = Field(
        "batched",
        description="how a pass that mixes adapters applies them: batched (each sample's LoRA A/B gathered once per "
        "pass, two torch.bmm per Linear LoRA layer; other layer kinds fall back to peft) or peft (PEFT's per-adapter "
        "masked loop, for comparison). Passes with one adapter or none never route per sample",
    )
    merge_single_adapter: bool = Field(
        True,
        description="a pass whose samples all use one adapter runs on merged weights (W + scale * B A per Linear LoRA "
        "layer, computed into a copy kept for the most recent adapter; the shared base weights are never changed), so "
        "it costs what a base-only pass costs; false: PEFT's unmerged active-adapter forward. Not with compile_unet "
        "(swapping weight tensors would recompile). Extra memory: one copy of the LoRA-targeted base weights",
    )
    sdpa: bool = Field(
        True,
        description="attention through torch's scaled_dot_product_attention (diffusers' AttnProcessor2_0, its "
        "default; flash/memory-efficient kernels on CUDA); false: the classic AttnProcessor (slower, more memory)",
    )
    channels_last: bool = Field(
        False, description="UNet weights and activations in channels-last memory format (faster convolutions on CUDA)"
    )
    vae_slicing: bool = Field(
        False, description="decode a batch's latents one image at a time: lower peak memory, same images"
    )
    vae_tiling: bool = Field(
        False,
        description="decode in overlapping tiles once an image is larger than the VAE's sample_size (SD: 512 px): "
        "bounded memory for large sizes, but the tiles are decoded apart and blended, so such images differ from "
        "an untiled decode (seams; measured up to 101/255 on the toy VAE at 2x its sample_size). Smaller images are "
        "decoded whole, unchanged",
    )
    tf32: bool = Field(
        True,
        description="allow TF32 for float32 matmuls on CUDA Ampere+ (torch.set_float32_matmul_precision('high')); "
        "no effect on fp16/bf16 pipelines or older GPUs, and not applied on CPU (documented no-op there)",
    )
    compile_unet: bool = Field(
        False,
        description="torch.compile the UNet (the first passes compile: minutes at SD scale; warm-up takes them). "
        "Adapters are hot-swapped into fixed slots (diffusers' enable_lora_hotswap) so loading one does not "
        "recompile; needs batching.mixed_adapters: false (one adapter per pass)",
    )
    hotswap_max_rank: int = Field(
        64,
        ge=1,
        le=1024,
        description="with compile_unet: the highest LoRA rank a hot-swapped adapter may have (a higher one is refused "
        "with a 422). Hot-swapping takes UNet LoRA only (adapters with text-encoder LoRA are refused) and an adapter "
        "must target the modules of the slot's previous one",
    )


class ImageUrlArgs(_Section):
    """Images kept for ``response_format: "url"`` (serving/image_store.py: one store for all ingress replicas)."""

    ttl_s: float = Field(3600.0, gt=0, description="seconds a returned image URL works (OpenAI's: one hour)")
    max_images: int = Field(1000, ge=1, description="images kept at most; the oldest are dropped first")
    max_bytes: int = Field(
        256 * 2**20, ge=2**20, description="PNG bytes kept at most (the store's memory); the oldest are dropped first"
    )


class FeedbackArgs(_Section):
    """User ratings of generated images (``POST /v1/feedback``; serving/feedback.py: one store for all ingress
    replicas)."""

    enabled: bool = Field(True, description="accept ratings; false: POST /v1/feedback answers 404 and no id is kept")
    scale: Literal["thumbs", "stars"] = Field(
        "thumbs", description="thumbs: a rating is -1 or +1; stars: 1 to 5 (4 and 5 count as positive)"
    )
    root: str = Field(
        "runs/feedback",
        description="folder of the append-only logs images.jsonl and ratings.jsonl, reloaded on start; relative = "
        "under $LORAFLEET_WORKDIR when set, else the project. Shared storage on a multi-node cluster (the store's "
        "one replica may restart on another node)",
    )
    ttl_s: float = Field(
        7 * 86400.0, gt=0, description="seconds after its generation an image may still be rated (then 404)"
    )
    max_images: int = Field(
        100_000, ge=1, description="image ids remembered at most for rating; beyond it the oldest are forgotten"
    )
    max_comment_chars: int = Field(1000, ge=0, le=100_000, description="longest comment (0: comments refused)")
    max_per_minute: int = Field(
        60, ge=1, description="ratings one tenant may send per minute (over every ingress replica); more get 429"
    )
    max_pending: int = Field(
        1000,
        ge=1,
        description="new-image notices an ingress replica may have in flight to the store; more are dropped (and "
        "counted) so that feedback never slows generation",
    )


class ResponseCacheArgs(_Section):
    """Answers to repeated seeded requests, kept in each generator replica (serving/response_cache.py)."""

    enabled: bool = Field(True, description="answer a repeated request with an explicit seed from memory")
    max_entries: int = Field(1024, ge=1, description="responses kept at most per replica; least recently used go first")
    max_bytes: int = Field(
        64 * 2**20, ge=1, description="PNG bytes kept at most per replica; least recently used go first"
    )
    ttl_s: float | None = Field(
        None, gt=0, description="seconds an entry is served; null: until evicted (the key holds the model version)"
    )
    share_between_tenants: bool = Field(
        False,
        description="one tenant's entry answers another's identical request; off: a hit (and its speed) never "
        "tells a tenant what another one asked for",
    )
    http_max_age_s: int = Field(
        60,
        ge=0,
        description="Cache-Control max-age of GET /v1/generate with a seed: how long a client keeps an image of "
        "a moving name (champion) without asking again; 0: revalidate every time (ETag)",
    )


class FilesArgs(_Section):
    """Uploads of ``POST /v1/files`` (serving/uploads): where they are kept and what an archive may hold."""

    root: str = Field(
        "runs/files",
        description="folder holding one sub-folder per file (<root>/<file id>/data/ and its file.json); relative = "
        "under $LORAFLEET_WORKDIR when set, else the project. Every ingress replica and every fine-tuning job must "
        "read it: shared storage on a multi-node cluster",
    )
    max_bytes: int = Field(
        512 * 2**20,
        ge=1024,
        description="largest upload in bytes (OpenAI's file limit, 512 MB); larger ones get 413 while they stream",
    )
    max_extracted_bytes: int = Field(
        2 * 2**30, ge=1024, description="largest total of an archive's entries, counted as they are unpacked"
    )
    max_entry_bytes: int = Field(
        128 * 2**20, ge=1024, description="largest single entry, uncompressed (a 4096² 16-bit RGB TIFF is ~100 MB)"
    )
    max_entries: int = Field(10000, ge=1, description="entries (files and folders) an archive may hold")
    max_ratio: float = Field(
        100.0,
        gt=1,
        description="refuse an archive as a zip bomb past this uncompressed/compressed ratio (per zip entry; over "
        "the stream for tar), after 100 KiB (Apache POI's ZipSecureFile: 100:1)",
    )
    purposes: list[str] = Field(["fine-tune"], min_length=1, description="`purpose` values POST /v1/files accepts")
    data: dict[str, Any] = Field(
        default_factory=dict,
        description="data.* settings uploads are validated with (training.data.validate_dataset; data.path is the "
        "upload), e.g. {resolution: 512} for SD 1.x; a fine-tuning job validates again with its own",
    )

    @model_validator(mode="after")
    def _consistent(self) -> FilesArgs:
        from training.config import DataConfig

        problems = []
        if self.max_entry_bytes > self.max_extracted_bytes:
            problems.append(f"files.max_entry_bytes ({self.max_entry_bytes}) > files.max_extracted_bytes "
                            f"({self.max_extracted_bytes}); lower it")  # fmt: skip
        if "path" in self.data:
            problems.append("files.data.path: the upload's folder is the path; remove it")
        try:
            DataConfig.model_validate({**self.data, "path": "."})
        except ValueError as exc:
            problems.append(f"files.data: {exc}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class DeploymentArgs(_Section):
    num_replicas: int | Literal["auto"] = Field(1, description="generator replicas; 'auto' uses autoscaling_config")
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Ray Serve autoscaling_config passed through (min_replicas, max_replicas, ...)"
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per generator replica (torch uses this many threads)")
    num_gpus: float = Field(0.0, ge=0, description="GPU share per replica: 0, a fraction that divides 1, or whole GPUs")
    max_ongoing_requests: int = Field(32, ge=1, description="requests a replica holds at once (>= a full batch)")
    max_queued_requests: int = Field(
        32, ge=-1, description="requests waiting for a replica beyond that; more get 503 + Retry-After (-1: unbounded)"
    )
    request_timeout_s: float = Field(60.0, gt=0, description="a generation slower than this gets 504")
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with a 503")

    @field_validator("num_gpus")
    @classmethod
    def _fraction_divides_one(cls, value: float) -> float:
        if 0 < value < 1 and abs(1 / value - round(1 / value)) > 1e-6:
            raise ValueError(
                f"num_gpus {value} does not divide one GPU: use 1, 0.5, 0.25, 0.2, ... so replicas pack without "
                "leaving a stranded share (fractions are scheduling labels, not memory isolation)"
            )
        if value > 1 and value != int(value):
            raise ValueError(f"num_gpus {value}: above 1, use a whole number of GPUs")
        return value


class TenantArgs(_Section):
    """API keys of several tenants (serving/tenants.py); the ``api_key_env`` key is the default tenant's."""

    keys_file: str | None = Field(
        None,
        description="JSON keys file `lorafleet keys add TENANT` writes (each tenant's API keys as SHA-256 hashes, "
        "never the keys); once set, every request but /healthz needs a key, even while the file is missing or empty. "
        "null = no keys file",
    )
    keys_env: str | None = Field(
        "LORAFLEET_KEYS",
        description="env var that may hold a keys file's whole JSON document (e.g. from a Kubernetes Secret); "
        "unset or empty = none. Its tenants join the keys file's (a tenant in both is refused at start)",
    )
    default_tenant: str = Field(
        "default",
        description="the tenant the `api_key_env` key acts as (and every request, when no key is configured at all); "
        "an admin that sees unowned and shared adapters. A keys file may not hold a tenant of this name",
    )
    reload_s: float = Field(
        2.0, ge=0, description="seconds between checks of keys_file for changes: a revoked key stops working within it"
    )

    @field_validator("default_tenant")
    @classmethod
    def _tenant_name(cls, value: str) -> str:
        if not TENANT_NAME.match(value) or len(value) > TENANT_MAX:
            raise ValueError(
                f"{value!r}: a tenant name is lower-case letters and digits, words joined by one '-' or '_', at most "
                f"{TENANT_MAX} characters"
            )
        return value


class FineTuneArgs(_Section):
    """``/v1/fine_tuning/jobs`` (serving/finetune): what a job runs and how many run at once."""

    enabled: bool = Field(True, description="serve the fine-tuning routes and run the job queue in the ingress")
    submitter: str = Field(
        "cluster.finetune:RaySubmitter",
        description="'module:Class' that starts jobs (serving.finetune.queue.Submitter); built on the first poll, "
        "with ray_address, tracking_uri, cpus_per_job and gpus_per_job",
    )
    ray_address: str | None = Field(
        None, description="the Ray dashboard jobs are submitted to; null = $RAY_API_SERVER_ADDRESS or `lorafleet up`'s"
    )
    pipeline_config: str = Field("configs/pipeline.yaml", description="the pipeline config every job starts from")
    tune_config: str = Field(
        "configs/tune.yaml", description="its tune stage's config: the default lr, search space and known-good point"
    )
    overrides: list[str] = Field(
        default_factory=list,
        description="the operator's dotted overrides of the pipeline config for every job, after the job's own, "
        "e.g. evaluation.candidates=1 (a user cannot set these)",
    )
    max_running: int | None = Field(
        None, ge=1, description="jobs running at once; null = cluster GPUs / gpus_per_job, else CPUs / cpus_per_job"
    )
    per_tenant: int = Field(1, ge=1, description="jobs of one tenant running at once (the rest wait in the queue)")
    cpus_per_job: float = Field(2, gt=0, description="CPUs one job holds (its trials' workers + the driver)")
    gpus_per_job: float = Field(1, gt=0, description="GPUs one job holds on a GPU cluster")
    auto_trials: int = Field(4, ge=1, description="trials of a search when a hyperparameter is 'auto'")
    poll_s: float = Field(2.0, gt=0, description="seconds between the queue's polls of its jobs")


class BatchesArgs(_Section):
    """``/v1/batches`` (serving/batches): OpenAI's Batch API for image requests, run at low priority on the
    generator replicas' spare room in each UNet pass."""

    enabled: bool = Field(True, description="serve /v1/batches, accept purpose=batch uploads and run the batch runner")
    max_requests: int = Field(
        10000, ge=1, le=50000, description="request lines one batch input file may hold (OpenAI's limit: 50,000)"
    )
    max_file_bytes: int = Field(
        100 * 2**20, ge=1024, description="largest batch input file (JSONL) in bytes (OpenAI's: 200 MB)"
    )
    max_in_flight_per_replica: int = Field(
        8,
        ge=1,
        description="batch requests a generator replica holds at once, and at most half its "
        "deployment.max_ongoing_requests (at least 1); more are refused at once (429) and the runner sends them again "
        "later, so batch work never fills a replica's slots",
    )
    max_images_per_pass: int | None = Field(
        None,
        ge=1,
        description="batch images one UNet pass takes at most, after every waiting interactive request; null = all "
        "the room interactive requests leave (batching.max_batch_size). Lower it to bound how much longer a pass "
        "shared with batch images takes for the interactive requests in it",
    )
    poll_s: float = Field(1.0, gt=0, description="seconds between the runner's looks for new or cancelled batches")
    retry_s: float = Field(0.5, gt=0, description="seconds a refused (busy) batch request waits before it is resent")
    max_attempts: int = Field(
        5, ge=1, description="tries per request for retryable failures (503, a replica that went away) before it fails"
    )
    completion_window_s: float = Field(
        86400.0, gt=0, description="a batch not finished this long after creation expires (OpenAI's window: 24h)"
    )
    progress_every_s: float = Field(
        1.0, ge=0, description="the batch object's request_counts are written at most this often while it runs"
    )


class ServeArgs(_Section):
    base_model: str = Field(
        "models/toy-sd",
        description="diffusers folder or hub id (from the HF cache) of the one base model this app serves; its family "
        "(SD 1.x/2.x or SDXL) comes from its model_index.json, and adapters of another family are refused",
    )
    vae: str | None = Field(
        None,
        description="another VAE folder or hub id to load instead of the base model's own, e.g. "
        "madebyollin/sdxl-vae-fp16-fix for SDXL in float16 (SDXL's own VAE overflows in fp16, so diffusers upcasts it "
        "to fp32 for every decode); null: the model's own",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: float16 on CUDA, float32 on CPU"
    )
    adapters: dict[str, str] = Field(
        default_factory=dict, description="name -> adapter folder, runs:/<run>/<path> or models:/<name>@<alias>"
    )
    adapter_roots: list[str] = Field(
        default_factory=lambda: ["."],
        description="folders that adapter folders in `adapters` must lie in, symlinks followed ('.' = the project); "
        "registry references and adapter_cache_dir are always allowed",
    )
    allow_registry_refs: bool = Field(
        True,
        description="clients may ask for a registered model by name (its `champion.alias`), <model>@<alias> or "
        "<model>/<version>, and /v1/models lists every lorafleet registered model's champion, aliases and gated "
        "versions",
    )
    champion: ChampionArgs = Field(default_factory=ChampionArgs)
    canary: CanaryArgs = Field(default_factory=CanaryArgs)
    default_model: str = Field("champion", description="served when a request names no model ('base' for none)")
    tracking_uri: str | None = Field(None, description="MLflow tracking/registry URI; null = $MLFLOW_TRACKING_URI")
    registry_retries: int = Field(
        2,
        ge=0,
        le=10,
        description="HTTP retries per registry call in a replica, set as MLFLOW_HTTP_REQUEST_MAX_RETRIES in its "
        "environment (MLflow's own default, 7 with backoff factor 2, waited about 4 minutes for a registry that was "
        "down); a registry still down after them is a 503",
    )
    registry_timeout_s: int = Field(
        10, ge=1, description="seconds one registry HTTP request may take (MLFLOW_HTTP_REQUEST_TIMEOUT in a replica)"
    )
    registry_deadline_s: float = Field(
        5.0,
        gt=0,
        description="the longest a request waits for the registry (a first look-up or download of a registry name); "
        "past it the request gets 503 + Retry-After and the call goes on in the background. Base, configured folders "
        "and names already resolved never wait for the registry",
    )
    registry_retry_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="while the registry does not answer: seconds between a replica's tries, and the Retry-After of a "
        "503 for a name only the registry can resolve (the champion before its first look-up)",
    )
    adapter_cache_dir: str = Field("runs/serve/adapters", description="where registry downloads are kept")
    max_adapters: int = Field(4, ge=1, description="adapters held in a replica's memory at once (LRU)")
    defaults: GenerationDefaults = Field(default_factory=GenerationDefaults)
    limits: RequestLimits = Field(default_factory=RequestLimits)
    batching: BatchingArgs = Field(default_factory=BatchingArgs)
    deployment: DeploymentArgs = Field(default_factory=DeploymentArgs)
    api_key_env: str = Field(
        "LORAFLEET_API_KEY", description="env var holding the API key; when set, all but /healthz need Bearer auth"
    )
    tenants: TenantArgs = Field(default_factory=TenantArgs)
    warmup: bool = Field(True, description="generate one image before the replica reports ready")
    image_urls: ImageUrlArgs = Field(default_factory=ImageUrlArgs)
    speed: SpeedArgs = Field(default_factory=SpeedArgs)
    files: FilesArgs = Field(default_factory=FilesArgs)
    finetune: FineTuneArgs = Field(default_factory=FineTuneArgs)
    feedback: FeedbackArgs = Field(default_factory=FeedbackArgs)
    batches: BatchesArgs = Field(default_factory=BatchesArgs)
    response_cache: ResponseCacheArgs = Field(default_factory=ResponseCacheArgs)
    records: RecordsArgs = Field(default_factory=RecordsArgs)

    @field_validator("adapters")
    @classmethod
    def _names(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [n for n in value if not MODEL_NAME.match(n) or "@" in n or "/" in n or n == BASE]
        if bad:
            raise ValueError(f"adapter names {bad}: use letters, digits, '_', '-', '.' (and not 'base')")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ServeArgs:
        problems = []
        b, d, lim = self.batching, self.deployment, self.limits
        if d.max_ongoing_requests < b.max_batch_size * b.max_concurrent_batches:
            problems.append(
                f"deployment.max_ongoing_requests ({d.max_ongoing_requests}) < batching.max_batch_size "
                f"({b.max_batch_size}) x batching.max_concurrent_batches ({b.max_concurrent_batches}): batches "
                "could never fill; raise max_ongoing_requests"
            )
        if lim.max_n > b.max_batch_size:
            problems.append(
                f"limits.max_n ({lim.max_n}) > batching.max_batch_size ({b.max_batch_size}): a request's images "
                "must fit one pass; lower max_n or raise max_batch_size"
            )
        if lim.min_size > lim.max_size:
            problems.append(f"limits.min_size ({lim.min_size}) > limits.max_size ({lim.max_size})")
        if self.registry_deadline_s >= d.request_timeout_s:
            problems.append(
                f"registry_deadline_s ({self.registry_deadline_s}) >= deployment.request_timeout_s "
                f"({d.request_timeout_s}): a request would time out (504) before the registry's 503; lower "
                "registry_deadline_s"
            )
        if not lim.min_size <= self.defaults.size <= lim.max_size:
            problems.append(f"defaults.size {self.defaults.size} is outside limits.min_size..limits.max_size")
        if self.defaults.steps > lim.max_steps:
            problems.append(f"defaults.steps {self.defaults.steps} > limits.max_steps {lim.max_steps}")
        urls, largest = self.image_urls, lim.max_n * (lim.max_size**2 * 3 + 2**16)  # raw RGB + PNG overhead
        if urls.max_images < lim.max_n or urls.max_bytes < largest:
            problems.append(
                f"image_urls (max_images {urls.max_images}, max_bytes {urls.max_bytes}) cannot hold one request's "
                f"images (limits.max_n {lim.max_n} of up to {lim.max_size}² px, ~{largest} bytes); raise them"
            )
        if self.speed.compile_unet and b.mixed_adapters:
            problems.append(
                "speed.compile_unet needs batching.mixed_adapters: false: a compiled UNet serves one adapter per pass "
                "(hot-swapped into a slot, no recompile); mixed passes route per sample and would recompile. Set "
                "batching.mixed_adapters: false, or speed.compile_unet: false to keep mixed-adapter batches"
            )
        if d.autoscaling_config and d.num_replicas != "auto":
            problems.append("deployment.autoscaling_config is set: also set deployment.num_replicas to 'auto'")
        if d.num_replicas == "auto" and not d.autoscaling_config:
            problems.append("deployment.num_replicas is 'auto': also give deployment.autoscaling_config")
        for name, ref in self.adapters.items():
            if is_folder_ref(ref) and (why := self.outside_roots(Path(project_path(ref)))):
                problems.append(f"adapters.{name}: {why}")
        if self.canary.alias == self.champion.alias:
            problems.append(f"canary.alias {self.canary.alias!r} is champion.alias too: name the challenger's alias "
                            "differently (challenger)")  # fmt: skip
        known = {BASE, *self.adapters, *([self.champion.name] if self.champion.model else [])}
        if self.default_model not in known:
            problems.append(f"default_model {self.default_model!r} is none of {sorted(known)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def allowed_roots(self) -> list[Path]:
        return [Path(project_path(r)).resolve() for r in self.adapter_roots]

    def outside_roots(self, folder: Path) -> str | None:
        """Why ``folder`` (or a file in it, symlinks followed) is not an allowed adapter source, or None."""
        roots = self.allowed_roots()

        def inside(p: Path) -> bool:
            real = p.resolve()
            return any(real == r or real.is_relative_to(r) for r in roots)

        if not inside(folder):
            return (
                f"{folder} is outside adapter_roots {[str(r) for r in roots]}; move the adapter into one of them "
                "or add its folder to adapter_roots"
            )
        if folder.is_dir():
            for f in folder.iterdir():
                if not inside(f):
                    return f"{f} links outside adapter_roots ({f.resolve()}); copy the file into the adapter folder"
        return None

    def api_key(self) -> str | None:
        """The key clients must send (from the environment variable ``api_key_env`` names), or None."""
        return (os.environ.get(self.api_key_env) if self.api_key_env else None) or None

    def resolved_tracking_uri(self) -> str | None:
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None

    def registry_env(self) -> dict[str, str]:
        """The MLflow client settings a replica runs with (``registry_retries``, ``registry_timeout_s``), as the
        environment variables MLflow reads at every call; ``build_app`` puts them in the replicas' runtime_env."""
        return {
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(self.registry_retries),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # retries after 0, 2, 4 ... s instead of 0, 4, 8 ... s
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(self.registry_timeout_s),
        }


def load_serve_args(path: str | Path = PROJECT_ROOT / "configs" / "serve.yaml", overrides: list[str] | None = None):
    """``ServeArgs`` from a Serve config file's first application (or a plain mapping), with dotted overrides.

    Raises:
        training.configuration.ConfigError: every problem at once.
    """
    from training.configuration import ConfigError, validate_values

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError([f"cannot read {path}: {exc}"], str(path)) from exc
    if isinstance(data, dict) and "applications" in data:
        data = (data["applications"] or [{}])[0].get("args") or {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the application args must be a mapping"], str(path))
    return validate_values(ServeArgs, data, overrides, str(path))
