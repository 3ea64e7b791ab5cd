"""The trigger word, read from a dataset's captions: the word in every caption that the base model does not know.

A LoRA's trigger is a word the base model has no meaning for (``sks``, ``ohwx``, ``zyx42``), put in every
caption so the new concept attaches to it. Two signals from the base model's own tokenizer say how unknown
a word is, with no word list of our own beyond English function words:

- split: a word that the tokenizer cuts into several sub-word pieces is not in its vocabulary (the toy
  tokenizer splits ``sks`` into ``s k s``; it keeps ``background`` whole) — the more pieces per letter, the
  more unknown;
- rarity: CLIP's BPE vocabulary lists merges in the order they were learned, most frequent first, so a
  single-token word's id says how rare it is (in SD's CLIP, ``sks</w>`` is id 48136 of 49408, while
  ``a``, ``photo``, ``of``, ``dog`` sit below 2000). Words in the most frequent quarter are common words,
  never triggers.

    choice = choose_trigger(captions, load_tokenizer("models/toy-sd"))
    choice.describe()   # "trigger 'sks' (in 20/20 captions; 3 sub-word tokens, not a word of the tokenizer) — ..."
    choice.evidence     # JSON-able: every candidate, its share, tokens, rank, and why the winner won
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from training.layout import Problem

log = logging.getLogger(__name__)
FIX = "set trigger=<word> (pipeline) or data.trigger=<word> (training)"
# a known word whose id lies in the most frequent quarter of the merges is a common word, not a trigger
COMMON_BELOW = 0.25
# two candidates of the same kind (both split, or both whole) closer than this in score are ambiguous
MARGIN = 0.25
# English function words (articles, pronouns, prepositions, conjunctions, auxiliaries): a closed class, so a
# list; the toy tokenizer splits 'of' and 'the' into pieces, yet they are never triggers
_FUNCTION_WORDS = """a an the this that these those some any each every no of in on at to from by with without for
into onto over under above below behind near next beside between among through across against along around about
and or but nor so yet as than then if while when where which who whom whose what how why
is are was were be been being am has have had do does did will would can could should may might must
it its he she they them their his her him we us our you your me my mine one ones there here
up down out off very too also just not only all both more most other such own same"""
FUNCTION_WORDS = frozenset(_FUNCTION_WORDS.split())


class TriggerError(ValueError):
    """No trigger could be chosen; the message names the evidence and the fix (``FIX``)."""

    def __init__(self, message: str, evidence: dict[str, Any]):
        self.evidence = evidence
        super().__init__(f"{message}; {FIX}")


@dataclass(frozen=True)
class TriggerChoice:
    trigger: str
    source: str  # "config" | "instance_prompt" | "captions"
    evidence: dict[str, Any]  # JSON-able: captions counted, ranked candidates, why this one won

    def describe(self) -> str:
        """One line for a log or a report, with the runner-up when detection chose."""
        ev = self.evidence
        if self.source == "config":
            line = f"trigger {self.trigger!r} (set by config; in {ev['found_in']}/{ev['captions']} captions)"
            detected = ev.get("detected")
            if detected == self.trigger.lower():
                return f"{line} — detection agrees"
            return f"{line} — detection would pick {detected!r}" if detected else f"{line} — detection found none"
        ranked = ev["candidates"]
        best = ranked[0]
        where = f"from instance_prompt {ev['instance_prompt']!r}; " if self.source == "instance_prompt" else ""
        line = f"trigger {self.trigger!r} ({where}in {best['captions']}/{ev['captions']} captions; {_kind(best)})"
        if len(ranked) < 2:
            return f"{line} — no other candidate"
        nxt = ranked[1]
        return f"{line} — next: {nxt['word']!r} ({nxt['captions']}/{ev['captions']}, {_kind(nxt, short=True)})"


def _kind(c: dict[str, Any], short: bool = False) -> str:
    if not c["known"]:
        return f"{len(c['tokens'])} sub-word tokens" + ("" if short else ", not a word of the tokenizer")
    if c["common"]:
        return "a known word"
    return f"a rare known word (token id {c['token_ids'][0]})"


def load_tokenizer(base_model: str) -> Any:
    """The base model's first tokenizer (subfolder ``tokenizer``) from a diffusers folder or a hub id
    (with ``HF_HUB_OFFLINE=1``: the HF cache). Reads no weights.

    Raises:
        OSError: it cannot be loaded; the message names base_model and the fix.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base_model, subfolder="tokenizer")
    except (OSError, ValueError) as exc:
        raise OSError(
            f"cannot load the tokenizer of base_model {base_model!r} (subfolder 'tokenizer'): {exc}. Point "
            f"base_model at a diffusers folder or a hub id in the HF cache, or {FIX} to skip detection"
        ) from exc


