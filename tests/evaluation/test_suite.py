"""A suite built from a dataset's captions: trigger prompts, content swaps, contents and prior prompts; and the
config it completes (trigger, suite, registered model name) before anything is rendered."""

from __future__ import annotations

import itertools

import pytest

from evaluation.config import EvalConfig
from evaluation.suite import build_suite, content_swaps, default_model_name, materialise, without_trigger
from training.configuration import ConfigError, load_config
from training.toy_world import world


def _toy_captions(trigger: str) -> tuple[list[str], list[str]]:
    """The toy dataset's captions: 12 colour x shape combinations for training (repeated), 6 held out."""
    combos = list(itertools.product(world.COLOURS, world.SHAPES))
    held = [world.caption_for(c, s, trigger) for c, s in combos[::3]]
    train = [world.caption_for(c, s, trigger) for i, (c, s) in enumerate(combos) if i % 3] * 2
    return train, held


def test_toy_captions_give_held_out_prompts_then_every_other_combination():
    train, held = _toy_captions("ohwx")
    suite = build_suite(train, held, "ohwx")
    prompts = [p.prompt for p in suite.prompts]
    assert prompts[:6] == held  # the held-out captions first, in their order
    assert len(prompts) == 18 and len(set(prompts)) == 18  # then swaps: all 18 combinations, none twice
    assert set(prompts) == {world.caption_for(c, s, "ohwx") for c in world.COLOURS for s in world.SHAPES}
    assert suite.concept is None and suite.alternatives == [] and suite.images_per_prompt == 2
    red = next(p for p in suite.prompts if p.prompt == "a red circle on an ohwx background")
    assert red.content == "a red circle on a background"  # the trigger removed, its article fixed
    assert suite.prior_prompts == [without_trigger(h, "ohwx") for h in held]
    assert all("ohwx" not in p.split() for p in suite.prior_prompts + [p.content for p in suite.prompts])


def test_swaps_change_one_slot_fix_articles_and_prefer_unseen_combinations():
    train = [
        "a red circle on a sks background",
        "a blue square on a sks background",
        "a red square on a sks background",
    ]
    swaps = content_swaps(train, "sks")
    assert swaps[0] == "a blue circle on a sks background"  # the one unseen combination comes first
    assert sorted(swaps[1:]) == sorted(train)  # then seen ones, each once
    orange = content_swaps(["a red circle on a sks background", "an orange square on a sks background"], "sks")
    assert sorted(orange) == ["a red square on a sks background", "an orange circle on a sks background"]
    assert content_swaps(train, "sks", avoid={("blue", "circle", "on", "sks", "background")})[0] != swaps[0]
    assert content_swaps(train, "sks", seed=3) == content_swaps(train, "sks", seed=3)  # deterministic


def test_a_photo_caption_set_swaps_the_place_words_but_not_the_prepositions():
    train = ["a photo of sks dog on the beach", "a photo of sks dog in the snow"]
    suite = build_suite(train, [], "sks", images_per_prompt=1)
    prompts = [p.prompt for p in suite.prompts]
    assert prompts[:2] == train  # no held-out captions: the training captions are the trigger prompts
    assert set(prompts[2:]) == {"a photo of sks dog on the snow", "a photo of sks dog in the beach"}
    assert [p.content for p in suite.prompts[:2]] == ["a photo of dog on the beach", "a photo of dog in the snow"]
    assert suite.prior_prompts == ["a photo of dog on the beach", "a photo of dog in the snow"]
    three_slots = ["a sks dog on a red chair indoors", "a sks dog under a blue chair outdoors"]
    swapped = content_swaps(three_slots, "sks")
    assert len(swapped) == 4  # red/blue and indoors/outdoors swapped in each caption; on/under are not a slot
    assert "a sks dog under a red chair indoors" not in swapped and "a sks dog on a blue chair outdoors" not in swapped


def test_captions_without_a_common_template_give_no_swaps():
    captions = ["sks dog", "a photo of sks dog sleeping", "A painting of sks dog, in oil."]
    suite = build_suite(captions, [], "sks")
    assert [p.prompt for p in suite.prompts] == captions
    assert [p.content for p in suite.prompts] == ["dog", "a photo of dog sleeping", "A painting of dog, in oil."]
    assert build_suite(["a photo of sks dog"], [], "sks").prompts[0].content == "a photo of dog"  # DreamBooth


