"""Deterministic token generation: the vocabulary, the seeded PRNG, and one choice's tokens
(with their logprobs and ranked alternatives when asked for).

Each choice draws words from :data:`VOCABULARY` with a PRNG seeded from a BLAKE2b hash of
``(model, prompt text, seed, choice index)`` — never Python's salted ``hash()`` — so the same
request gives the same words in every process. A shorter ``max_tokens`` gives a prefix of the
longer answer. The natural length is 8-24 tokens (``finish_reason: "stop"``); a ``max_tokens``
below it ends with ``"length"``. A token is a word with a leading space (the first is
capitalised, without one).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence

import msgspec

__all__ = [
    "MAX_GENERATED_TOKENS",
    "NATURAL_LENGTH",
    "VOCABULARY",
    "Generation",
    "generate",
    "seed_int",
]

MAX_GENERATED_TOKENS = 4096  # cap for ignore_eos without max_tokens
NATURAL_LENGTH = (8, 24)

# Filler words (deduplicated below); a token is one of them, never a real model's output.
_WORDS = """
the of and to in is was for that on as with by it at from his an were are which this be has
or had not but one their its also first new after who they two have her she been other when
there all time during into would more may over can only most some than then these people
year state world city between many under later while both use part such where through made
before each since well three work system team known until against high found however life
number small music second place name early several album game house water during river north
south east west light sound signal model token vector stream queue route price value market
cloud local daemon worker tunnel request answer order field forest mountain valley garden
bridge window paper letter story history science nature energy power engine motor wheel road
track station harbor island ocean coast desert summer winter spring autumn morning evening
night day week month color green blue red yellow silver golden quiet bright simple clear
steady rapid gentle careful honest patient curious brave calm warm cool soft strong light
heavy ancient modern public private open closed final central common natural human animal
plant stone metal glass wood cotton bread salt sugar coffee tea milk apple river cable
circuit signal pattern method theory reason result effect cause change growth balance
measure limit design shape level layer surface center corner edge point line circle square
frame bridge tower castle village market harbor
"""
VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(_WORDS.split()))

_V = len(VOCABULARY)
_FIRST = tuple(word.capitalize() for word in VOCABULARY)
_REST = tuple(" " + word for word in VOCABULARY)
_ALT_STRIDE = 37  # coprime with _V: the 19 alternatives of a token are distinct words
assert math.gcd(_ALT_STRIDE, _V) == 1 and _V > 20


class Generation(msgspec.Struct, frozen=True):
    """One choice's output. ``top`` holds, per token, the ``(token, logprob)`` alternatives
    (the chosen token first) when logprobs were asked for, else it is ``None``."""

    tokens: list[str]
    finish_reason: str
    logprobs: list[float] | None = None
    top: list[list[tuple[str, float]]] | None = None

    @property
    def text(self) -> str:
        return "".join(self.tokens)


def seed_int(*parts: str) -> int:
    """A process-independent 64-bit seed for ``parts`` (BLAKE2b, not the salted ``hash()``)."""
    digest = hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def generate(
    model: str,
    prompt: str,
    *,
    seed: int | None = None,
    index: int = 0,
    max_tokens: int | None = None,
    stop: Sequence[str] = (),
    min_tokens: int = 0,
    ignore_eos: bool = False,
    top_logprobs: int | None = None,
) -> Generation:
    """Deterministic tokens for one choice; ``top_logprobs`` (0-20) asks for logprobs."""
    seed_value = seed_int(model, str(seed), str(index), prompt)
    rng = random.Random(seed_value)
    natural = rng.randint(*NATURAL_LENGTH)
    limit = MAX_GENERATED_TOKENS if ignore_eos else max(natural, min_tokens)
    finish = "stop"
    if max_tokens is not None and max_tokens < limit:
        limit, finish = max_tokens, "length"
    elif ignore_eos:
        finish = "length"
    picks = [int(rng.random() * _V) for _ in range(limit)]
    tokens = [_FIRST[i] if pos == 0 else _REST[i] for pos, i in enumerate(picks)]
    if stop:
        cut = _stop_cut(tokens, stop)
        if cut is not None:
            tokens, finish = cut, "stop"
    if top_logprobs is None:
        return Generation(tokens, finish)
    lp_rng = random.Random(seed_value ^ 0x5DEECE66D)
    logprobs: list[float] = []
    top: list[list[tuple[str, float]]] = []
    for pos, token in enumerate(tokens):
        logprob = -round(lp_rng.random() * 2.0, 6)
        alternatives = [(token, logprob)]
        table = _FIRST if pos == 0 else _REST
        below = logprob
        for j in range(1, top_logprobs):
            below = round(below - 0.25 - lp_rng.random() * 0.5, 6)  # strictly decreasing
            alternatives.append((table[(picks[pos] + j * _ALT_STRIDE) % _V], below))
        logprobs.append(logprob)
        top.append(alternatives[:top_logprobs])
    return Generation(tokens, finish, logprobs, top)


def _stop_cut(tokens: list[str], stop: Sequence[str]) -> list[str] | None:
    """Tokens up to (not including) the earliest stop sequence, or ``None`` if none occurs."""
    text = "".join(tokens)
    found = [p for p in (text.find(s) for s in stop if s) if p >= 0]
    if not found:
        return None
    end = min(found)
    kept: list[str] = []
    offset = 0
    for token in tokens:
        if offset + len(token) > end:
            if end > offset:
                kept.append(token[: end - offset])
            break
        kept.append(token)
        offset += len(token)
    return kept