def load_tokenizers(base_model: str) -> dict[str, Any]:
    """Every tokenizer of the base model's family by subfolder (``tokenizer``; SDXL also ``tokenizer_2``), from a
    diffusers folder or a hub id (the HF cache with ``HF_HUB_OFFLINE=1``). Reads no weights.

    Raises:
        OSError: the model or a tokenizer cannot be loaded (names base_model and the fix).
    """
    from transformers import AutoTokenizer

    from training.families import family_of

    try:
        names = family_of(base_model).tokenizer_names
    except ValueError as exc:  # FamilyError: a pipeline class lorafleet has no family for
        raise OSError(str(exc)) from exc
    out = {"tokenizer": load_tokenizer(base_model)}
    for name in names[1:]:
        try:
            out[name] = AutoTokenizer.from_pretrained(base_model, subfolder=name)
        except (OSError, ValueError) as exc:
            where = f"base_model {base_model!r} (subfolder {name!r})"
            raise OSError(f"cannot load the tokenizer of {where}: {exc}") from exc
    return out


def normalize_word(piece: str) -> str:
    """One whitespace-separated piece of a caption as lorafleet compares words: lower-cased, with the characters
    at either end that are not letters or digits stripped (``'(Sks),'`` -> ``'sks'``, ``"sks's"`` stays,
    ``'...'`` -> ``''``)."""
    start, end = 0, len(piece)
    while start < end and not piece[start].isalnum():
        start += 1
    while end > start and not piece[end - 1].isalnum():
        end -= 1
    return piece[start:end].lower()


def caption_words(caption: str) -> list[str]:
    """The caption's words, the one definition trigger detection, dataset validation and the evaluation suite all
    use (``normalize_word`` of each whitespace-separated piece, empty ones dropped):
    ``'Ohwx, the zyx42-style DOG!'`` -> ``['ohwx', 'the', 'zyx42-style', 'dog']``."""
    return [w for w in map(normalize_word, caption.split()) if w]


class _Vocab:
    """Where a tokenizer's merge-learned tokens start and how many there are (CLIP: bytes first, then merges)."""

    def __init__(self, tokenizer: Any):
        vocab = tokenizer.get_vocab()
        specials = set(tokenizer.all_special_tokens)
        self.size = len(vocab)
        self.base = sum(1 for t in vocab if t not in specials and len(t.removesuffix("</w>")) == 1)
        self.merges = max(self.size - self.base - len(specials & vocab.keys()), 1)

    def rarity(self, token_id: int) -> float:
        """0 for the most frequent merge (and single characters), 1 for the last one learned."""
        return min(max((token_id - self.base) / max(self.merges - 1, 1), 0.0), 1.0)


def _profile(word: str, count: int, n: int, tokenizer: Any, vocab: _Vocab) -> dict[str, Any]:
    tokens = tokenizer.tokenize(word)
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)]
    known = len(tokens) == 1
    rarity = vocab.rarity(ids[0]) if known else 1.0
    # split words rank above whole ones (score > 1), by pieces per letter; whole words by rarity
    score = rarity if known else 1.0 + len(tokens) / len(word)
    return {
        "word": word,
        "captions": count,
        "share": round(count / n, 4),
        "tokens": tokens,
        "token_ids": ids,
        "known": known,
        "rarity": round(rarity, 4),
        "common": known and rarity < COMMON_BELOW,
        "score": round(score, 4),
    }


