"""The SD3.5 reference's tokenization procedure, on top of any base tokenizer.

Reproduces ``other_impls.py`` of Stability-AI/sd3.5 (``SDTokenizer.tokenize_with_weights``, ``token_weights``,
``parse_parentheses``, ``escape_important``): the ComfyUI-style weight syntax is parsed and removed (the weights are
then discarded), each space-separated word is tokenized on its own, and the ids are packed into chunks of
``max_length`` (BOS + ids + EOS + pad) where a word shorter than 8 tokens that does not fit moves whole to the next
chunk. The caller keeps chunk 0 only, as the reference does.
"""
from __future__ import annotations

from typing import Callable

MAX_WORD_LENGTH = 8  # SDTokenizer.max_word_length


def escape_important(text: str) -> str:
    return text.replace("\\)", "\0\1").replace("\\(", "\0\2")


def unescape_important(text: str) -> str:
    return text.replace("\0\1", ")").replace("\0\2", "(")


def parse_parentheses(text: str) -> list[str]:
    """Split into top-level ``(...)`` groups and plain runs; an unclosed ``(`` runs to the end."""
    out, cur, depth = [], "", 0
    for c in text:
        if c == "(":
            if depth == 0:
                if cur:
                    out.append(cur)
                cur = "("
            else:
                cur += c
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                out.append(cur + ")")
                cur = ""
            else:
                cur += c
        else:
            cur += c
    if cur:
        out.append(cur)
    return out


def token_weights(text: str, weight: float) -> list[tuple[str, float]]:
    """``(a:1.3)`` -> weight 1.3, ``(a)`` -> x1.1, recursively. The reference discards the weights afterwards."""
    out = []
    for seg in parse_parentheses(text):
        w = weight
        if len(seg) >= 2 and seg[0] == "(" and seg[-1] == ")":
            seg = seg[1:-1]
            colon = seg.rfind(":")
            w *= 1.1
            if colon > 0:
                try:
                    w = float(seg[colon + 1 :])
                    seg = seg[:colon]
                except ValueError:
                    pass
            out += token_weights(seg, w)
        else:
            out.append((seg, weight))
    return out


def words(text: str, parse_weights: bool = True) -> list[str]:
    """The words the reference tokenizes one by one: weight syntax removed, newlines to spaces, split on ' '."""
    segments = token_weights(escape_important(text), 1.0) if parse_weights else [(text, 1.0)]
    out = []
    for seg, _ in segments:
        out += [w for w in unescape_important(seg).replace("\n", " ").split(" ") if w != ""]
    return out


def chunk(
    word_ids: list[list[int]], start: int | None, end: int, pad: int, max_length: int = 77,
    min_length: int | None = None, pad_to_max_length: bool = True,
) -> list[list[int]]:
    """``SDTokenizer.tokenize_with_weights`` packing of per-word ids into chunks."""
    chunks: list[list[int]] = []
    batch = [start] if start is not None else []
    chunks.append(batch)
    for group in word_ids:
        is_large = len(group) >= MAX_WORD_LENGTH
        while group:
            if len(group) + len(batch) > max_length - 1:
                remaining = max_length - len(batch) - 1
                if is_large:  # split the word, close the chunk
                    batch += group[:remaining]
                    batch.append(end)
                    group = group[remaining:]
                else:  # close the chunk, the word moves whole to the next one
                    batch.append(end)
                    if pad_to_max_length:
                        batch += [pad] * remaining
                batch = [start] if start is not None else []
                chunks.append(batch)
            else:
                batch += group
                group = []
    batch.append(end)
    if pad_to_max_length:
        batch += [pad] * (max_length - len(batch))
    if min_length is not None and len(batch) < min_length:
        batch += [pad] * (min_length - len(batch))
    return chunks


def sai_tokenize(
    text: str, encode_word: Callable[[str], list[int]], *, start: int | None, end: int, pad: int,
    max_length: int = 77, min_length: int | None = None, pad_to_max_length: bool = True, parse_weights: bool = True,
) -> list[list[int]]:
    """All chunks of ``text``; ``encode_word`` returns a word's content ids (no BOS/EOS)."""
    return chunk([encode_word(w) for w in words(text, parse_weights)], start, end, pad, max_length, min_length,
                 pad_to_max_length)
