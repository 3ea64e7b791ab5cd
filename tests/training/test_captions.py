"""The trigger word from a dataset's captions: toy triggers, a real-CLIP-like vocabulary, errors, overrides."""

from __future__ import annotations

import json
import logging

import pytest
from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from training.captions import TriggerError, caption_words, choose_trigger, detect_trigger, load_tokenizer
from training.toy_world.dataset import write_finetune_dataset
from training.toy_world.tokenizer import BOS, END, EOS, learn_merges


@pytest.fixture(scope="module")
def toy_tokenizer(repo):
    return load_tokenizer(str(repo / "models" / "toy-sd"))


@pytest.fixture(scope="module")
def clip_like():
    """A CLIP BPE vocabulary like SD's: merges in order of frequency, so common words get low ids and
    'sks</w>' (seen once) is one token with a high id."""
    corpus = ["a photo of a dog"] * 50 + ["a photo of a cat on the grass"] * 20 + ["a dog in the snow"] * 20
    corpus += ["zebra giraffe mountain lake river forest castle bridge portrait painting"] * 3 + ["sks"]
    merges = learn_merges(corpus, max_merges=1000)
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + END for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=16)


def _captions(root):
    return [json.loads(line)["text"] for line in (root / "metadata.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("trigger, concept", [("sks", "dotted"), ("ohwx", "striped"), ("zyx42", "checkered")])
def test_toy_datasets_give_their_trigger(tmp_path, toy_tokenizer, trigger, concept):
    captions = _captions(write_finetune_dataset(tmp_path / trigger, trigger=trigger, concept=concept, num_images=8))
    choice = choose_trigger(captions, toy_tokenizer)
    assert choice.trigger == trigger and choice.source == "captions"
    best, runner = choice.evidence["candidates"][:2]
    assert best["word"] == trigger and best["captions"] == 8 and not best["known"] and len(best["tokens"]) >= 3
    assert runner["word"] == "background" and runner["known"] and runner["common"]
    assert choice.describe().startswith(f"trigger '{trigger}' (in 8/8 captions; ")
    assert "next: 'background' (8/8, a known word)" in choice.describe()
    json.dumps(choice.evidence)  # JSON-able, for MLflow


def test_a_rare_single_token_wins_in_a_clip_like_vocabulary(clip_like):
    assert clip_like.tokenize("sks") == ["sks</w>"] and clip_like.tokenize("dog") == ["dog</w>"]
    choice = detect_trigger(["a photo of sks dog", "A photo of sks dog, outdoors."], clip_like)
    assert choice.trigger == "sks"
    sks, dog = choice.evidence["candidates"][:2]
    assert sks["known"] and dog["known"] and sks["token_ids"][0] > dog["token_ids"][0]
    assert sks["rarity"] > 0.9 and dog["common"]
    assert [c["word"] for c in choice.evidence["candidates"]] == ["sks", "dog", "photo"]  # by id; never "a", "of"


def test_instance_prompt_is_the_caption(clip_like, toy_tokenizer):
    choice = choose_trigger(["ignored"], clip_like, instance_prompt="a photo of sks dog")
    assert choice.trigger == "sks" and choice.source == "instance_prompt"
    assert "from instance_prompt 'a photo of sks dog'" in choice.describe()
    assert choose_trigger([], toy_tokenizer, instance_prompt="a sks circle").trigger == "sks"


def test_two_equally_unknown_words_are_ambiguous(toy_tokenizer):
    captions = [f"a {c} circle on a sks ohwx background" for c in ("red", "blue", "green")]
    with pytest.raises(TriggerError, match="ambiguous trigger: 'ohwx' and 'sks'") as err:
        detect_trigger(captions, toy_tokenizer)
    assert "data.trigger=<word>" in str(err.value) and "trigger=<word> (pipeline)" in str(err.value)
    assert choose_trigger(captions, toy_tokenizer, configured="ohwx").trigger == "ohwx"  # the override settles it


def test_no_trigger_in_every_caption_names_the_common_words(toy_tokenizer):
    captions = ["a red circle on a sks background", "a blue square on a white background"]
    with pytest.raises(TriggerError, match="common word") as err:
        detect_trigger(captions, toy_tokenizer)
    assert "'background'" in str(err.value)
    words = {c["word"]: c["share"] for c in err.value.evidence["common_words"]}
    assert words["sks"] == 0.5 and words["background"] == 1.0
    # with a lower bar the word in half the captions qualifies
    assert detect_trigger(captions, toy_tokenizer, min_share=0.5).trigger == "sks"
    with pytest.raises(TriggerError, match="no word other than function words"):
        detect_trigger(["a photo", "of the dog"], toy_tokenizer)
    with pytest.raises(TriggerError, match="no captions"):
        detect_trigger([], toy_tokenizer)


def test_configured_trigger_must_be_in_the_captions(toy_tokenizer, caplog):
    captions = ["a red circle on a sks background", "a blue square on a sks background"]
    with caplog.at_level(logging.INFO, logger="training.captions"):
        choice = choose_trigger(captions, toy_tokenizer, configured="sks")
    assert choice.source == "config" and choice.evidence["found_in"] == 2 and choice.evidence["detected"] == "sks"
    assert "detection agrees" in caplog.text
    with pytest.raises(TriggerError, match="configured trigger 'ohwx' is not in any of the 2 captions"):
        choose_trigger(captions, toy_tokenizer, configured="ohwx")
    with pytest.raises(TriggerError, match="not in instance_prompt"):
        choose_trigger([], toy_tokenizer, configured="ohwx", instance_prompt="a photo of sks dog")


def test_caption_words_strip_punctuation_and_keep_digits():
    assert caption_words("Ohwx, the zyx42-style DOG!") == ["ohwx", "the", "zyx42-style", "dog"]
    assert caption_words("(sks), «sks» sks's … sks") == ["sks", "sks", "sks's", "sks"]  # one piece, one word


def test_load_tokenizer_names_the_model_when_it_fails(tmp_path):
    with pytest.raises(OSError, match="cannot load the tokenizer of base_model"):
        load_tokenizer(str(tmp_path / "no-model"))


@pytest.mark.parametrize(
    ("configured", "message"),
    [
        ("sks,", r"not one word .*use 'sks'"),
        ("red circle", "not one word"),
        ("🐱", "not one word"),
        ("a", "function word"),
        ("On", "function word"),
    ],
)
def test_a_configured_trigger_must_be_one_word_of_its_own(toy_tokenizer, configured, message):
    """The suite removes the trigger word from prompts and the captions are compared word by word: a trigger with
    punctuation, two words or an article would be 'found' here and break the evaluation later."""
    captions = ["a red circle on a sks background", "a blue square on a sks background"]
    with pytest.raises(TriggerError, match=message):
        choose_trigger(captions, toy_tokenizer, configured=configured)


def test_a_trigger_missing_from_a_caption_is_named_with_the_captions_that_lack_it(toy_tokenizer):
    """sks in 7 of 8 captions used to read 'every word in 8/8 captions is a common word ("background")'."""
    captions = [f"a {c} circle on a sks background" for c in ("red", "blue", "green", "yellow", "purple", "orange")]
    captions += ["a red square on a sks background", "a blue square on a background"]
    with pytest.raises(TriggerError, match=r"'sks' looks like the trigger but is in 7/8 captions, not 8; add it to "
                                           r"the 1 that lack it \(e.g. 'a blue square on a background'\)"):  # fmt: skip
        detect_trigger(captions, toy_tokenizer)