def detect_trigger(captions: list[str], tokenizer: Any, *, min_share: float = 1.0) -> TriggerChoice:
    """The most trigger-like word found in at least ``min_share`` of ``captions`` (see the module docstring).

    Raises:
        TriggerError: no captions; no candidate in enough captions; only common known words; or two
            candidates of the same kind too close to tell apart. ``.evidence`` holds the counts.
    """
    n = len(captions)
    counts = Counter(w for c in captions for w in set(caption_words(c)))
    common = [{"word": w, "captions": c, "share": round(c / n, 4)} for w, c in counts.most_common(10)] if n else []
    evidence: dict[str, Any] = {"captions": n, "min_share": min_share, "common_words": common, "candidates": []}
    if not n:
        raise TriggerError("no captions to detect the trigger from", evidence)
    needed = max(1, math.ceil(min_share * n - 1e-9))
    evidence["needed"] = needed
    words = [w for w, c in counts.items() if c >= needed and len(w) > 1 and not w.isdigit()]
    words = [w for w in words if w not in FUNCTION_WORDS]
    vocab = _Vocab(tokenizer)
    ranked = sorted(
        (_profile(w, counts[w], n, tokenizer, vocab) for w in words), key=lambda c: (-c["score"], c["word"])
    )
    for rank, c in enumerate(ranked, start=1):
        c["rank"] = rank
    evidence["candidates"] = ranked
    shares = ", ".join(f"{c['word']!r} {c['captions']}/{n}" for c in common[:6])
    if not ranked:
        raise TriggerError(
            f"no word other than function words is in {needed}/{n} captions (most common: {shares}); "
            "put the trigger in every caption",
            evidence,
        )
    best = ranked[0]
    if best["common"]:
        # the usual slip: the trigger is missing from a caption or two; name it and the captions that lack it
        near_profiles = [_profile(w, c, n, tokenizer, vocab) for w, c in counts.items()
                         if max(2, needed / 2) <= c < needed and w not in FUNCTION_WORDS and len(w) > 1]  # fmt: skip
        near = [x["word"] for x in sorted(near_profiles, key=lambda x: (-x["captions"], -x["score"], x["word"]))
                if not x["common"] and x["score"] > best["score"]]  # fmt: skip
        if near:
            w = near[0]
            lacking = [c for c in captions if w not in caption_words(c)]
            evidence["near_candidates"] = [{"word": x, "captions": counts[x]} for x in near[:5]]
            raise TriggerError(
                f"{w!r} looks like the trigger but is in {counts[w]}/{n} captions, not {needed}; add it to the "
                f"{len(lacking)} that lack it (e.g. {lacking[0]!r})",
                evidence,
            )
    if best["common"]:
        listed = ", ".join(f"{c['word']!r} (token id {c['token_ids'][0]})" for c in ranked[:5])
        raise TriggerError(
            f"every word in {needed}/{n} captions is a common word of the base tokenizer ({listed}); "
            "a trigger is a word the base model does not know, e.g. 'sks' — add one to every caption",
            evidence,
        )
    if len(ranked) > 1 and ranked[1]["known"] == best["known"] and best["score"] - ranked[1]["score"] < MARGIN:
        second = ranked[1]
        raise TriggerError(
            f"ambiguous trigger: {best['word']!r} and {second['word']!r} are both in {needed}/{n} captions and "
            f"equally unknown to the base tokenizer ({_kind(best)} vs {_kind(second)})",
            evidence,
        )
    if best["known"]:
        why = f"a single token of the rarest {1 - best['rarity']:.0%} of the tokenizer's merges"
    else:
        why = f"split into {len(best['tokens'])} pieces ({'|'.join(best['tokens'])}): not a word of the tokenizer"
    runner = f"; runner-up {ranked[1]['word']!r} scores {ranked[1]['score']}" if len(ranked) > 1 else ""
    evidence["reason"] = f"{best['word']!r} is in {best['captions']}/{n} captions and {why}{runner}"
    return TriggerChoice(best["word"], "captions", evidence)


def _found_in(trigger: str, captions: list[str]) -> int:
    phrase = f" {' '.join(caption_words(trigger))} "
    return sum(phrase in f" {' '.join(caption_words(c))} " for c in captions)


