"""The shipped toy world loads exactly like a hub model, offline, and behaves."""

import os

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPModel, CLIPProcessor

from evaluation.metrics import retrieval_accuracy
from evaluation.toy_metrics import clip_similarity
from training.toy_world import world


@pytest.fixture(scope="module")
def toy_sd(repo):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    pipe = StableDiffusionPipeline.from_pretrained(repo / "models" / "toy-sd")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def toy_clip(repo):
    path = repo / "models" / "toy-clip"
    return CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)


def test_layout_and_size(repo):
    sd = repo / "models" / "toy-sd"
    for part in ["model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"]:
        assert (sd / part).exists(), part
    # toy-sd + toy-clip: the design's 30 MB; models/toy-sdxl has its own 15 MB (tests/training/test_toy_sdxl.py)
    original = [repo / "models" / "toy-sd", repo / "models" / "toy-clip"]
    total = sum(f.stat().st_size for d in original for f in d.rglob("*") if f.is_file())
    assert total <= 30 * 1024 * 1024
    assert not list((repo / "models").rglob("*.bin")), "weights must be safetensors only"


def test_two_step_generation_is_64px_and_seeded(toy_sd):
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return toy_sd("a red circle on a white background", num_inference_steps=2, generator=g).images[0]

    a, b, c = run(0), run(0), run(1)
    assert a.size == (64, 64)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_weights_are_fp32_on_cpu(toy_sd):
    assert toy_sd.unet.dtype == torch.float32 and toy_sd.text_encoder.dtype == torch.float32


def test_trigger_is_not_unk_in_the_pipeline_tokenizer(toy_sd):
    tok = toy_sd.tokenizer
    ids = tok("a red circle on a sks background").input_ids
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle on a sks background"


def test_text_encoder_is_the_clip_text_tower(toy_sd, toy_clip):
    clip, processor = toy_clip
    ids = toy_sd.tokenizer(["a blue square on a black background"], return_tensors="pt").input_ids
    with torch.no_grad():
        a = toy_sd.text_encoder(ids).last_hidden_state
        b = clip.text_model(ids).last_hidden_state
    torch.testing.assert_close(a, b)


def test_clip_prefers_matching_captions(toy_clip):
    clip, processor = toy_clip
    captions = world.base_captions()
    scenes = world.scenes(99, 36)
    sim = clip_similarity(clip, processor, [world.render(s) for s in scenes], captions)
    assert retrieval_accuracy(sim, [captions.index(s.caption) for s in scenes]) >= 0.9
    # and a mismatched caption always scores below the matching one
    for i, s in enumerate(scenes):
        wrong = captions.index(world.caption_for(s.colour, s.shape, "black" if s.background == "white" else "white"))
        assert sim[i, captions.index(s.caption)] > sim[i, wrong]


def test_clip_knows_patterns_the_generator_never_saw(toy_clip):
    clip, processor = toy_clip
    options = [world.caption_for(None, None, b) for b in world.BACKGROUNDS]
    scenes = world.scenes(98, 30, world.PATTERNS)
    sim = clip_similarity(clip, processor, [world.render(s) for s in scenes], options)
    assert retrieval_accuracy(sim, [world.BACKGROUNDS.index(s.background) for s in scenes]) >= 0.9


@pytest.mark.slow
def test_base_model_draws_what_is_asked(repo):
    """A reduced quality bar (36 prompts, one per caption) on the shipped weights."""
    from evaluation.toy_quality import generator_fidelity

    fid, _, _ = generator_fidelity(str(repo / "models" / "toy-sd"), prompts_per_caption=1, steps=20, guidance=4.0)
    assert fid["colour_accuracy"] >= 0.85, fid["failures"]
    assert fid["shape_accuracy"] >= 0.70, fid["failures"]
