"""Record how the Rust CLIP tokenizer treats the code points Python 3.11's Unicode 14 tables leave unassigned.

impl's ``hf`` modes run the Rust pipeline with Python's ``unicodedata``/``str.lower`` and the ``regex`` module.
Those agree with the Rust tokenizer on every code point assigned in Unicode 14 (checked for each single code point
by ``tests/test_clip_tokenizer.py``), but not on later additions: Oniguruma's letter class is older than the
``regex`` module's, Rust's ``char::to_lowercase`` is newer than Python 3.11's, and the Rust NFC normaliser's
canonical combining classes are older than both (it treats 98 combining marks of Unicode 10-14 as starters, so it
neither reorders nor composes across them). This script probes the Rust tokenizer (transformers ``CLIPTokenizer``
over ``tokenizers``) once per such code point and writes ``impl/embedded/unicode_delta.json``: the unassigned
ranges, the Rust class of each (letter, number, space, other), the Rust normalizer output (NFC + lower-case) where
it is not the code point itself, and ``nfc_starters``, the marks with a Unicode 14 combining class that the Rust
NFC orders as class 0.

    python -m parity.make_unicode_delta   # needs Python 3.11 (Unicode 14.0.0) and the pinned tokenizers
"""
from __future__ import annotations

import json
import sys
import unicodedata
from importlib.metadata import version

from impl.clip_tokenizer import UNICODE_DELTA


def ranges(cps: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for c in cps:
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return out


def rust_class(pre, c: str) -> str:
    inner = len(pre.pre_tokenize_str("a" + c + "b"))
    if inner == 1:
        return "letter"
    if inner == 2:
        return "space"
    return "number" if len(pre.pre_tokenize_str(c + c)) == 2 else "other"


ANCHORS = (0x0334, 0x0316, 0x0301)  # combining classes 1, 220, 230 since Unicode 1.1


def nfc_starters(normalizer) -> list[int]:
    """Marks with a combining class in Unicode 14 that the Rust NFC treats as class 0: placed after, or before, a
    mark of every class it knows (one old mark per class, checked against the anchors), it never reorders them.
    Marks that NFC changes on their own (singleton decompositions such as U+0340) are not starters."""
    marks = {c: unicodedata.combining(chr(c)) for c in range(0x110000)
             if not 0xD800 <= c < 0xE000 and unicodedata.combining(chr(c))}
    nfc = normalizer.normalize_str

    def reorders(a: int, b: int) -> bool:
        return nfc(chr(a) + chr(b)) == chr(b) + chr(a)

    def consistent(c: int) -> bool:
        return all(reorders(a, c) == (marks[c] < marks[a]) and reorders(c, a) == (marks[a] < marks[c]) for a in ANCHORS)

    known: dict[int, int] = {}
    for c, k in sorted(marks.items()):
        if k not in known and consistent(c):
            known[k] = c
    return [c for c in sorted(marks) if nfc(chr(c)) == chr(c)
            and not any(reorders(m, c) or reorders(c, m) for m in known.values())]


def main() -> None:
    if unicodedata.unidata_version != "14.0.0":
        sys.exit(f"needs Python 3.11's Unicode 14.0.0 tables (have {unicodedata.unidata_version})")
    from transformers import CLIPTokenizer

    from parity.embedded import model_dir

    backend = CLIPTokenizer.from_pretrained(model_dir() / "tokenizer").backend_tokenizer
    unassigned = [c for c in range(0x110000) if unicodedata.category(chr(c)) == "Cn"]
    classes: dict[str, list[int]] = {"letter": [], "number": [], "space": []}
    normalize = {}
    for c in unassigned:
        kind = rust_class(backend.pre_tokenizer, chr(c))
        if kind in classes:
            classes[kind].append(c)
        n = backend.normalizer.normalize_str(chr(c))
        if n != chr(c):
            normalize[f"{c:X}"] = n
    table = {
        "provenance": f"Rust CLIP tokenizer of tokenizers {version('tokenizers')} (transformers "
                      f"{version('transformers')}), probed per code point by parity/make_unicode_delta.py",
        "base_unicode": unicodedata.unidata_version,
        "unassigned": ranges(unassigned),
        **{k: ranges(v) for k, v in classes.items()},
        "normalize": normalize,
        "nfc_starters": ranges(nfc_starters(backend.normalizer)),
    }
    UNICODE_DELTA.write_text(json.dumps(table, ensure_ascii=True, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"{UNICODE_DELTA}: {len(unassigned)} unassigned code points, "
          + ", ".join(f"{len(v)} {k}" for k, v in classes.items()) + f", {len(normalize)} normalized, {sum(b - a + 1 for a, b in table['nfc_starters'])} NFC starters")


if __name__ == "__main__":
    main()
