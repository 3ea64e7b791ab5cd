"""Adapter files as a hostile tester built them (issue 18 follow-up): every kind of file that used to be served while
changing nothing, crash the CLI, or hash differently per process, with the value it must give instead."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from evaluation.adapter_io import main_export, main_import
from training.adapter import META_NAME, AdapterError, AdapterMeta, file_sha256, load_adapter, save_adapter
from training.families import load_pipeline
from training.lora_formats import LoraFormatError, injected, read_lora, to_kohya
from training.sampling import generate

PROMPTS = ["a red circle on a sks background"]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def images(pipe) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float32) for im in generate(pipe, PROMPTS, seed=3, steps=3)])


def randomise(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.3


@pytest.fixture(scope="module")
def pipe(tiny_pipe_dir):
    return load_pipeline(tiny_pipe_dir, device="cpu")


@pytest.fixture(scope="module")
def both(tiny_pipe, tiny_pipe_dir, tmp_path_factory) -> Path:
    """A diffusers-layout adapter with UNet AND text-encoder LoRA (rank 4, alpha 8), as most SD 1.5 LoRAs are."""
    from peft import LoraConfig

    unet, te = copy.deepcopy(tiny_pipe.unet), copy.deepcopy(tiny_pipe.text_encoder)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="gaussian"))
    te.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TE_TARGETS, init_lora_weights="gaussian"))
    randomise(unet, 1)
    randomise(te, 2)
    meta = AdapterMeta(base_model=str(tiny_pipe_dir), rank=4, alpha=8.0, text_encoder=True)
    return save_adapter(tmp_path_factory.mktemp("both") / "ad", unet, meta, te)


@pytest.fixture(scope="module")
def kohya_both(both, tmp_path_factory) -> Path:
    """``both`` in kohya/A1111 layout: ``lora_unet_…`` and SD 1.x's ``lora_te_text_model_encoder_layers_…``."""
    out = tmp_path_factory.mktemp("kohya") / "both.safetensors"
    assert main_export([str(both), str(out)]) == 0
    return out


