import pytest
from transformers import CLIPTokenizer

from training.toy_world import world
from training.toy_world.clip import caption_table
from training.toy_world.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer([world.caption_for(*a) for a in caption_table()], 32)


def test_every_world_word_is_one_token(tok):
    words = {w for c in world.base_captions() for w in c.split()} | set(world.PATTERNS)
    for w in words:
        assert len(tok.tokenize(w)) == 1, w


@pytest.mark.parametrize("trigger", ["sks", "ohwx", "zyx42", "Café", "🙂"])
def test_any_trigger_gets_real_tokens_not_unk(tok, trigger):
    ids = tok(f"a red circle on a {trigger} background").input_ids
    body = ids[1:-1]
    assert tok.unk_token_id not in body and tok.eos_token_id not in body
    # like OpenAI CLIP's, the pre-tokenizer splits digits off ("zyx42" -> "zyx 4 2")
    assert trigger.lower() in tok.decode(ids, skip_special_tokens=True).replace(" ", "")


def test_trigger_ids_differ_from_world_words(tok):
    sks = tok("sks", add_special_tokens=False).input_ids
    dotted = tok("dotted", add_special_tokens=False).input_ids
    assert sks and sks != dotted


def test_round_trip_through_disk(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    text = "a purple triangle on a sks background"
    assert again(text).input_ids == tok(text).input_ids
    assert again.model_max_length == 32


def test_bpe_is_deterministic():
    corpus = world.base_captions()
    assert build_tokenizer(corpus, 16).get_vocab() == build_tokenizer(corpus, 16).get_vocab()
