"""The weight-syntax tokenization of the SD3.5 code and of ComfyUI, on top of any base tokenizer.

Both parse ``(text:1.2)`` / ``(text)`` weights and remove the syntax (``token_weights``, ``parse_parentheses``,
``escape_important``), tokenize the pieces, and pack the ids into chunks of ``max_length`` (BOS + ids + EOS + pad)
where a piece shorter than 8 tokens that does not fit moves whole to the next chunk. They differ in the pieces:
the SD3.5 code (``other_impls.SDTokenizer``) tokenizes each space-separated word on its own; ComfyUI
(``comfy/sd1_clip.py SDTokenizer.tokenize_with_weights``) tokenizes each weighted segment whole, cut only before
`` embedding:`` names. What the caller does with the weights and the chunks is its choice (``impl.text``).
"""
from __future__ import annotations

import re
from typing import Callable

MAX_WORD_LENGTH = 8  # SDTokenizer.max_word_length
EMBEDDING = "embedding:"  # ComfyUI's textual-inversion prefix; a segment is cut before " embedding:" / "\nembedding:"


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


def words(text: str, parse_weights: bool = True) -> list[tuple[str, float]]:
    """The SD3.5 code's pieces, each with its weight: weight syntax removed, newlines to spaces, split on ' '."""
    segments = token_weights(escape_important(text), 1.0) if parse_weights else [(text, 1.0)]
    out = []
    for seg, w in segments:
        out += [(word, w) for word in unescape_important(seg).replace("\n", " ").split(" ") if word != ""]
    return out


def segments(text: str, parse_weights: bool = True) -> list[tuple[str, float]]:
    """ComfyUI's pieces, each with its weight: each weighted segment whole, cut before " embedding:" and
    "\nembedding:" (the prefix stays with the piece after the cut, the space or newline goes)."""
    parsed = token_weights(escape_important(text), 1.0) if parse_weights else [(escape_important(text), 1.0)]
    out = []
    for seg, w in parsed:
        parts = re.split(f" {EMBEDDING}|\n{EMBEDDING}", unescape_important(seg))
        pieces = parts[:1] + [EMBEDDING + p for p in parts[1:]]
        out += [(p, w) for p in pieces if p != ""]
    return out


def chunk(
    word_ids: list[list[tuple[int, float]]], start: int | None, end: int, pad: int, max_length: int = 77,
    min_length: int | None = None, pad_to_max_length: bool = True,
) -> list[list[tuple[int, float]]]:
    """``SDTokenizer.tokenize_with_weights`` packing of per-piece (id, weight) pairs into chunks; BOS, EOS and
    padding weigh 1."""
    chunks: list[list[tuple[int, float]]] = []
    start_, end_, pad_ = [] if start is None else [(start, 1.0)], (end, 1.0), (pad, 1.0)
    batch = list(start_)
    chunks.append(batch)
    for group in word_ids:
        is_large = len(group) >= MAX_WORD_LENGTH
        while group:
            if len(group) + len(batch) > max_length - 1:
                remaining = max_length - len(batch) - 1
                if is_large:  # split the word, close the chunk
                    batch += group[:remaining]
                    batch.append(end_)
                    group = group[remaining:]
                else:  # close the chunk, the word moves whole to the next one
                    batch.append(end_)
                    if pad_to_max_length:
                        batch += [pad_] * remaining
                batch = list(start_)
                chunks.append(batch)
            else:
                batch += group
                group = []
    batch.append(end_)
    if pad_to_max_length:
        batch += [pad_] * (max_length - len(batch))
    if min_length is not None and len(batch) < min_length:
        batch += [pad_] * (min_length - len(batch))
    return chunks


def sai_tokenize(
    text: str, encode_word: Callable[[str], list[int]], *, start: int | None, end: int, pad: int,
    max_length: int = 77, min_length: int | None = None, pad_to_max_length: bool = True, parse_weights: bool = True,
    split: str = "words",
) -> list[list[tuple[int, float]]]:
    """All chunks of ``text`` as (id, weight) pairs; ``encode_word`` returns a piece's content ids (no BOS/EOS);
    ``split``: ``words`` (the SD3.5 code) or ``segments`` (ComfyUI)."""
    pieces = {"words": words, "segments": segments}[split](text, parse_weights)
    return chunk([[(i, w) for i in encode_word(p)] for p, w in pieces], start, end, pad, max_length, min_length,
                 pad_to_max_length)
