"""A dataset's evaluation suite, built from its captions: no concept word, no hand-written prompts.

    suite = build_suite(train_captions, heldout_captions, "ohwx")
    suite.prompts[0].prompt   # 'a green triangle on an ohwx background' (a held-out caption)
    suite.prompts[0].content  # 'a green triangle on a background' (the trigger removed, the article fixed)
    cfg = materialise(cfg, adapter_trigger="ohwx")      # the EvalConfig with its suite, trigger and model name

- trigger prompts: the held-out captions (the training captions when there are none) — what the adapter
  must draw; the concept is judged against the training images relative to the base model (concept_gain);
- content swaps: a caption with one word replaced by another word seen in the same place of a caption of
  the same template (``a red circle on an ohwx background`` -> ``a blue circle …``, ``a red triangle …``),
  combinations absent from the training captions first: does the content survive the trigger?
- each prompt's content, and the prior prompts (for bleed): the prompt with the trigger removed.

Captions align by template: their words with articles (a/an/the) left out, grouped by word count and the
trigger's place; a place where the words differ is a slot, unless one of its words is a function word
(``on`` / ``in``: swapping those changes the relation, not the subject). Articles before an edited word are fixed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from evaluation.config import DataArgs, EvalConfig, SuiteArgs, SuitePrompt, words
from training.captions import FUNCTION_WORDS
from training.configuration import ConfigError, validate_values

ARTICLES = frozenset({"a", "an", "the"})
_INDEFINITE = ("a", "an")


@dataclass(frozen=True)
class _Caption:
    tokens: tuple[str, ...]  # the caption split on whitespace, as written
    bare: tuple[str, ...]  # each token lower-cased without surrounding punctuation

    @classmethod
    def of(cls, text: str) -> _Caption:
        tokens = tuple(text.split())
        return cls(tokens, tuple(words(text)))

    @property
    def content_places(self) -> list[int]:
        """Token indices of the words that are not articles (the template's places)."""
        return [i for i, w in enumerate(self.bare) if w not in ARTICLES]

    def key(self) -> tuple[str, ...]:
        """The caption's words without articles: two captions with equal keys say the same thing."""
        return tuple(self.bare[i] for i in self.content_places)


def _fix_articles(tokens: list[str], edited: list[int]) -> list[str]:
    """'a'/'an' right before an edited position agrees with the word now there (capitals kept)."""
    out = list(tokens)
    for i in edited:
        if 0 < i < len(out) and out[i - 1].lower() in _INDEFINITE:
            article = "an" if out[i][:1].lower() in "aeiou" else "a"
            out[i - 1] = article.capitalize() if out[i - 1][0].isupper() else article
    return out


def without_trigger(caption: str, trigger: str) -> str:
    """``caption`` with every occurrence of ``trigger`` removed and the article before it fixed
    (``a red circle on a sks background`` -> ``a red circle on a background``)."""
    c = _Caption.of(caption)
    tokens: list[str] = []
    edited: list[int] = []
    for tok, bare in zip(c.tokens, c.bare):
        if bare != trigger.lower():
            tokens.append(tok)
            continue
        tail = tok[len(tok.rstrip(",;:.!?")) :]  # "sks," -> the comma stays with the word before
        if tail and tokens and not tokens[-1].endswith(tail):
            tokens[-1] += tail
        edited.append(len(tokens))
    return " ".join(_fix_articles(tokens, edited))


def _swap(c: _Caption, index: int, word: str) -> str:
    """``c`` with the word at token ``index`` replaced by ``word`` (its punctuation and capital kept)."""
    tok = c.tokens[index]
    start = len(tok) - len(tok.lstrip("\"'(["))
    end = len(tok.rstrip(".,;:!?\"')]"))
    core = word.capitalize() if tok[start : start + 1].isupper() else word
    tokens = list(c.tokens)
    tokens[index] = tok[:start] + core + tok[end:]
    return " ".join(_fix_articles(tokens, [index]))


def content_swaps(captions: list[str], trigger: str, seed: int = 0, avoid: set[tuple[str, ...]] = frozenset()):
    """Captions with one slot's word replaced by another word seen in that slot, deterministic from ``seed``;
    combinations absent from ``captions`` first, then the rest (each as a caption not in ``avoid``, a set of
    ``_Caption.key()``). Only captions that contain ``trigger`` take part. Returns a list of strings."""
    parsed = [_Caption.of(t) for t in dict.fromkeys(captions)]
    parsed = [c for c in parsed if trigger.lower() in c.bare]
    groups: dict[tuple[int, int], list[_Caption]] = {}
    for c in parsed:
        key = c.key()
        groups.setdefault((len(key), key.index(trigger.lower())), []).append(c)
    seen = {c.key() for c in parsed}
    absent, present, taken = [], [], set(avoid)
    for group in groups.values():
        slots = []
        for place in range(len(group[0].key())):
            values = sorted({c.key()[place] for c in group})
            if len(values) > 1 and not FUNCTION_WORDS.intersection(values):
                slots.append((place, values))
        for c in group:
            for place, values in slots:
                index = c.content_places[place]
                for value in values:
                    if value == c.bare[index]:
                        continue
                    text = _swap(c, index, value)
                    key = _Caption.of(text).key()
                    if key in taken:
                        continue
                    taken.add(key)
                    (present if key in seen else absent).append(text)
    rng = random.Random(seed)
    rng.shuffle(absent)
    rng.shuffle(present)
    return absent + present


def build_suite(
    train_captions: list[str],
    heldout_captions: list[str],
    trigger: str,
    *,
    images_per_prompt: int = 2,
    max_prompts: int = 18,
    seed: int = 0,
) -> SuiteArgs:
    """The suite of a dataset, from its captions alone (no concept word: ``concept`` None, no alternatives).

    Prompts: the distinct held-out captions that contain the trigger (the training captions when no held-out
    caption does), at most ``max_prompts``, and content swaps after them (at least half of ``max_prompts``
    is left for swaps when there are enough); each prompt's ``content`` and the prior prompts are prompts
    with the trigger removed. Deterministic from ``seed``.

    Raises:
        ValueError: no caption contains ``trigger`` (names it and the fix), or a caption is the trigger alone.
    """
    if max_prompts < 1:
        raise ValueError(f"max_prompts must be at least 1, got {max_prompts}")
    trig = trigger.lower()
    held = list(dict.fromkeys(" ".join(t.split()) for t in heldout_captions if trig in words(t)))
    train = list(dict.fromkeys(" ".join(t.split()) for t in train_captions if trig in words(t)))
    base = held or train
    if not base:
        n = len(train_captions) + len(heldout_captions)
        raise ValueError(
            f"the trigger {trigger!r} is in none of the dataset's {n} captions: set trigger= to the word the "
            "captions use for the concept, or add it to the captions"
        )
    base_keys = {_Caption.of(t).key() for t in base}
    swaps = content_swaps(train + held, trigger, seed, avoid=base_keys)
    n_base = min(len(base), max(max_prompts - len(swaps), (max_prompts + 1) // 2))
    if n_base < len(base):  # a seeded choice, in the captions' own order
        keep = set(random.Random(seed).sample(range(len(base)), n_base))
        base = [t for i, t in enumerate(base) if i in keep]
    prompts = base + swaps[: max_prompts - n_base]
    contents = [without_trigger(p, trigger) for p in prompts]
    empty = [p for p, c in zip(prompts, contents) if not c.strip()]
    if empty:
        raise ValueError(f"caption {empty[0]!r} is the trigger alone: captions need words besides the trigger")
    return SuiteArgs(
        trigger=trigger,
        prompts=[SuitePrompt(prompt=p, content=c) for p, c in zip(prompts, contents)],
        prior_prompts=list(dict.fromkeys(contents[: len(base)])),
        images_per_prompt=images_per_prompt,
    )


def dataset_split(data: DataArgs, trigger: str | None = None) -> tuple[list, list]:
    """(training, held-out) examples of an evaluation: ``data.heldout_path``'s images, or ``data.holdout`` images taken
    out of ``data.train_path`` exactly as training takes them (``training.heldout.split_holdout``), so the held-out
    loss and the suite's prompts use images the adapter never trained on.

    Raises:
        DatasetError: a dataset folder has errors.
        PreflightError: ``data.holdout`` would leave no training images.
    """
    from training.config import DataConfig
    from training.data import validate_dataset
    from training.heldout import split_holdout

    def examples(path: str) -> list:
        layout = {
            k: getattr(data, k)
            for k in ("instance_prompt", "caption_column", "image_column", "caption_extension", "background")
        }
        cfg = DataConfig(path=path, trigger=trigger, min_images=1, **layout)  # read as training reads it
        report = validate_dataset(cfg)
        report.raise_if_errors()
        return report.examples

    train = examples(data.train_path) if data.train_path else []
    if data.heldout_path:
        return train, examples(data.heldout_path)
    return split_holdout(train, data.holdout) if data.holdout and train else (train, [])


def resolve_trigger(cfg: EvalConfig, adapter_trigger: str | None) -> str:
    """The trigger to evaluate with: ``trigger``, else ``suite.trigger``, else the adapter's own.

    Raises:
        ConfigError: none of them is set, or the configured one is not the adapter's.
    """
    configured = cfg.trigger or (cfg.suite.trigger if cfg.suite is not None else None)
    key = "trigger" if cfg.trigger else "suite.trigger"
    if configured and adapter_trigger and configured != adapter_trigger:
        msg = f"{key}={configured!r} but the adapter was trained with {adapter_trigger!r}; use its dataset's config"
        raise ConfigError([msg], "eval")
    if not (configured or adapter_trigger):
        raise ConfigError(
            ["no trigger word: set trigger=<word> (the word of the captions that stands for the concept), or "
             "evaluate an adapter whose lorafleet_adapter.json records one (train with data.trigger=<word>)"],
            "eval",
        )  # fmt: skip
    return configured or adapter_trigger


def materialise(cfg: EvalConfig, adapter_trigger: str | None = None) -> EvalConfig:
    """``cfg`` with everything decided at evaluation time filled in, validated again: the trigger
    (``resolve_trigger``), the suite (``build_suite`` on the dataset's captions when ``suite`` is null) and
    ``registry.model_name`` (``<folder name of data.train_path>-lora`` when null).

    Raises:
        ConfigError: no trigger, a trigger that is not the adapter's, or a gate metric the built suite cannot
            measure (e.g. flexibility with one distinct caption).
        ValueError: no caption contains the trigger.
        DatasetError: a dataset folder has errors.
    """
    trigger = resolve_trigger(cfg, adapter_trigger)
    values = cfg.model_dump(mode="json") | {"trigger": trigger}
    source = "eval"
    if cfg.suite is None:
        d, a = cfg.data, cfg.auto_suite
        train_examples, held_examples = dataset_split(d)
        train, held = [e.caption for e in train_examples], [e.caption for e in held_examples]
        try:
            suite = build_suite(train, held, trigger, images_per_prompt=a.images_per_prompt,
                                max_prompts=a.max_prompts, seed=a.seed)  # fmt: skip
        except ValueError as exc:
            raise ConfigError([f"suite (built from data.train_path={d.train_path}): {exc}"], "eval") from exc
        values["suite"] = suite.model_dump(mode="json") | {"concept": a.concept}  # the concept word, when given
        source = f"eval, suite built from {d.heldout_path if held else d.train_path}"
    if cfg.registry.model_name is None and cfg.data.train_path:
        values["registry"]["model_name"] = default_model_name(cfg.data.train_path)
    return validate_values(EvalConfig, values, source=source)


def default_model_name(train_path: str) -> str:
    """``<folder name>-lora`` for a dataset folder or URI (its last path part), MLflow-safe: one registered
    model per dataset (``data/toy-sks`` -> ``toy-sks-lora``; ``.`` counts as the folder it names)."""
    from training.names import dataset_name, registered_model_name
    from training.remote import is_uri

    where = train_path if is_uri(train_path) else str(Path(train_path).expanduser().resolve())
    return registered_model_name(dataset_name(where))
