"""Typed schema for building the toy world (values live in ``configs/toy_world.yaml``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClipBuild(_Strict):
    hidden_size: int = Field(128, ge=32, description="width of both CLIP towers")
    layers: int = Field(3, ge=1, description="transformer layers per tower")
    heads: int = Field(4, ge=1, description="attention heads per layer")
    steps: int = Field(700, ge=1, description="contrastive training steps")
    batch_size: int = Field(64, ge=8, description="images per contrastive step")
    lr: float = Field(5e-4, gt=0, description="peak AdamW learning rate")
    pool_size: int = Field(20000, ge=100, description="procedural images rendered once and reused")


class VaeBuild(_Strict):
    block_out_channels: list[int] = Field(
        [16, 32, 64, 64], description="channels per VAE level; N levels downsample by 2^(N-1)"
    )
    latent_channels: int = Field(4, ge=1, description="latent channels (SD uses 4)")
    steps: int = Field(4000, ge=1, description="autoencoder training steps")
    batch_size: int = Field(16, ge=1, description="images per VAE step")
    lr: float = Field(1e-3, gt=0, description="peak AdamW learning rate")
    kl_weight: float = Field(1e-6, ge=0, description="KL term weight (SD's VAE uses ~1e-6)")
    pool_size: int = Field(16000, ge=100, description="wider-world images rendered once and reused")


class UnetBuild(_Strict):
    block_out_channels: list[int] = Field([64, 128], description="UNet channels per level")
    layers_per_block: int = Field(1, ge=1, description="ResNet/attention layers per UNet level")
    attention_head_dim: int = Field(8, ge=1, description="channels per attention head")
    steps: int = Field(3000, ge=1, description="denoising training steps on cached latents")
    batch_size: int = Field(64, ge=1, description="latents per UNet step")
    lr: float = Field(5e-4, gt=0, description="peak AdamW learning rate")
    uncond_prob: float = Field(0.1, ge=0, le=1, description="caption dropout, enables classifier-free guidance")
    pool_size: int = Field(16000, ge=100, description="base-world images encoded once to latents")


class ToyWorldConfig(_Strict):
    seed: int = Field(0, description="one seed for every image, init and batch order")
    out_dir: str = Field("models", description="folder that receives toy-sd/ and toy-clip/")
    max_length: int = Field(32, ge=12, description="tokenizer model_max_length = text positions")
    clip: ClipBuild = Field(default_factory=ClipBuild)
    vae: VaeBuild = Field(default_factory=VaeBuild)
    unet: UnetBuild = Field(default_factory=UnetBuild)
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 keeps torch's default")


class SdxlUnetBuild(UnetBuild):
    """SDXL's UNet layout at toy size (``training.toy_world.tiny.sdxl_unet``): no attention at the top level."""

    block_out_channels: list[int] = Field(
        [64, 112],
        description="UNet channels per level; the first level has no attention (as SDXL's); 112 keeps "
        "models/toy-sdxl under 15 MB with both fp32 text encoders",
    )
    transformer_layers_per_block: int = Field(1, ge=1, description="transformer blocks per attention level")
    addition_time_embed_dim: int = Field(
        32, ge=2, description="width of each of the 6 size/crop time ids' sinusoidal embedding (SDXL base: 256)"
    )


class ToySdxlConfig(_Strict):
    seed: int = Field(0, description="one seed for every image, init and batch order")
    out_dir: str = Field("models", description="folder that receives toy-sdxl/")
    sd_model: str = Field("models/toy-sd", description="toy SD folder: its VAE, text encoder and tokenizer are reused")
    clip_model: str = Field(
        "models/toy-clip", description="toy CLIP folder: its text tower with projection is text_encoder_2"
    )
    unet: SdxlUnetBuild = Field(default_factory=SdxlUnetBuild)
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 keeps torch's default")