def kohya_folder(state: dict, folder: Path, base: Path, name: str = "w.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / name))
    meta = AdapterMeta(base_model=str(base), weights=name, sha256=file_sha256(folder / name))
    (folder / META_NAME).write_text(meta.to_json())
    return folder


def test_a_unet_and_text_encoder_kohya_file_imports_both_parts_and_draws_as_plain_diffusers(
    pipe, kohya_both, tiny_pipe_dir, tmp_path
):
    """transformers >= 5 flattens CLIPTextModel (no text_model.): lora_te_text_model_… used to match nothing, so the
    import saved only the UNet part while the JSON said text_encoder: true."""
    keys = list(load_file(str(kohya_both)))
    te_keys = [k for k in keys if k.startswith("lora_te_text_model_encoder_layers_")]
    assert te_keys and not any(k.startswith("lora_te1_") for k in keys), keys[:5]

    plain = load_pipeline(tiny_pipe_dir, device="cpu")  # the reference: diffusers' own load_lora_weights
    plain.load_lora_weights(str(kohya_both.parent), weight_name=kohya_both.name, adapter_name="plain")
    te_modules = len(te_keys) // 3  # .alpha, .lora_down.weight, .lora_up.weight each
    assert len(injected(plain, "plain")["text_encoder"]) == te_modules > 0
    expected = images(plain)

    out = tmp_path / "imported"
    assert main_import([str(kohya_both), "--name", "te-style", "--base-model", str(tiny_pipe_dir), "--out", str(out),
                        "--no-register"]) == 0  # fmt: skip
    meta = json.loads((out / META_NAME).read_text())
    saved = list(load_file(str(out / meta["weights"])))
    assert meta["text_encoder"] is True and sum(k.startswith("text_encoder.") for k in saved) == len(te_keys) * 2 // 3
    load_adapter(pipe, out, adapter_name="te-style")
    try:
        pipe.set_adapters("te-style")
        assert len(injected(pipe, "te-style")["text_encoder"]) == te_modules
        got = images(pipe)
    finally:
        pipe.delete_adapters("te-style")
    assert np.abs(got - expected).max() <= 1.0, "imported UNet+TE must draw as diffusers' load_lora_weights (≤ 1/255)"


def test_metadata_says_text_encoder_false_when_only_the_unet_part_is_saved(kohya_both, tiny_pipe_dir, tmp_path):
    moved = "lora_te_text_model_encoder_layers_", "lora_te_text_model_encoder_blocks_"  # a module the model lacks
    state = {k.replace(*moved): v for k, v in load_file(str(kohya_both)).items()}
    save_file(state, str(tmp_path / "x.safetensors"))
    out = tmp_path / "o"
    args = [str(tmp_path / "x.safetensors"), "--name", "x", "--base-model", str(tiny_pipe_dir), "--out", str(out)]
    assert main_import([*args, "--no-register"]) == 0
    meta = json.loads((out / META_NAME).read_text())
    assert meta["text_encoder"] is False, "no text-encoder key was saved, the JSON must not say otherwise"
    assert not any(k.startswith("text_encoder.") for k in load_file(str(out / meta["weights"])))


def test_import_without_a_registry_to_register_in_stops_before_writing(kohya_both, tmp_path, monkeypatch, capsys):
    """The README's command registers; without MLflow it used to write the folder and exit 0, so a script went on to
    `generate --model NAME`, which could not find it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("evaluation.adapter_io._tracking_uri", lambda given: given)  # no `lorafleet up` server either
    out = tmp_path / "o"
    assert main_import([str(kohya_both), "--name", "q", "--out", str(out)]) == 2
    assert "no MLflow server" in capsys.readouterr().err and not out.exists()


@pytest.fixture(scope="module")
def kohya_unet(both) -> dict:
    return {k: v for k, v in to_kohya(read_lora(both)).items() if k.startswith("lora_unet_")}


def test_alpha_zero_is_refused_at_import_and_at_load_and_negative_alpha_is_served(
    pipe, kohya_unet, tiny_pipe_dir, tmp_path, capsys
):
    """alpha 0 (scale 0) drew exactly the base model while served as an adapter; negative alpha is a valid LoRA
    (kohya and A1111 apply alpha / rank as it is) and draws something else than alpha +8 does."""
    zero = kohya_folder({k: torch.tensor(0.0) if k.endswith(".alpha") else v for k, v in kohya_unet.items()},
                        tmp_path / "zero", tiny_pipe_dir)  # fmt: skip
    with pytest.raises(AdapterError, match=r"alpha is 0 in every module, so the adapter changes nothing"):
        load_adapter(pipe, zero, adapter_name="zero")
    assert not any(injected(pipe, "zero").values())
    args = ["--name", "z", "--base-model", str(tiny_pipe_dir), "--no-register"]
    assert main_import([str(zero / "w.safetensors"), *args, "--out", str(tmp_path / "zo")]) == 2
    assert "alpha is 0" in capsys.readouterr().err

    neg = kohya_folder({k: torch.tensor(-8.0) if k.endswith(".alpha") else v for k, v in kohya_unet.items()},
                       tmp_path / "neg", tiny_pipe_dir)  # fmt: skip
    assert main_import([str(neg / "w.safetensors"), *args, "--out", str(tmp_path / "no")]) == 0
    assert json.loads((tmp_path / "no" / META_NAME).read_text())["alpha"] == -8.0
    base = images(pipe)
    load_adapter(pipe, tmp_path / "no", adapter_name="neg")
    try:
        pipe.set_adapters("neg")
        negative = images(pipe)
    finally:
        pipe.delete_adapters("neg")
    assert np.abs(negative - base).mean() > 2.0, "alpha -8 changes the images"


@pytest.mark.parametrize("where", ["lora_up", "alpha"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_weight_or_alpha_is_refused_naming_the_key(kohya_unet, tmp_path, where, value):
    key = sorted(k for k in kohya_unet if k.endswith(".alpha" if where == "alpha" else ".lora_up.weight"))[0]
    state = dict(kohya_unet)
    state[key] = state[key].clone()
    state[key].view(-1)[0] = value
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(LoraFormatError, match=rf"key '{key}' holds NaN or infinite values"):
        read_lora(tmp_path / "w.safetensors")


def _peft_folder(folder: Path, kohya_unet: dict, config: dict | str, extra: dict | None = None) -> Path:
    """A PEFT save_pretrained folder of ``kohya_unet``'s first module (rank 4)."""
    down = sorted(k for k in kohya_unet if k.endswith(".lora_down.weight"))[0]
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    assert down.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"), down
    state = {f"base_model.model.{module}.lora_A.weight": kohya_unet[down],
             f"base_model.model.{module}.lora_B.weight": kohya_unet[down.replace("lora_down", "lora_up")],
             **(extra or {})}  # fmt: skip
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return folder


LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["to_k"]}


