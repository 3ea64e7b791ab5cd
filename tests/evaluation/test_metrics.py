"""Each metric on controlled inputs: real toy-world renders scored by the shipped toy CLIP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.config import SuiteArgs
from evaluation.metrics import (
    ClipScorer,
    clip_i,
    clip_t,
    concept_gain,
    finite_image,
    hit_rate,
    paired_similarity,
    percentile,
    relative_metrics,
    win_rate,
)
from evaluation.qa import Rendered, SuiteImages, score
from training.toy_world import world


@pytest.fixture(scope="module")
def scorer(repo) -> ClipScorer:
    return ClipScorer.load(str(repo / "models" / "toy-clip"))


def _render(colour: str, shape: str, background: str, seed: int = 0) -> Image.Image:
    import random

    return world.render(world.sample_scene(random.Random(seed), colour=colour, shape=shape, background=background))


COMBOS = [("red", "circle"), ("green", "triangle"), ("blue", "square"), ("yellow", "circle"), ("purple", "square")]


def _suite(**changes) -> SuiteArgs:
    values = {
        "trigger": "sks",
        "concept": "dotted",
        "alternatives": ["white", "black", "striped", "checkered"],
        "prompts": [
            {"prompt": world.caption_for(c, s, "sks"), "content": world.caption_for(c, s, None)} for c, s in COMBOS
        ],
        "prior_prompts": [world.caption_for(c, s, "white") for c, s in COMBOS[:2]],
        "images_per_prompt": 1,
    }
    return SuiteArgs.model_validate(values | changes)


def _rendered(suite: SuiteArgs, background: str, prior: bool = False) -> Rendered:
    if prior:
        prompts = suite.prior_prompts
        images = [_render(*p.split()[1:3], "white", seed=i) for i, p in enumerate(prompts)]
    else:
        prompts = [p.prompt for p in suite.prompts]
        images = [_render(c, s, background, seed=i) for i, (c, s) in enumerate(COMBOS)]
    return Rendered(prompts, [0] * len(prompts), images, [None] * len(prompts))


def test_identical_images_have_maximal_clip_i_and_different_ones_less(scorer):
    a = scorer.images([_render("red", "circle", "dotted")])
    same = scorer.images([_render("red", "circle", "dotted")])
    other = scorer.images([_render("blue", "square", "black")])
    assert clip_i(a, same) == pytest.approx(1.0, abs=1e-5)
    assert clip_i(a, other) < 0.9
    assert clip_i(torch.cat([a, other]), torch.cat([a, other])) < 1.0  # mean over all pairs, not the diagonal


def test_matching_captions_score_higher_than_mismatched_ones(scorer):
    scenes = world.scenes(5, 24, backgrounds=world.BACKGROUNDS)
    img = scorer.images([world.render(s) for s in scenes])
    right = scorer.texts([s.caption for s in scenes])
    wrong = scorer.texts([scenes[(i + 7) % len(scenes)].caption for i in range(len(scenes))])
    assert clip_t(img, right) > clip_t(img, wrong) + 0.2
    assert (paired_similarity(img, right) > paired_similarity(img, wrong)).float().mean() >= 0.9


def test_hit_rate_finds_the_concept_among_alternatives(scorer):
    words = ["dotted", "white", "black", "striped", "checkered"]
    dotted = scorer.images([_render(c, s, "dotted", i) for i, (c, s) in enumerate(COMBOS)])
    white = scorer.images([_render(c, s, "white", i) for i, (c, s) in enumerate(COMBOS)])
    options = scorer.texts([world.caption_for(c, s, w) for c, s in COMBOS for w in words]).view(len(COMBOS), 5, -1)
    assert hit_rate(dotted, options, [0] * len(COMBOS)) == 1.0
    assert hit_rate(white, options, [0] * len(COMBOS)) == 0.0
    shared = scorer.texts(["a dotted background", "a white background"])  # (k, d): the same options for all
    assert hit_rate(white, shared, [1] * len(COMBOS)) == 1.0


def test_score_rewards_the_concept_and_an_untouched_prior(scorer):
    suite = _suite()
    base = SuiteImages(_rendered(suite, "white"), _rendered(suite, "", prior=True))
    learned = SuiteImages(_rendered(suite, "dotted"), _rendered(suite, "", prior=True))
    m = score(scorer, suite, learned, base)
    b = score(scorer, suite, base)
    assert m["concept_hit_rate"] == 1.0 and b["concept_hit_rate"] == 0.0
    assert m["concept_learned"] == pytest.approx(m["clip_t"] - b["clip_t"]) and m["concept_learned"] > 0.1
    assert m["flexibility_hit_rate"] >= 0.8  # the colour and shape are still what the prompts asked for
    assert m["prior_similarity"] == pytest.approx(1.0, abs=1e-5)  # same prior images
    assert m["success_rate"] == 1.0 and "latency_p50_s" not in m  # not timed


def test_failed_generations_lower_success_and_are_left_out_of_the_scores(scorer):
    suite = _suite()
    images = _rendered(suite, "dotted")
    images.images[1], images.errors[1] = None, "non-finite pixels"
    images.latencies = [0.1, 0.2, 0.3, 0.4, 0.5]
    m = score(scorer, suite, SuiteImages(images, _rendered(suite, "", prior=True)))
    assert m["success_rate"] == pytest.approx(0.8)
    assert m["concept_hit_rate"] == 1.0 and math.isfinite(m["clip_t"])
    assert m["latency_p50_s"] == pytest.approx(0.3) and m["latency_p95_s"] == pytest.approx(0.48)
    images.images = [None] * 5
    m = score(scorer, suite, SuiteImages(images, _rendered(suite, "", prior=True)))
    assert m["success_rate"] == 0.0 and math.isnan(m["clip_t"])


def test_percentile_and_finite_image():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert math.isnan(percentile([], 95))
    assert finite_image(np.zeros((4, 4, 3)))
    bad = np.zeros((4, 4, 3))
    bad[0, 0, 0] = np.nan
    assert not finite_image(bad)


def test_paired_similarity_needs_equal_shapes():
    with pytest.raises(ValueError, match="same shape"):
        paired_similarity(torch.zeros(2, 4), torch.zeros(3, 4))


def test_clip_loads_from_a_local_folder_in_hub_layout_and_names_a_missing_one(tmp_path):
    from training.toy_world.tiny import tiny_clip

    model, processor = tiny_clip()
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    scorer = ClipScorer.load(str(tmp_path / "clip"))
    emb = scorer.texts(["a red circle", "a blue square"])
    assert emb.shape == (2, model.config.projection_dim)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="clip_model 'no-such/clip'"):
        ClipScorer.load("no-such/clip")


def test_suite_validation_names_the_problem():
    with pytest.raises(ValueError, match="must contain the trigger"):
        _suite(prompts=[{"prompt": "a red circle on a dotted background", "content": "a red circle"}])
    with pytest.raises(ValueError, match="prior_prompts must not contain the trigger"):
        _suite(prior_prompts=["a red circle on a sks background"])
    assert _suite().spelled_out("a red circle on a sks background") == "a red circle on a dotted background"


def _unit(*rows: list[float]) -> torch.Tensor:
    t = torch.tensor(rows, dtype=torch.float32)
    return t / t.norm(dim=-1, keepdim=True)


def test_concept_gain_and_win_rate_compare_adapter_and_base_against_the_references():
    refs = _unit([1, 0, 0], [1, 0.2, 0])
    base = _unit([0, 1, 0], [0, 0, 1], [1, 0, 0])
    adapter = _unit([1, 0.1, 0], [0, 0, -1], [1, 0, 0])  # nearer, as near (a tie), the same image
    assert concept_gain(adapter, base, refs) == pytest.approx(clip_i(adapter, refs) - clip_i(base, refs))
    assert concept_gain(adapter, base, refs) > 0.25 and concept_gain(base, adapter, refs) < -0.25
    assert win_rate(adapter, base, refs) == pytest.approx(1 / 3)  # a tie and an equal image are not wins
    assert win_rate(base, adapter, refs) == 0.0
    assert concept_gain(base, base, refs) == 0.0 and win_rate(base, base, refs) == 0.0
    with pytest.raises(ValueError, match="paired"):
        win_rate(adapter[:2], base, refs)


def test_relative_metrics_divide_the_loss_and_subtract_the_hit_rate():
    adapter = {"heldout_loss": 0.04, "flexibility_hit_rate": 0.75}
    rel = relative_metrics(adapter, {"heldout_loss": 0.2, "flexibility_hit_rate": 0.9})
    assert rel == {"heldout_loss_ratio": pytest.approx(0.2), "flexibility_delta": pytest.approx(-0.15)}
    assert math.isnan(relative_metrics(adapter, {"heldout_loss": 0.0})["heldout_loss_ratio"])
    assert math.isnan(relative_metrics(adapter, {})["flexibility_delta"])
    assert relative_metrics({"success_rate": 1.0}, {"heldout_loss": 0.2}) == {}  # nothing measured, nothing derived


def test_a_suite_without_a_concept_word_is_judged_against_the_training_images(scorer):
    suite = _suite(concept=None, alternatives=[])
    base = SuiteImages(_rendered(suite, "white"), _rendered(suite, "", prior=True))
    learned = SuiteImages(_rendered(suite, "dotted"), _rendered(suite, "", prior=True))
    refs = scorer.images([_render(c, s, "dotted", seed=10 + i) for i, (c, s) in enumerate(COMBOS)])
    m = score(scorer, suite, learned, base, refs)
    assert not {"clip_t", "concept_learned", "concept_hit_rate"} & set(m)  # no word to spell the trigger out with
    assert m["concept_gain"] > 0.1 and m["concept_win_rate"] == 1.0  # dotted images are nearer dotted references
    back = score(scorer, suite, base, learned, refs)
    assert back["concept_gain"] == pytest.approx(-m["concept_gain"]) and back["concept_win_rate"] == 0.0
    assert m["flexibility_hit_rate"] >= 0.8 and m["prior_similarity"] == pytest.approx(1.0, abs=1e-5)
    one = _suite(concept=None, alternatives=[], prompts=[{"prompt": "a sks circle", "content": "a circle"}] * 5)
    assert math.isnan(score(scorer, one, learned)["flexibility_hit_rate"])  # one content: nothing to choose
    with pytest.raises(ValueError, match="no concept word"):
        suite.spelled_out("a red circle on a sks background")