def _check_configured(trigger: str) -> None:
    """A configured trigger must be one word as captions are compared (``caption_words``) and not a function word:
    the suite removes it from prompts and the tokenizer must see it as the same word everywhere."""
    as_words = caption_words(trigger)
    if as_words != [trigger.lower()]:
        hint = (
            f"use {as_words[0]!r}" if len(as_words) == 1 else "a trigger is one word of letters or digits, e.g. 'sks'"
        )
        raise TriggerError(f"trigger {trigger!r} is not one word as captions are compared ({as_words}): {hint}",
                           {"configured": trigger, "words": as_words})  # fmt: skip
    if trigger.lower() in FUNCTION_WORDS:
        raise TriggerError(f"trigger {trigger!r} is a function word every caption needs; pick a word of its own, "
                           "e.g. 'sks'", {"configured": trigger})  # fmt: skip


def choose_trigger(
    captions: list[str], tokenizer: Any, *, configured: str | None = None, instance_prompt: str | None = None
) -> TriggerChoice:
    """The run's trigger: ``configured`` when given (it must appear in a caption), else detected from the
    captions — for DreamBooth (``instance_prompt``) the captions are that one prompt. Logs the choice.

    Raises:
        TriggerError: ``configured`` is not one word, is a function word or is in no caption, or detection fails
            (see ``detect_trigger``).
    """
    if instance_prompt:
        captions = [instance_prompt]
    if configured:
        _check_configured(configured)
        found = _found_in(configured, captions)
        evidence: dict[str, Any] = {"captions": len(captions), "configured": configured, "found_in": found}
        if instance_prompt:
            evidence["instance_prompt"] = instance_prompt
        if not found:
            where = (
                f"instance_prompt {instance_prompt!r}" if instance_prompt else f"any of the {len(captions)} captions"
            )
            raise TriggerError(f"the configured trigger {configured!r} is not in {where}; fix the captions", evidence)
        try:
            detected = detect_trigger(captions, tokenizer)
            evidence["detected"] = detected.trigger
            evidence["detection"] = detected.evidence
        except TriggerError as exc:
            evidence["detected"] = None
            evidence["detection_error"] = str(exc)
        choice = TriggerChoice(configured, "config", evidence)
    else:
        choice = detect_trigger(captions, tokenizer)
        if instance_prompt:
            evidence = dict(choice.evidence, instance_prompt=instance_prompt)
            choice = TriggerChoice(choice.trigger, "instance_prompt", evidence)
    log.info("%s", choice.describe())
    return choice


def caption_length_problems(captions: list[tuple[str, str]], tokenizer: Any, trigger: str | None) -> list[Problem]:
    """Captions the base model's tokenizer cuts: training tokenizes with ``truncation=True`` at
    ``tokenizer.model_max_length`` (CLIP: 77 tokens with the start and end tokens; the toy model: 32), so the
    words past the limit are never seen.

    Args:
        captions: (file name as problems name it, caption exactly as trained).
        tokenizer: the base model's tokenizer (``load_tokenizer``).
        trigger: the trigger word, or None.

    Returns:
        A ``Problem`` per cut caption: an error when the trigger's first occurrence lies past the
        limit (it would never be trained), else a warning with the token count and the limit.
    """
    limit = int(tokenizer.model_max_length)
    out = []
    for name, caption in captions:
        n = len(tokenizer(caption, truncation=False).input_ids)  # with the start and end tokens
        if n <= limit:
            continue
        msg = f"caption is {n} tokens, the base model reads {limit} (with start and end tokens): the rest is cut"
        words = caption.split()
        at = next((i for i, w in enumerate(words) if trigger and normalize_word(w) == trigger.lower()), None)
        if at is not None:  # tokens up to and including the trigger, with the start token; the end token takes one
            upto = len(tokenizer(" ".join(words[: at + 1]), truncation=False).input_ids) - 1
            if upto > limit - 1:
                why = f"the trigger {trigger!r} lies past the cut (token {upto}), so it would never be trained"
                out.append(Problem(name, "error", f"{msg}, and {why}: move the trigger to the front or shorten it"))
                continue
        out.append(Problem(name, "warning", f"{msg}; shorten it or put what matters first"))
    return out
