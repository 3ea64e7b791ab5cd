"""`lorafleet export-onnx`: the shipped toy model with a random UNet + text-encoder LoRA, fused and exported once
(through the CLI); onnxruntime's outputs are compared with PyTorch's, and with the base model's (the adapter is in)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from evaluation.onnx_export import (  # noqa: E402
    MANIFEST,
    SPECS,
    TOLERANCE,
    OnnxExportError,
    check_graph,
    export_onnx,
    fused_pipeline,
    modules,
    sample_inputs,
)
from training.adapter import META_NAME, AdapterError, AdapterMeta, save_adapter  # noqa: E402

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# the adapter must move the UNet's and text encoder's outputs by far more than the export's tolerance; the VAE it
# does not touch
ADAPTER_EFFECT = 100 * TOLERANCE


def ort_run(path: Path, spec, args: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(list(spec.outputs), {n: a.numpy() for n, a in zip(spec.inputs, args)})


def relative(got: np.ndarray, want: torch.Tensor) -> float:
    want = want.numpy()
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def base_pipe(repo):
    from training.families import load_pipeline

    return load_pipeline(repo / "models" / "toy-sd", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def adapter(base_pipe, tmp_path_factory) -> Path:
    """A random LoRA (rank 4, alpha 4) on the toy UNet's attention and text encoder's projections, B non-zero."""
    from peft import LoraConfig

    unet, te = copy.deepcopy(base_pipe.unet), copy.deepcopy(base_pipe.text_encoder)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS, init_lora_weights="gaussian"))
    te.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TE_TARGETS, init_lora_weights="gaussian"))
    gen = torch.Generator().manual_seed(1)
    for model in (unet, te):
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=gen) * 0.3
    meta = AdapterMeta(base_model="models/toy-sd", rank=4, alpha=4.0, text_encoder=True, trigger="sks",
                       target_modules=UNET_TARGETS + TE_TARGETS)  # fmt: skip
    return save_adapter(tmp_path_factory.mktemp("adapter") / "sks", unet, meta, te)


@pytest.fixture(scope="module")
def fused(adapter, repo):
    """The adapter fused into a fresh toy pipeline, built here (independently of the export's own check)."""
    return fused_pipeline(str(repo / "models" / "toy-sd"), adapter)


@pytest.fixture(scope="module")
def exported(adapter, tmp_path_factory) -> tuple[Path, str]:
    """The one export of this module, through the CLI (``lorafleet export-onnx REF OUT``): (OUT, what it printed)."""
    from cluster.cli import main

    out = tmp_path_factory.mktemp("onnx") / "sks"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["export-onnx", str(adapter), str(out)])
    assert rc == 0, printed.getvalue()
    return out, printed.getvalue()


@pytest.mark.slow
def test_the_cli_writes_three_checked_graphs_and_a_manifest(exported, adapter):
    out, printed = exported
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest["graphs"]) == {"text_encoder", "unet", "vae_decoder"}
    for name, graph in manifest["graphs"].items():
        assert (out / graph["file"]).is_file()
        assert graph["check"]["passed"] and graph["check"]["relative_error"] <= TOLERANCE, (name, graph["check"])
        assert f"{name}: onnxruntime vs PyTorch max abs error" in printed
    unet = {i["name"]: i for i in manifest["graphs"]["unet"]["inputs"]}
    assert unet["sample"]["shape"] == ["batch", 4, "height", "width"] and unet["timestep"]["dtype"] == "float32"
    assert manifest["graphs"]["text_encoder"]["inputs"][0]["dtype"] == "int32"  # what diffusers' ONNX pipeline feeds
    assert manifest["adapter"]["sha256"] == json.loads((adapter / META_NAME).read_text())["sha256"]
    assert manifest["base_model"] == "models/toy-sd" and manifest["exporter"]["opset"] >= 17
    for part in ("tokenizer", "scheduler", "model_index.json", "unet/config.json"):
        assert (out / part).exists(), part
    assert not list(out.parent.glob(".sks.onnx-*")), "the staging folder was left behind"


@pytest.mark.slow
def test_onnxruntime_matches_the_fused_pytorch_model_and_differs_from_the_base(exported, fused, base_pipe):
    """Inputs the export never saw (batch 1, another seed). The UNet and text encoder must be the adapter's, the VAE
    decoder the base model's."""
    out, _ = exported
    fused, base = modules(fused), modules(base_pipe)
    inputs = sample_inputs(base_pipe, batch=1, seed=7)
    for spec in SPECS:
        got = ort_run(out / spec.name / "model.onnx", spec, inputs[spec.name])
        with torch.no_grad():
            want, plain = fused[spec.name](*inputs[spec.name]), base[spec.name](*inputs[spec.name])
        want, plain = (want, plain) if isinstance(want, tuple) else ((want,), (plain,))
        assert relative(got[0], want[0]) <= TOLERANCE, spec.name
        effect = relative(got[0], plain[0])
        if spec.name == "vae_decoder":
            assert effect <= TOLERANCE
        else:
            assert effect > ADAPTER_EFFECT, f"{spec.name}: the export is the base model's ({effect:.2g})"


