import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline


def _image(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    return np.asarray(pipe("a red circle on a sks background", num_inference_steps=2, generator=g).images[0])


def test_tiny_pipeline_is_tiny_and_makes_64px_images(tiny_pipe):
    params = sum(p.numel() for p in tiny_pipe.unet.parameters())
    assert params < 500_000
    assert _image(tiny_pipe).shape == (64, 64, 3)


def test_save_load_round_trip_gives_the_same_images(tiny_pipe, tiny_pipe_dir):
    again = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    again.set_progress_bar_config(disable=True)
    assert np.array_equal(_image(tiny_pipe), _image(again))


def test_tiny_clip_scores_with_the_same_helpers():
    from evaluation.toy_metrics import clip_similarity
    from training.toy_world import world
    from training.toy_world.tiny import tiny_clip

    clip, processor = tiny_clip()
    sim = clip_similarity(clip, processor, [world.render(s) for s in world.scenes(0, 3)], ["a red circle", "a dot"])
    assert sim.shape == (3, 2) and torch.all(sim.abs() <= 1.0001)


def test_load_pipeline_takes_a_local_snapshot_like_a_hub_id(tiny_pipe, tiny_pipe_dir):
    from training.families import load_pipeline
    from training.sampling import generate

    pipe = load_pipeline(str(tiny_pipe_dir))
    assert pipe.device.type == "cpu" and pipe.unet.dtype == torch.float32
    a = generate(pipe, ["a red circle", "a blue square"], seed=5, steps=2, batch_size=1)
    b = generate(pipe, ["a red circle", "a blue square"], seed=5, steps=2, batch_size=2)
    for x, y in zip(a, b):  # seed per image, not per batch (batched BLAS may differ by a rounding step)
        assert np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max() <= 2


def test_load_pipeline_explains_an_unreachable_hub_id(tmp_path):
    from training.families import load_pipeline

    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        load_pipeline("lorafleet-tests/no-such-model")
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        load_pipeline(tmp_path)


@pytest.mark.gpu
def test_load_pipeline_uses_fp16_on_cuda(tiny_pipe_dir):
    from training.families import load_pipeline

    pipe = load_pipeline(tiny_pipe_dir)
    assert pipe.device.type == "cuda" and pipe.unet.dtype == torch.float16