def test_max_prompts_keeps_room_for_swaps_and_is_seeded():
    train, held = _toy_captions("sks")
    suite = build_suite(train, held, "sks", max_prompts=4, seed=5)
    prompts = [p.prompt for p in suite.prompts]
    assert len(prompts) == 4 and sum(p in held for p in prompts) == 2  # half held-out captions, half swaps
    assert prompts == [p.prompt for p in build_suite(train, held, "sks", max_prompts=4, seed=5).prompts]
    assert len(suite.prior_prompts) == 2


def test_no_caption_with_the_trigger_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"trigger 'ohwx' is in none of the dataset's 2 captions: set trigger="):
        build_suite(["a red circle on a sks background"], ["a blue square"], "ohwx")
    with pytest.raises(ValueError, match="the trigger alone"):
        build_suite(["sks"], [], "sks")


def test_without_trigger_fixes_the_article_and_keeps_punctuation():
    assert without_trigger("an ohwx background", "ohwx") == "a background"
    assert without_trigger("a photo of sks, a dog", "sks") == "a photo of, a dog"
    assert without_trigger("An sks apple", "sks") == "An apple"


def _config(repo, data, *overrides):
    values = [f"data.train_path={data}", f"data.heldout_path={data / 'heldout'}", "mlflow.enabled=false",
              "registry.enabled=false", *overrides]  # fmt: skip
    return load_config(EvalConfig, repo / "configs" / "eval.yaml", values)


@pytest.fixture(scope="module")
def ohwx_data(tmp_path_factory):
    from training.toy_world.dataset import write_finetune_dataset

    return write_finetune_dataset(tmp_path_factory.mktemp("data") / "My ohwx set", trigger="ohwx", concept="striped")


def test_materialise_builds_the_suite_and_names_the_model_after_the_dataset(repo, ohwx_data):
    cfg = _config(repo, ohwx_data, "registry.enabled=true", "mlflow.enabled=true")
    assert cfg.suite is None and cfg.registry.model_name is None
    with pytest.raises(ValueError, match="materialise"):
        cfg.comparable_key()
    done = materialise(cfg, "ohwx")
    assert done.trigger == "ohwx" and done.registry.model_name == "My-ohwx-set-lora"
    assert len(done.suite.prompts) == 18 and done.suite.trigger == "ohwx" and done.suite.concept is None
    assert done.comparable_key() == materialise(cfg, "ohwx").comparable_key()
    # the scorer in a job's unpacked copy of the project is the same scorer: `promote` on the laptop compares with
    # the pipeline's evaluation instead of re-evaluating the champion
    job_copy = "/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_0a1b/models/toy-clip"
    assert done.model_copy(update={"clip_model": job_copy}).comparable_key() == done.comparable_key()
    assert materialise(_config(repo, ohwx_data, "auto_suite.max_prompts=6"), "ohwx").comparable_key() != (
        done.comparable_key()
    )


def test_the_trigger_comes_from_the_config_else_the_adapter_else_an_error(repo, ohwx_data):
    assert materialise(_config(repo, ohwx_data, "trigger=ohwx"), None).suite.trigger == "ohwx"
    with pytest.raises(ConfigError, match="trigger='ohwx' but the adapter was trained with 'sks'"):
        materialise(_config(repo, ohwx_data, "trigger=ohwx"), "sks")
    with pytest.raises(ConfigError, match=r"no trigger word: set trigger=<word>.*lorafleet_adapter.json"):
        materialise(_config(repo, ohwx_data), None)
    with pytest.raises(ConfigError, match="trigger 'sks' is in none of the dataset's"):
        materialise(_config(repo, ohwx_data), "sks")