def onnx_images(out: Path, prompt: str, latents: np.ndarray, steps: int, guidance: float) -> np.ndarray:
    """README's loop: classifier-free guidance with the exported graphs, the exported scheduler and the manifest's
    VAE scaling factor; images [batch, 3, H, W] in [0, 1]."""
    import onnxruntime as ort
    from diffusers import DDIMScheduler
    from transformers import AutoTokenizer

    run = {n: ort.InferenceSession(str(out / n / "model.onnx"), providers=["CPUExecutionProvider"]).run
           for n in ("text_encoder", "unet", "vae_decoder")}  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    scheduler = DDIMScheduler.from_pretrained(out / "scheduler")
    scale = json.loads((out / MANIFEST).read_text())["vae_scaling_factor"]
    ids = tokenizer(["", prompt], padding="max_length", return_tensors="np").input_ids
    text = run["text_encoder"](None, {"input_ids": ids.astype(np.int32)})[0]  # [unconditional, prompt]
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        feed = {"sample": np.concatenate([latents] * 2), "timestep": np.full(2, t, np.float32),
                "encoder_hidden_states": text}  # fmt: skip
        uncond, cond = run["unet"](None, feed)[0]
        noise = uncond + guidance * (cond - uncond)
        latents = scheduler.step(torch.from_numpy(noise[None]), t, torch.from_numpy(latents)).prev_sample.numpy()
    return np.clip(run["vae_decoder"](None, {"latent_sample": latents / scale})[0] / 2 + 0.5, 0, 1)


@pytest.mark.slow
def test_a_denoising_loop_on_the_graphs_draws_what_the_fused_pipeline_draws(exported, fused):
    """The graphs compose: text encoder -> UNet with guidance -> scheduler -> VAE decoder, against diffusers'
    StableDiffusionPipeline on the fused model with the same latents (4 DDIM steps, guidance 4)."""
    out, _ = exported
    prompt, latents = "a red circle on a sks background", np.random.RandomState(0).randn(1, 4, 8, 8).astype("float32")
    got = onnx_images(out, prompt, latents, steps=4, guidance=4.0)
    want = fused(prompt, height=64, width=64, num_inference_steps=4, guidance_scale=4.0,
                 latents=torch.from_numpy(latents), output_type="pt").images  # fmt: skip
    assert got.shape == (1, 3, 64, 64)
    assert float(np.abs(got - want.numpy()).max()) <= 1e-4  # measured 7.7e-6 of the [0, 1] range


@pytest.mark.slow
def test_the_check_fails_on_a_graph_that_differs_from_pytorch(exported, base_pipe):
    """The exported (fused) text encoder against the base model's: far past the tolerance, so the check fails."""
    out, _ = exported
    spec = SPECS[0]
    module = modules(base_pipe)[spec.name]
    result = check_graph(out / spec.name / "model.onnx", module, sample_inputs(base_pipe, 2, 3)[spec.name], spec,
                         TOLERANCE)  # fmt: skip
    assert not result.passed and result.relative_error > ADAPTER_EFFECT


def test_a_non_empty_out_is_refused_and_kept(adapter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OnnxExportError, match="not empty.*--overwrite"):
        export_onnx(str(adapter), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_missing_reference_and_another_base_model_are_refused(adapter, tmp_path):
    with pytest.raises(AdapterError, match="not a folder"):
        export_onnx(str(tmp_path / "no-such-adapter"), tmp_path / "a")
    with pytest.raises(AdapterError, match="trained on base model 'toy-sd', not 'org/other-model'"):
        export_onnx(str(adapter), tmp_path / "b", base_model="org/other-model")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir()] == [], "staging folders were left behind"


def test_the_cli_exits_2_with_the_reason(adapter, tmp_path, capsys):
    from cluster.cli import main

    assert main(["export-onnx", str(adapter), str(tmp_path / "o"), "--base-model", "org/other-model"]) == 2
    assert "error: adapter" in capsys.readouterr().err


def test_overwrite_never_replaces_the_adapter_its_parent_the_base_model_or_the_current_folder(
    adapter, repo, tmp_path, monkeypatch
):
    """--overwrite replaces OUT as a whole: an OUT that is (or holds, or lies in) what the export reads, or the
    current folder, is refused before anything loads, and every file stays."""
    import shutil

    copy_ = tmp_path / "adapters" / "mine"
    shutil.copytree(adapter, copy_)
    (tmp_path / "adapters" / "other.txt").write_text("sibling")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for out, message in (
        (copy_, "overlaps the adapter folder"),
        (copy_.parent, "overlaps the adapter folder"),
        (copy_ / "onnx", "overlaps the adapter folder"),
        (repo / "models" / "toy-sd", "overlaps the base model folder"),
    ):
        with pytest.raises(OnnxExportError, match=message):
            export_onnx(str(copy_), out, overwrite=True, check=False)
    monkeypatch.chdir(tmp_path / "adapters")
    for out in (".", "..", str(tmp_path)):
        with pytest.raises(OnnxExportError, match="current folder or one above it"):
            export_onnx(str(copy_), out, overwrite=True, check=False)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (repo / "models" / "toy-sd" / "model_index.json").is_file()
