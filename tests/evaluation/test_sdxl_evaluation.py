"""Evaluation on an SDXL base: the same suite, metrics, gate and report as on SD 1.x, run on the tiny random SDXL
pipeline with a random LoRA on its UNet (diffusers' SDXL DreamBooth default); the model card names
StableDiffusionXLPipeline; the ONNX export refuses the SDXL base; a registered model keeps one base model's adapters."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation.evaluate import CANDIDATE, Evaluator, run
from evaluation.registry import FetchedAdapter, fetch_adapter
from evaluation.suite import materialise
from training.adapter import AdapterMeta, save_adapter, verify_adapter
from training.configuration import ConfigError, load_config

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# eval.yaml's gate with a latency bound for a loaded CI machine
GATE = (
    "gate.checks={concept_gain: {min: 0.11}, concept_win_rate: {min: 0.7}, heldout_loss_ratio: {max: 0.34},"
    " flexibility_delta: {min: -0.2}, prior_similarity: {min: 0.25}, success_rate: {min: 0.95},"
    " latency_p95_s: {max: 600}}"
)
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@pytest.fixture(scope="module")
def sdxl_adapter(tiny_sdxl_dir, tmp_path_factory) -> Path:
    """A random rank-4 LoRA on the tiny SDXL's UNet attention and both text encoders (A and B non-zero), saved with
    ``save_adapter``."""
    from peft import LoraConfig

    from training.families import load_pipeline

    pipe = load_pipeline(tiny_sdxl_dir, device="cpu", dtype=torch.float32)
    torch.manual_seed(0)
    modules = {pipe.unet: UNET_TARGETS, pipe.text_encoder: TE_TARGETS, pipe.text_encoder_2: TE_TARGETS}
    for module, targets in modules.items():
        module.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights="gaussian"))
        with torch.no_grad():
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.5 if module is pipe.unet else 0.05)  # PEFT starts B at zero: a no-op
    meta = AdapterMeta(
        base_model=str(tiny_sdxl_dir), rank=4, alpha=4.0, target_modules=UNET_TARGETS, trigger="sks", text_encoder=True
    )
    folder = tmp_path_factory.mktemp("sdxl-adapter") / "adapter"
    return save_adapter(folder, pipe.unet, meta, pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)


@pytest.fixture
def sdxl_config(repo, toy_world_data, tmp_path):
    """configs/eval.yaml (the suite built from the dataset's captions) on the toy data, a small suite, no MLflow."""
    from evaluation.config import EvalConfig

    def make(*overrides: str):
        base = [
            f"clip_model={repo / 'models' / 'toy-clip'}",
            f"output_dir={tmp_path / 'eval'}",
            f"data.train_path={toy_world_data['dotted']}",
            f"data.heldout_path={toy_world_data['dotted'] / 'heldout'}",
            "auto_suite.images_per_prompt=1",
            "auto_suite.max_prompts=3",
            "generation.steps=2",
            "mlflow.enabled=false",
            "registry.enabled=false",
            GATE,
        ]
        return load_config(EvalConfig, repo / "configs" / "eval.yaml", base + list(overrides))

    return make


@pytest.mark.slow
def test_the_same_metrics_and_gate_run_on_an_sdxl_base(sdxl_adapter, sdxl_config, tiny_sdxl_dir):
    result = run(sdxl_config(), str(sdxl_adapter))
    assert result.adapter["base_model"] == str(tiny_sdxl_dir)  # the adapter's own base: an SDXL folder
    measured = {"success_rate", "latency_p95_s", "flexibility", "flexibility_delta", "clip_i", "concept_gain",
                "concept_win_rate", "prior_similarity", "heldout_loss_ratio"}  # fmt: skip
    assert measured <= set(result.metrics), sorted(result.metrics)
    assert all(math.isfinite(result.metrics[k]) for k in measured), result.metrics
    assert result.metrics["success_rate"] == 1.0  # every SDXL generation came back with finite pixels
    assert {c.metric for c in result.gate.checks} == {
        "concept_gain", "concept_win_rate", "heldout_loss_ratio", "flexibility_delta", "prior_similarity",
        "success_rate", "latency_p95_s",
    }  # fmt: skip
    assert all(math.isfinite(c.value) for c in result.gate.checks) and isinstance(result.gate.passed, bool)
    out = Path(result.out_dir)
    for name in ("report.md", "report.html", "metrics.json", "suite.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["gate"]["passed"] == result.gate.passed
    assert str(tiny_sdxl_dir) in (out / "report.md").read_text()


@pytest.mark.slow
def test_sdxl_images_come_at_the_configured_size_and_the_adapter_changes_them(sdxl_adapter, sdxl_config, tmp_path):
    cfg = materialise(sdxl_config("generation.resolution=32"), "sks")
    evaluator = Evaluator(cfg, str(verify_adapter(sdxl_adapter).base_model))
    _, images = evaluator.evaluate(fetch_adapter(str(sdxl_adapter), tmp_path), CANDIDATE, timed=False)
    base, adapted = evaluator.base.trigger.images, images.trigger.images
    assert {img.size for img in base + adapted} == {(32, 32)}
    diffs = [np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() for a, b in zip(adapted, base)]
    assert min(diffs) > 1.0  # mean |Δ| in 0-255 units: the LoRA is in every image, not the bare base model


def test_the_model_card_uses_the_bases_pipeline_class(sdxl_adapter, tiny_pipe_dir, tiny_sdxl_dir):
    from evaluation.publish import build_card

    def card(base_model: str) -> str:
        meta = verify_adapter(sdxl_adapter).model_copy(update={"base_model": base_model})
        return str(build_card(FetchedAdapter(sdxl_adapter, meta, str(sdxl_adapter)), "you/x", {}, False))

    xl, sd = card(str(tiny_sdxl_dir)), card(str(tiny_pipe_dir))
    assert "from diffusers import StableDiffusionXLPipeline" in xl and "StableDiffusionXLPipeline.from_pretrained" in xl
    assert "stable-diffusion-xl" in xl
    assert "from diffusers import StableDiffusionPipeline" in sd and "stable-diffusion-xl" not in sd
    # a base whose model_index.json cannot be read here: DiffusionPipeline picks the class where the card is used
    unknown = card("example/not-downloaded")
    assert "from diffusers import DiffusionPipeline" in unknown


def test_onnx_export_refuses_an_sdxl_base_and_says_why(sdxl_adapter, tmp_path, capsys):
    from evaluation.onnx_export import OnnxExportError, export_onnx, main

    with pytest.raises(OnnxExportError, match=r"SD 1\.x/2\.x models only.*StableDiffusionXLPipeline \(sdxl\)"):
        export_onnx(str(sdxl_adapter), tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
    assert main([str(sdxl_adapter), str(tmp_path / "onnx")]) == 2
    assert "second text encoder" in capsys.readouterr().err


@pytest.mark.slow
def test_a_registered_model_keeps_one_base_models_adapters(sdxl_config, tiny_sdxl_dir, tmp_path):
    """An SDXL adapter gated against an SD champion would compare unlike metrics and move the alias to an adapter the
    replicas following it cannot load: refused before anything is rendered, naming the key and both bases."""
    from evaluation.evaluate import check_champion_base
    from evaluation.registry import TAG_BASE, client_for

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = client_for(uri)
    client.create_registered_model("photos-lora")
    version = client.create_model_version("photos-lora", str(tmp_path), tags={TAG_BASE: "stable-diffusion-v1-5"})
    client.set_registered_model_alias("photos-lora", "champion", version.version)
    cfg = sdxl_config("registry.enabled=true", "mlflow.enabled=true", "registry.model_name=photos-lora")
    with pytest.raises(ConfigError, match=r"registry.model_name=photos-lora.*'stable-diffusion-v1-5'.*'tiny-sdxl"):
        check_champion_base(cfg, uri, str(tiny_sdxl_dir))
    check_champion_base(cfg, uri, "stable-diffusion-v1-5")  # the champion's own base: gated as before
    check_champion_base(sdxl_config("registry.model_name=other-lora"), uri, str(tiny_sdxl_dir))  # no champion yet


def test_held_out_images_are_encoded_by_an_fp32_vae_when_the_vae_says_force_upcast(
    tiny_sdxl_dir, toy_world_data, monkeypatch
):
    """SDXL's VAE overflows in fp16: the held-out loss encodes in fp32 as training does, whatever the pipeline's dtype
    (fp16 on CUDA), and the pipeline's VAE is back in its own dtype afterwards."""
    from evaluation.config import DataArgs
    from evaluation.qa import heldout_set
    from training import heldout
    from training.families import load_pipeline

    pipe = load_pipeline(tiny_sdxl_dir, device="cpu", dtype=torch.float16)
    assert pipe.vae.config.force_upcast
    seen = []

    def spy(parts, pixels, batch_size=16):
        seen.append(parts.vae.dtype)
        raise RuntimeError("stop after the dtype is seen")

    monkeypatch.setattr(heldout, "encode_pixels", spy)
    data = DataArgs(train_path=str(toy_world_data["dotted"]), heldout_path=str(toy_world_data["dotted"] / "heldout"))
    with pytest.raises(RuntimeError, match="stop after"):
        heldout_set(pipe, data, "sks", 64)
    assert seen == [torch.float32] and pipe.vae.dtype == torch.float16