@pytest.mark.parametrize(
    ("config", "extra", "words"),
    [
        ({**LORA, "r": 16}, None, "r=16 but the weights of down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k "
         "have rank 4"),
        ({**LORA, "rank_pattern": {"to_k": 8}}, None, r"rank_pattern\['to_k'\]=8 but the weights .* have rank 4"),
        ({**LORA, "r": "4"}, None, "r='4' is not a number"),
        ({**LORA, "peft_type": "LOHA"}, None, "peft_type 'LOHA' is not supported; only LoRA"),
        ({**LORA, "use_dora": True}, None, r"DoRA \(use_dora\) is not supported"),
        ({**LORA, "lora_alpha": float("nan")}, None, "lora_alpha holds NaN"),
        ("[1]", None, "must hold a JSON object"),
        (LORA, {"base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora_magnitude_vector":
                torch.ones(64)}, r"DoRA \(lora_magnitude_vector\) weights are not supported"),
    ],
)  # fmt: skip
def test_peft_folders_that_do_not_describe_a_plain_lora_are_refused_in_one_line(
    kohya_unet, tmp_path, config, extra, words
):
    folder = _peft_folder(tmp_path / "peft", kohya_unet, config, extra)
    with pytest.raises(LoraFormatError, match=words):
        read_lora(folder)


