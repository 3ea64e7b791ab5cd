"""SD-1.5- and SDXL-architecture pipelines with random weights, and the synthetic data the GPU benchmark trains on.

Speed does not depend on weight values, so ``benchmarks/gpu_bench.py`` builds Stable Diffusion 1.5's
architecture in code instead of downloading it: the UNet of SD 1.5's ``unet/config.json`` (860 M parameters), the
KL autoencoder of its ``vae/config.json`` (84 M) and OpenAI CLIP ViT-L/14's text tower (123 M; SD 1.x's text
encoder), with the toy world's tokenizer (``models/toy-sd/tokenizer``, padded to CLIP's 77 positions). ``SDXL`` is
SDXL base 1.0's (``stabilityai/stable-diffusion-xl-base-1.0``): its UNet (2.57 B), the same VAE layout (84 M),
CLIP ViT-L's text tower (123 M) and OpenCLIP ViT-bigG/14's with its projection (695 M) as ``text_encoder_2``.
``TINY`` / ``TINY_SDXL`` are the same code at a few million parameters so the benchmark runs on CPU in the tests.

No Ray, no MLflow: this runs on GPU machines that have neither.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from training.toy_world.sd import assemble_pipeline
from training.toy_world.tiny import assemble_sdxl_pipeline

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "models" / "toy-sd"  # its tokenizer/ subfolder: loaded as the pipeline loads it
CLIP_POSITIONS = 77  # CLIP ViT-L/14's max_position_embeddings: SD 1.x's prompt length


@dataclass(frozen=True)
class Scale:
    """Constructor arguments of the networks, the default image side, and the parameter counts to expect.
    ``text_2``: SDXL's second text encoder (``CLIPTextModelWithProjection``); None for SD 1.x's one encoder."""

    name: str
    label: str  # the architecture, in words
    unet: dict
    vae: dict
    text: dict
    resolution: int  # default training / serving image side in pixels
    expected_params: dict[str, int] = field(default_factory=dict)  # module -> count; empty: not checked
    text_2: dict | None = None

    @property
    def modules(self) -> tuple[str, ...]:
        return ("unet", "vae", "text_encoder") + (("text_encoder_2",) if self.text_2 else ())


# SD 1.5 (stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json and vae/config.json) and CLIP ViT-L/14's
# text config (openai/clip-vit-large-patch14, text_config); the counts are those of the released checkpoints.
SD15 = Scale(
    name="sd15",
    label="SD 1.5",
    unet=dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    vae=dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    ),
    text=dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=CLIP_POSITIONS,
        hidden_act="quick_gelu",
        projection_dim=768,
    ),
    resolution=512,
    expected_params={"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
)

# The same block layout at toy width: 64 px images, 8x8 latents, a few million parameters.
TINY = Scale(
    name="tiny",
    label="SD 1.5 at toy width",
    unet=SD15.unet
    | dict(
        sample_size=8,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=1,
        cross_attention_dim=64,
        norm_num_groups=16,
    ),  # fmt: skip
    vae=SD15.vae | dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64),
    text=SD15.text
    | dict(
        vocab_size=0,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=64,
    ),  # fmt: skip
    resolution=64,
)

# SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0: unet/, vae/, text_encoder/, text_encoder_2/ config.json):
# no attention at the top level, 1/2/10 transformer blocks per level, linear projections, pooled text + 6 time ids
# ("text_time", each id embedded in 256), cross-attention on 768 + 1280 concatenated hidden states.
SDXL = Scale(
    name="sdxl",
    label="SDXL base",
    unet=dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=768 + 1280,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=6 * 256 + 1280,
        norm_num_groups=32,
    ),
    vae=SD15.vae | dict(sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    text=SD15.text,
    text_2=SD15.text
    | dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        hidden_act="gelu",
        projection_dim=1280,
    ),  # fmt: skip
    resolution=1024,
    expected_params={
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    },  # fmt: skip
)

# SDXL's block layout at toy width: 64 px images, 8x8 latents, a few million parameters.
TINY_SDXL = Scale(
    name="tiny-sdxl",
    label="SDXL base at toy width",
    unet=SDXL.unet
    | dict(
        sample_size=8,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=64 + 64,
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 64,
        norm_num_groups=16,
    ),  # fmt: skip
    vae=TINY.vae,
    text=TINY.text,
    text_2=TINY.text | dict(hidden_act="gelu"),
    resolution=64,
)
SCALES = {(s.name, False): s for s in (SD15, SDXL)} | {("sd15", True): TINY, ("sdxl", True): TINY_SDXL}


def load_tokenizer(scale: Scale) -> CLIPTokenizer:
    """The toy world's tokenizer (any word becomes real tokens), set to pad prompts to CLIP's 77 positions."""
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, subfolder="tokenizer")
    tokenizer.model_max_length = scale.text["max_position_embeddings"]
    return tokenizer


def text_config(scale: Scale, tokenizer: CLIPTokenizer, second: bool = False) -> CLIPTextConfig:
    """CLIP text config of ``scale`` (``second``: of its ``text_2``); special token ids from ``tokenizer``
    (``vocab_size`` 0: the tokenizer's)."""
    values = dict(scale.text_2 if second else scale.text)
    values["vocab_size"] = values["vocab_size"] or len(tokenizer)
    if values["vocab_size"] < len(tokenizer):
        raise ValueError(f"text vocab_size {values['vocab_size']} < the tokenizer's {len(tokenizer)} tokens")
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return CLIPTextConfig(**values, **ids, pad_token_id=tokenizer.pad_token_id)


def _modules(scale: Scale, tokenizer: CLIPTokenizer) -> dict[str, torch.nn.Module]:
    """``scale``'s networks, built on the current default device with PyTorch's default initialisation."""
    modules = {
        "unet": UNet2DConditionModel(**scale.unet),
        "vae": AutoencoderKL(**scale.vae),
        "text_encoder": CLIPTextModel(text_config(scale, tokenizer)),
    }
    if scale.text_2:
        modules["text_encoder_2"] = CLIPTextModelWithProjection(text_config(scale, tokenizer, second=True))
    return modules


def build_pipeline(scale: Scale, seed: int = 0, device: str | torch.device = "cpu") -> DiffusionPipeline:
    """A pipeline of ``scale``'s architecture with random (PyTorch default) weights, in fp32, created on
    ``device`` (a GPU initialises SD's 1 B parameters in seconds, 2 busy CPU cores took minutes): a
    ``StableDiffusionPipeline`` with DDIM and SD's noise schedule (``training.toy_world.sd.assemble_pipeline``), no
    safety checker; for SDXL scales a ``StableDiffusionXLPipeline`` with SDXL base's Euler scheduler
    (``training.toy_world.tiny.assemble_sdxl_pipeline``), the toy tokenizer for both encoders."""
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(scale)
    with torch.device(device):
        m = {name: module.eval() for name, module in _modules(scale, tokenizer).items()}
    if scale.text_2:
        pipe = assemble_sdxl_pipeline(
            m["vae"], m["text_encoder"], m["text_encoder_2"], tokenizer, load_tokenizer(scale), m["unet"]
        )
    else:
        pipe = assemble_pipeline(m["vae"], m["text_encoder"], tokenizer, m["unet"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def param_counts(pipe: DiffusionPipeline) -> dict[str, int]:
    """Parameters of the UNet, VAE and text encoder(s)."""
    names = [n for n in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in names}


def meta_param_counts(scale: Scale) -> dict[str, int]:
    """``param_counts`` of ``scale``'s architecture without allocating weights (modules built on the meta device)."""
    tokenizer = load_tokenizer(scale)
    with torch.device("meta"):
        modules = _modules(scale, tokenizer)
    return {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}


def check_param_counts(counts: dict[str, int], scale: Scale, rel_tol: float = 0.01) -> None:
    """Raises ValueError when a network's parameter count is more than ``rel_tol`` off ``scale.expected_params``
    (the architecture is not the one the benchmark claims to measure)."""
    bad = [
        f"{name}: {counts.get(name, 0):,} parameters, expected {want:,}"
        for name, want in scale.expected_params.items()
        if abs(counts.get(name, 0) - want) > rel_tol * want
    ]
    if bad:
        raise ValueError(f"{scale.name} is not {scale.label}'s architecture: " + "; ".join(bad))


def save_pipeline(pipe: DiffusionPipeline, path: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Save in diffusers layout (safetensors) with weights stored in ``dtype`` (half: half the disk and load
    time; the loader casts to what it is asked for). ``pipe`` is left in ``dtype``."""
    pipe.to(dtype=dtype)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def write_dataset(out: Path, num_images: int, resolution: int, seed: int = 0, trigger: str = "sks") -> Path:
    """``num_images`` smooth random RGB images of ``resolution``² px with captions in ``metadata.jsonl``
    (diffusers' imagefolder layout). Content is irrelevant to speed; smooth images keep the PNGs small."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_images):
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((resolution, resolution), Image.Resampling.BICUBIC).save(out / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "text": f"a photo of {trigger}, sample {i}"})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def write_adapters(pipe: DiffusionPipeline, base_model: Path, root: Path, n: int, rank: int) -> dict[str, Path]:
    """``n`` distinct random LoRA adapters (rank ``rank`` on the UNet's attention projections, non-zero B) in
    lorafleet's adapter format for ``base_model``: name -> folder."""
    from training.toy_world.adapters import random_adapter

    return {
        f"ad{i}": random_adapter(pipe, base_model, root / f"ad{i}", seed=i + 1, rank=rank, std=0.01) for i in range(n)
    }
