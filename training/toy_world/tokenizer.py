"""A real ``CLIPTokenizer`` with a small BPE vocabulary learned from the toy world's words.

Like OpenAI CLIP's vocabulary, it holds every byte (alone and as a word end ``</w>``),
then learned merges, then ``<|startoftext|>``/``<|endoftext|>``. So any word a user picks
as a trigger (``sks``, ``ohwx``, ``zyx42``) falls back to byte-level tokens and never
becomes ``<unk>``; the world's own words are single tokens.
"""

from __future__ import annotations

from collections import Counter

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END = "</w>"


def _pair_counts(words: Counter[tuple[str, ...]]) -> Counter[tuple[str, str]]:
    pairs: Counter[tuple[str, str]] = Counter()
    for symbols, freq in words.items():
        for a, b in zip(symbols, symbols[1:]):
            pairs[(a, b)] += freq
    return pairs


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def learn_merges(corpus: list[str], max_merges: int = 400) -> list[tuple[str, str]]:
    """Classic BPE (Sennrich et al.) on lower-cased ASCII words, CLIP's ``</w>`` convention."""
    words: Counter[tuple[str, ...]] = Counter()
    for text in corpus:
        for word in text.lower().split():
            words[(*word[:-1], word[-1] + END)] += 1
    merges: list[tuple[str, str]] = []
    for _ in range(max_merges):
        pairs = _pair_counts(words)
        if not pairs:
            break
        # ties broken by the pair itself so the vocabulary is deterministic
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        words = Counter({_merge(sym, best): f for sym, f in words.items()})
    return merges


def build_tokenizer(corpus: list[str], model_max_length: int) -> CLIPTokenizer:
    """Build a CLIP tokenizer whose merges cover every word of ``corpus``."""
    byte_chars = list(bytes_to_unicode().values())
    merges = learn_merges(corpus)
    tokens = byte_chars + [c + END for c in byte_chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=model_max_length,
    )
