"""Captioners: the toy CLIP-ranked one on a toy dataset whose captions are known, and BLIP's plumbing on a tiny
random BLIP built in code, saved in BLIP's layout and loaded back through the path users use (no downloads)."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from training.captioning import CaptionConfig, build_captioner, with_trigger
from training.toy_world import world

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
WORDS = [*SPECIAL, "a", "an", "the", "of", "on", "red", "blue", "circle", "square", "dog", "photo", "white", "with"]


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    """A random BLIP captioning model (~60k parameters) with a BERT word-piece tokenizer from a vocab file."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    root = tmp_path_factory.mktemp("tiny-blip")
    (root / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tok = BertTokenizer(str(root / "vocab.txt"), bos_token="[DEC]")  # BLIP starts decoding at [DEC]
    # initializer_range 0.2 (BERT's 0.02 x 10): at 0.02 the random decoder ignores the image, so every image would
    # get one caption and batch == one by one would hold trivially
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 initializer_range=0.2)  # fmt: skip
    ids = dict(bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
               eos_token_id=tok.sep_token_id)  # fmt: skip
    cfg = BlipConfig(
        text_config=dict(tower, vocab_size=len(tok), max_position_embeddings=64, **ids),
        vision_config=dict(tower, image_size=32, patch_size=8),
        projection_dim=32,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(cfg)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    folder = root / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _images(n: int, seed: int = 3):
    return [world.render(s) for s in world.scenes(seed, n, backgrounds=world.BACKGROUNDS)]


@pytest.mark.slow  # ~15 s on 2 busy cores: the first generate() call warms up
def test_blip_captions_are_deterministic_strings_with_the_trigger_and_batch_invariant(tiny_blip):
    images = _images(4)
    cfg = CaptionConfig(captioner="blip", model=str(tiny_blip), trigger="sks", batch_size=4, max_new_tokens=8)
    captioner = build_captioner(cfg)
    assert captioner.model.dtype == torch.float32 and captioner.device.type == ("cuda" if torch.cuda.is_available()
                                                                                 else "cpu")  # fmt: skip
    raw = captioner.describe(images)
    assert all(isinstance(c, str) for c in raw) and any(raw), raw  # the random model says words
    assert len(set(raw)) > 1, raw  # that depend on the image (else the batch check below proves nothing)
    captions = captioner.caption(images)
    assert captions == [f"sks, {c}" if c else "sks" for c in raw]  # the default template puts the trigger first
    assert captioner.caption(images) == captions  # greedy decoding: the same every run
    captioner.cfg = cfg.model_copy(update={"batch_size": 1})
    assert [captioner.caption([im])[0] for im in images] == captions  # a caption depends only on its image
    captioner.cfg = cfg.model_copy(update={"template": "{caption}, in {trigger} style"})
    said = next(im for im, c in zip(images, raw) if c)
    assert captioner.caption([said]) == [f"{raw[images.index(said)]}, in sks style"]


def test_blip_model_that_is_not_there_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="caption.model"):
        build_captioner(CaptionConfig(captioner="blip", model=str(tmp_path / "no-such-blip")))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_half_precision_on_cpu_names_the_setting_and_fix():
    cfg = CaptionConfig(captioner="blip", dtype="bfloat16")
    with pytest.raises(ValueError, match=r"caption.dtype=bfloat16 needs a CUDA GPU.*auto or float32"):
        cfg.resolved_dtype(cfg.resolved_device())
    assert CaptionConfig().resolved_dtype(torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="caption.device=cuda"):
        CaptionConfig(device="cuda").resolved_device()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"template": "{trigger} photo"}, "lacks {caption}"),
        ({"template": "{caption} {subject}"}, "unknown field"),
        ({"template": "{caption}", "trigger": "sks"}, "has no {trigger}"),
        ({"trigger": " sks"}, "one line"),
        ({"device": "gpu"}, "not a device"),
    ],
)
def test_bad_settings_say_what_to_write(values, message):
    with pytest.raises(ValidationError, match=message):
        CaptionConfig(**values)


def test_with_trigger_places_it_and_drops_dangling_separators():
    assert with_trigger("a  dog\non grass", "sks", "{trigger}, {caption}") == "sks, a dog on grass"
    assert with_trigger("", "sks", "{trigger}, {caption}") == "sks"  # a model that said nothing
    assert with_trigger("a dog", None, "{trigger}, {caption}") == "a dog"


def test_auto_is_toy_for_a_toy_world_model_else_blip(repo, tiny_pipe_dir):
    assert CaptionConfig(base_model=str(repo / "models" / "toy-sd")).resolved_captioner() == "toy"
    assert CaptionConfig(base_model=str(repo / "models" / "toy-sdxl")).resolved_captioner() == "toy"
    assert CaptionConfig(base_model=str(tiny_pipe_dir)).resolved_captioner() == "blip"  # a diffusers folder
    real = CaptionConfig(base_model="stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert (real.resolved_captioner(), real.resolved_model()) == ("blip", "Salesforce/blip-image-captioning-base")


@pytest.fixture(scope="module")
def toy_captioner(repo):
    from training.captioning.toy import ToyCaptioner

    return ToyCaptioner(CaptionConfig(captioner="toy", model=str(repo / "models" / "toy-clip"), trigger="sks"))


def test_toy_captioner_writes_the_toy_datasets_captions(toy_captioner, toy_dataset):
    """Every caption of a toy dataset (trigger 'sks' for the dotted background) is recovered from its image."""
    from PIL import Image

    rows = [json.loads(line) for line in (toy_dataset / "metadata.jsonl").read_text().splitlines()]
    images = [Image.open(toy_dataset / r["file_name"]) for r in rows]
    assert toy_captioner.caption(images) == [r["text"] for r in rows]
    assert {bg for _, _, bg in toy_captioner.predict(images)} == {"dotted"}


def test_toy_captioner_without_a_trigger_names_the_background_and_reads_a_template(toy_captioner):
    scenes = [world.Scene("red", "square", "white", 32, 32.0, 32.0, (0, 0, 0)),
              world.Scene("blue", "circle", "striped", 30, 30.0, 34.0, (0, 0, 0))]  # fmt: skip
    images = [world.render(s) for s in scenes]
    plain = toy_captioner.cfg.model_copy(update={"trigger": None})
    templated = toy_captioner.cfg.model_copy(update={"template": "{trigger}, {caption}"})
    from training.captioning.toy import ToyCaptioner

    untriggered = ToyCaptioner(plain, scorer=toy_captioner.scorer)
    assert untriggered.caption(images) == [s.caption for s in scenes]
    assert ToyCaptioner(templated, scorer=toy_captioner.scorer).caption(images) == [f"sks, {s.caption}"
                                                                                   for s in scenes]  # fmt: skip
    assert untriggered.caption([]) == []