@pytest.mark.parametrize(
    ("suffixes", "words"),
    [
        ({"hada_w1_a": (4, 4), "hada_w1_b": (4, 64), "hada_w2_a": (4, 4), "hada_w2_b": (4, 64)}, r"LoHa \(hada_\*\)"),
        ({"lokr_w1": (4, 4), "lokr_w2": (16, 16)}, r"LoKr \(lokr_\*\)"),
        ({"lora_down.weight": (4, 64), "lora_up.weight": (64, 4), "dora_scale": (1, 64)}, r"DoRA \(dora_scale\)"),
    ],
)
def test_lycoris_and_dora_files_exit_2_with_one_line(tiny_pipe_dir, tmp_path, capsys, suffixes, words):
    """These used to end in diffusers' "keys have not been correctly renamed" traceback (exit 1) or, for DoRA, be
    served as a plain LoRA."""
    module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    state = {f"{module}.{s}": torch.randn(shape) for s, shape in suffixes.items()}
    state[f"{module}_plain.lora_down.weight"] = torch.randn(4, 64)  # mixed with plain LoRA modules: same answer
    save_file(state, str(tmp_path / "l.safetensors"))
    args = ["--name", "l", "--base-model", str(tiny_pipe_dir), "--out", str(tmp_path / "o"), "--no-register"]
    assert main_import([str(tmp_path / "l.safetensors"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not supported, only plain LoRA" in err, err
    assert re.search(words, err), err


def test_mixed_layouts_upper_case_suffixes_and_stray_pickles(kohya_unet, both, tmp_path):
    state = dict(kohya_unet) | {"unet.extra.lora.down.weight": torch.randn(4, 8)}
    save_file(state, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(LoraFormatError, match=r"mixed layouts \(kohya and diffusers keys in one file"):
        read_lora(tmp_path / "mixed.safetensors")

    save_file(kohya_unet, str(tmp_path / "UPPER.SAFETENSORS"))  # as Windows tools name it
    assert read_lora(tmp_path / "UPPER.SAFETENSORS").source_format == "kohya"

    from training.adapter import verify_adapter

    for stray in ("model.ckpt", "model.pth", "MODEL.PT"):
        folder = tmp_path / f"with-{stray}"
        folder.mkdir()
        for f in both.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        verify_adapter(folder)
        (folder / stray).write_bytes(b"\x80\x04")
        with pytest.raises(AdapterError, match="pickle files can run code"):
            verify_adapter(folder)


def test_a_conv_locon_adapter_exports_to_kohya_and_round_trips(pipe, tiny_pipe, tiny_pipe_dir, tmp_path):
    """export-adapter crashed ("Original type None is not supported") on conv LoRA accepted on import."""
    from peft import LoraConfig

    unet = copy.deepcopy(tiny_pipe.unet)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["conv_in", "conv1", "to_q"]))
    randomise(unet, 5)
    folder = save_adapter(tmp_path / "conv", unet, AdapterMeta(base_model=str(tiny_pipe_dir)))
    out = tmp_path / "conv.safetensors"
    assert main_export([str(folder), str(out)]) == 0
    keys = load_file(str(out))
    assert keys["lora_unet_conv_in.lora_down.weight"].ndim == 4 and float(keys["lora_unet_conv_in.alpha"]) == 4.0
    back = tmp_path / "back"
    args = ["--name", "c", "--base-model", str(tiny_pipe_dir), "--out", str(back), "--no-register"]
    assert main_import([str(out), *args]) == 0
    drawn = {}
    for name, path in (("conv", folder), ("back", back)):
        load_adapter(pipe, path, adapter_name=name)
        try:
            pipe.set_adapters(name)
            drawn[name] = images(pipe)
        finally:
            pipe.delete_adapters(name)
    assert np.abs(drawn["conv"] - images(pipe)).mean() > 1.0  # the conv LoRA changes the images
    assert np.abs(drawn["back"] - drawn["conv"]).max() <= 1.0, "diffusers -> kohya -> diffusers draws the same"


SAVE_ONE = """
import copy, sys
import torch
from peft import LoraConfig
from training.adapter import AdapterMeta, save_adapter
from training.toy_world.tiny import tiny_pipeline
unet = tiny_pipeline(seed=0).unet
torch.manual_seed(0)
unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"],
                            init_lora_weights="gaussian"))
meta = save_adapter(sys.argv[1], unet, AdapterMeta(base_model="models/toy-sd", training={"tags": {"b", "a", "c"}}))
from evaluation.adapter_io import export_kohya
from training.adapter import verify_adapter
export_kohya(sys.argv[1], sys.argv[2], verify_adapter(sys.argv[1]))  # ~7 metadata keys: kohya's ss_* and ours
"""


def test_the_same_adapter_saves_to_the_same_bytes_in_any_process(tmp_path):
    """target_modules is a set in PEFT: written in hash order, the same adapter got another sha256 per process."""
    hashes = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        kohya = tmp_path / f"kohya-{seed}" / "style.safetensors"  # the same name: kohya's ss_output_name is in it
        done = subprocess.run([sys.executable, "-c", SAVE_ONE, str(tmp_path / seed), str(kohya)], env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        meta = json.loads((tmp_path / seed / META_NAME).read_text())
        assert meta["training"]["tags"] == ["a", "b", "c"]
        hashes.add((meta["sha256"], file_sha256(tmp_path / seed / META_NAME), file_sha256(kohya)))
    assert len(hashes) == 1, f"PYTHONHASHSEED 1 and 2 wrote different files: {hashes}"


def test_a_safetensors_header_in_any_key_order_becomes_the_same_bytes(tmp_path):
    """safetensors' Rust writer keeps __metadata__ in a HashMap: its order changes per process, and so did the
    sha256 of the same adapter. Two files differing only in that order become identical and still load."""
    import struct

    from safetensors import safe_open

    from training.adapter import canonical_safetensors

    data = torch.arange(6, dtype=torch.float32).numpy().tobytes()
    files = []
    for i, order in enumerate((["format", "x", "y"], ["y", "format", "x"])):
        values = {"format": "pt", "x": "1", "y": "é"}
        header = {"__metadata__": {k: values[k] for k in order}, "w": {"dtype": "F32", "shape": [2, 3],
                  "data_offsets": [0, 24]}}  # fmt: skip
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        path = tmp_path / f"{i}.safetensors"
        path.write_bytes(struct.pack("<Q", len(text)) + text + data)
        files.append(canonical_safetensors(path))
    assert files[0].read_bytes() == files[1].read_bytes()
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata() == {"format": "pt", "x": "1", "y": "é"}
        assert f.get_tensor("w").tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


@pytest.mark.parametrize(
    ("name", "words"),
    [("base", "'base' is reserved"), ("champion", "'champion' is reserved"), ("a" * 65, "the limit is 64")],
)
def test_reserved_and_too_long_names_are_refused(name, words, capsys):
    assert main_import(["nowhere.safetensors", "--name", name, "--no-register"]) == 2
    assert words in capsys.readouterr().err