def test_a_gate_the_suite_cannot_measure_is_refused_when_the_config_loads(repo, ohwx_data):
    with pytest.raises(ConfigError) as err:
        _config(repo, ohwx_data, "gate.checks.concept_hit_rate={min: 0.75}", "gate.primary_metric=clip_t")
    text = str(err.value)
    assert "gate.checks.concept_hit_rate needs a concept word (a suite built from the dataset has none)" in text
    assert "gate.primary_metric=clip_t needs a concept word" in text
    with pytest.raises(ConfigError, match="gate.checks.heldout_loss_ratio needs held-out images: data.heldout_path"):
        _config(repo, ohwx_data, "data.heldout_path=null")
    with pytest.raises(ConfigError, match="suite: null builds the suite from the dataset's captions"):
        _config(repo, ohwx_data, "data.train_path=null", "gate.checks={}", "gate.beat_champion=false")


def test_a_gate_the_built_suite_cannot_measure_fails_at_run_time(repo, tmp_path):
    import json

    from PIL import Image

    data = tmp_path / "same"
    data.mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(data / f"{i}.png")
    (data / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": "a photo of sks"}) + "\n"
                                                 for i in range(4)))  # fmt: skip
    cfg = load_config(EvalConfig, repo / "configs" / "eval.yaml",
                      [f"data.train_path={data}", "data.heldout_path=null", "mlflow.enabled=false",
                       "registry.enabled=false", "gate.checks={flexibility_delta: {min: -0.1}}"])  # fmt: skip
    with pytest.raises(ConfigError, match="flexibility_delta needs at least 2 different prompt contents"):
        materialise(cfg, "sks")


def test_default_model_name_is_the_folder_name_slugified():
    assert default_model_name("data/toy-sks/") == "toy-sks-lora"
    assert default_model_name("s3://bucket/datasets/My Cats") == "My-Cats-lora"
    assert default_model_name("gs://bucket/ohwx") == "ohwx-lora"


def test_without_a_held_out_folder_the_images_training_held_out_are_the_held_out_set(tmp_path, repo):
    """A user's folder has no heldout/: the pipeline trains with validation.holdout=N, and the evaluation takes
    the same N images out (its loss, its prompts), never scoring the adapter on images it trained on."""
    from evaluation.config import DataArgs
    from evaluation.suite import dataset_split
    from training.heldout import split_holdout
    from training.toy_world.dataset import write_finetune_dataset

    data = write_finetune_dataset(tmp_path / "mine", trigger="ohwx", concept="striped", num_images=10)
    train, held = dataset_split(DataArgs(train_path=str(data), holdout=2))
    assert (len(train), len(held)) == (8, 2)
    from training.config import DataConfig
    from training.data import validate_dataset

    every = validate_dataset(DataConfig(path=str(data))).examples
    assert [e.path for e in held] == [e.path for e in split_holdout(every, 2)[1]]  # the same images training holds
    overrides = [f"data.train_path={data}", "data.heldout_path=null", "data.holdout=2"]
    cfg = load_config(EvalConfig, repo / "configs" / "eval.yaml", overrides)
    built = materialise(cfg, "ohwx")
    assert [p.prompt for p in built.suite.prompts][:2] == [e.caption for e in held]  # its prompts come first
    assert built.registry.model_name == "mine-lora"


def test_auto_suite_concept_gives_the_built_suite_its_concept_word(repo, ohwx_data):
    """A fine-tuning job's `concept` extra: the suite built from the captions spells the trigger out, so the
    concept-word metrics can be measured (and gated)."""
    cfg = _config(repo, ohwx_data, "auto_suite.concept=striped", "gate.checks.clip_t={min: 0.0}")
    suite = materialise(cfg, "ohwx").suite
    assert suite.concept == "striped" and suite.spelled_out("a red circle on a ohwx background") == (
        "a red circle on a striped background"
    )
    assert materialise(_config(repo, ohwx_data), "ohwx").suite.concept is None
    with pytest.raises(ConfigError, match="gate.checks.clip_t needs a concept word.*set auto_suite.concept"):
        _config(repo, ohwx_data, "gate.checks.clip_t={min: 0.0}")
    with pytest.raises(ConfigError, match="gate.checks.concept_hit_rate needs suite.alternatives"):
        _config(repo, ohwx_data, "auto_suite.concept=striped", "gate.checks.concept_hit_rate={min: 0.5}")
    with pytest.raises(ConfigError, match="auto_suite.concept='striped' but suite.concept='dotted'"):
        load_config(EvalConfig, repo / "configs" / "eval-toy-sks.yaml", ["auto_suite.concept=striped"])
