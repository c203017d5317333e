"""CLIP byte-level BPE tokenizer, reproducing several existing tokenizers id for id.

Modes (the names are part of the interface):

* ``openai``         OpenAI ``clip/simple_tokenizer.py`` ``SimpleTokenizer``: ftfy, ``html.unescape`` twice,
                     whitespace collapse, ``str.lower()``, its regex with ``re.IGNORECASE``.
                     transformers 4.x slow ``CLIPTokenizer`` with ftfy installed gives the same ids.
* ``hf``             the Rust tokenizer (transformers 5.x ``CLIPTokenizer``, 4.x ``CLIPTokenizerFast``): special-token
                     strings split out first, then NFC, ``\\s+`` -> space, per-character lower-casing, the regex
                     without IGNORECASE.
* ``hf-bang-pad``    ``hf`` with ``!`` registered as a special token (diffusers' SD3 ``tokenizer_2``): every ``!``
                     is split out before BPE and becomes id 0.
* ``hf-slow-noftfy`` transformers 4.x slow ``CLIPTokenizer`` when ftfy is missing: BERT ``BasicTokenizer`` cleaning
                     (control characters deleted, CJK ideographs isolated) instead of ftfy.

The SD3.5 reference's word-wise procedure on top of any of these lives in ``impl.sai_tokenize``.
Vocabulary: ``vocab.json`` + ``merges.txt`` or OpenAI's ``bpe_simple_vocab_16e6.txt.gz``.
"""
from __future__ import annotations

import gzip
import html
import json
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import regex

MODES = ("openai", "hf", "hf-bang-pad", "hf-slow-noftfy")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
N_MERGES = 49152 - 256 - 2  # OpenAI reads lines [1 : 49152-256-2+1] of the gz file

_PAT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_PAT_ICASE = regex.compile(_PAT, regex.IGNORECASE)  # OpenAI and transformers 4.x slow
# the Rust ByteLevel pre-tokenizer (use_regex=True) re-splits every piece of _PAT with GPT-2's pattern
_GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_WS = regex.compile(r"\s+")
UNICODE_DELTA = Path(__file__).resolve().parent / "embedded" / "unicode_delta.json"


@dataclass(frozen=True)
class _Patterns:
    split: regex.Pattern  # _PAT, case-sensitive (Oniguruma)
    gpt2: regex.Pattern  # the ByteLevel re-split
    ws: regex.Pattern  # the normalizer's \s+


@dataclass(frozen=True)
class _RustUnicode:
    """The Rust pipeline's character data: Python's for code points assigned in Unicode 14, the recorded table
    (``parity/make_unicode_delta.py``) for the rest, so results do not follow the Python or ``regex`` version.
    Texts without such code points take the plain patterns (same result, several times faster)."""

    plain: _Patterns
    delta: _Patterns
    unassigned: regex.Pattern  # any code point unassigned in Unicode 14
    normalize: dict[str, str]  # NFC + lower-case of those code points, where not the identity
    starters: regex.Pattern  # splits a text at the marks the Rust NFC orders as class 0 (kept, as groups)

    def nfc(self, text: str) -> str:
        """The Rust normaliser's NFC: Python's, except that nothing reorders or composes across a recorded starter
        (the Rust tables give those marks class 0 and no decomposition)."""
        if self.starters.search(text) is None:
            return unicodedata.normalize("NFC", text)
        return "".join(p if i % 2 else unicodedata.normalize("NFC", p) for i, p in enumerate(self.starters.split(text)))


def _ranges(rs: list[list[int]]) -> str:
    return "".join(f"\\U{a:08X}-\\U{b:08X}" for a, b in rs)


@lru_cache(maxsize=None)
def _rust_unicode() -> _RustUnicode:
    try:
        d = json.loads(UNICODE_DELTA.read_text(encoding="utf-8"))
        u = _ranges(d["unassigned"])
        sets = {prop: f"[[{prop}--[{u}]]{_ranges(d[key])}]" if d[key] else f"[{prop}--[{u}]]"
                for prop, key in ((r"\p{L}", "letter"), (r"\p{N}", "number"), (r"\s", "space"))}
        normalize = {chr(int(k, 16)): v for k, v in d["normalize"].items()}
        starters = regex.compile(f"([{_ranges(d['nfc_starters'])}])")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{UNICODE_DELTA}: damaged Unicode delta table ({e!r})") from None

    def with_delta(pattern: str) -> regex.Pattern:
        for prop, body in sets.items():  # \p{L} -> [[\p{L}--[unassigned]][recorded letters]], same for \p{N}, \s
            pattern = pattern.replace(prop, body)
        return regex.compile("(?V1)" + pattern)

    plain = _Patterns(regex.compile(_PAT), regex.compile(_GPT2), _WS)
    delta = _Patterns(with_delta(_PAT), with_delta(_GPT2), with_delta(r"\s+"))
    return _RustUnicode(plain, delta, regex.compile(f"[{u}]"), normalize, starters)


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable character table (256 entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class BPEVocab:
    """Token <-> id table plus merge ranks, with a cached BPE word splitter."""

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]], source: str):
        self.encoder = encoder
        self.decoder = {i: t for t, i in encoder.items()}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.source = source
        for special in (BOS, EOS):
            if special not in encoder:
                raise ValueError(f"{source}: vocabulary has no {special!r} entry")
        self.bos_id, self.eos_id = encoder[BOS], encoder[EOS]
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_openai_gz(cls, path: str | Path) -> "BPEVocab":
        path = Path(path)
        try:
            lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a readable gzip'd UTF-8 BPE table ({e})") from None
        merges = _parse_merges(lines[1 : N_MERGES + 1], path, first_line=2)
        if len(merges) != N_MERGES:
            raise ValueError(f"{path}: expected {N_MERGES} merges after the header line, found {len(merges)} (truncated?)")
        units = list(bytes_to_unicode().values())
        vocab = units + [u + "</w>" for u in units] + ["".join(m) for m in merges] + [BOS, EOS]
        return cls({t: i for i, t in enumerate(vocab)}, merges, str(path))

    @classmethod
    def from_files(cls, vocab_json: str | Path, merges_txt: str | Path) -> "BPEVocab":
        vocab_json, merges_txt = Path(vocab_json), Path(merges_txt)
        try:
            encoder = json.loads(vocab_json.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{vocab_json}: not a readable JSON vocabulary ({e})") from None
        if not isinstance(encoder, dict) or not all(type(v) is int and v >= 0 for v in encoder.values()):
            raise ValueError(f"{vocab_json}: expected a JSON object mapping token strings to integer ids >= 0")
        try:
            lines = merges_txt.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{merges_txt}: not a readable UTF-8 merges file ({e})") from None
        start = 1 if lines and lines[0].startswith("#version") else 0
        merges = _parse_merges(lines[start:], merges_txt, first_line=start + 1)
        for i, (a, b) in enumerate(merges):
            if a + b not in encoder:
                raise ValueError(f"{merges_txt}:{start + i + 1}: merge result {a + b!r} is not in {vocab_json.name}")
        return cls(encoder, merges, str(vocab_json.parent))

    @classmethod
    def from_dir(cls, directory: str | Path) -> "BPEVocab":
        d = Path(directory)
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            return cls.from_files(d / "vocab.json", d / "merges.txt")
        gz = d / "bpe_simple_vocab_16e6.txt.gz"
        if gz.is_file():
            return cls.from_openai_gz(gz)
        raise FileNotFoundError(f"{d}: no vocab.json + merges.txt and no bpe_simple_vocab_16e6.txt.gz")

    def bpe(self, word: str) -> list[int]:
        """Ids of one pre-token already mapped through ``bytes_to_unicode``. Lowest-rank pair merges first."""
        hit = self._cache.get(word)
        if hit is not None:
            return hit
        parts = merge_lowest_first(list(word[:-1]) + [word[-1] + "</w>"], self.ranks)
        ids = [self.encoder[p] for p in parts]
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids


def merge_lowest_first(parts: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """OpenAI's BPE loop: repeatedly take the lowest-ranked adjacent pair and merge every occurrence of it, left to
    right without overlap. Kept in O(n log n) on long unbroken words (a heap of pairs, a linked list of parts, the
    occurrences of each pair) instead of rescanning the word per merge."""
    import heapq

    n = len(parts)
    if n < 2:
        return parts
    nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
    alive = [True] * n
    where: dict[tuple[str, str], set[int]] = {}  # pair -> left node indices
    heap: list[tuple[int, tuple[str, str]]] = []

    def add(i: int) -> None:
        j = nxt[i]
        if j < n:
            pair = (parts[i], parts[j])
            r = ranks.get(pair)
            if r is not None:
                if pair not in where:
                    where[pair] = set()
                    heapq.heappush(heap, (r, pair))
                where[pair].add(i)

    def drop(i: int) -> None:
        j = nxt[i]
        if i >= 0 and j < n:
            occ = where.get((parts[i], parts[j]))
            if occ is not None:
                occ.discard(i)

    for i in range(n - 1):
        add(i)
    while heap:
        _, pair = heapq.heappop(heap)
        occ = where.pop(pair, None)
        if not occ:
            continue
        for i in sorted(occ):
            j = nxt[i]
            if not alive[i] or j >= n or (parts[i], parts[j]) != pair:
                continue  # consumed by an overlapping occurrence merged just before
            drop(prv[i])
            drop(j)
            parts[i] += parts[j]
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                add(prv[i])
            add(i)
        where.pop(pair, None)  # occurrences re-created by this pass belong to the next one (as OpenAI's loop)
    out, i = [], 0
    while i < n:
        out.append(parts[i])
        i = nxt[i]
    return out


def _parse_merges(lines: list[str], path: Path, first_line: int) -> list[tuple[str, str]]:
    merges = []
    for n, line in enumerate(lines):
        if line == "" and n >= len(lines) - 1:
            break  # trailing newline
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{first_line + n}: expected two space-separated symbols, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


# ---------------------------------------------------------------------------------------------- text cleaning

def _clean_openai(text: str) -> str:
    import ftfy  # only this mode asks for it

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WS.sub(" ", text).strip().lower()


def _is_control(c: str) -> bool:  # transformers' BERT helpers
    if c in "\t\n\r":
        return False
    return unicodedata.category(c).startswith("C")


def _is_whitespace(c: str) -> bool:
    return c in " \t\n\r" or unicodedata.category(c) == "Zs"


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _clean_basic(text: str) -> str:
    """transformers 4.x ``BasicTokenizer(strip_accents=False, do_split_on_punc=False).tokenize`` joined by spaces."""
    out = []
    for c in text:
        cp = ord(c)
        if cp == 0 or cp == 0xFFFD or _is_control(c):
            continue
        if _is_whitespace(c):
            out.append(" ")
        elif _is_cjk(cp):
            out.append(f" {c} ")
        else:
            out.append(c)
    words = unicodedata.normalize("NFC", "".join(out)).split()
    return " ".join(" ".join(w.lower() for w in words).split())


def _clean_rust(text: str, ru: _RustUnicode, p: _Patterns, delta: bool) -> str:
    """NFC, ``\\s+`` -> one space, per-character lower-casing (no Final_Sigma rule)."""
    text = p.ws.sub(" ", ru.nfc(text))
    if text.isascii():
        return text.lower()
    if not delta:
        return "".join(c.lower() for c in text)
    return "".join(ru.normalize.get(c, c) if ru.unassigned.match(c) else c.lower() for c in text)


# ---------------------------------------------------------------------------------------------- tokenizer

@dataclass(frozen=True)
class ClipTokens:
    """One 77-slot CLIP input: ``ids`` is exactly what the encoder receives."""

    ids: list[int]
    pooled_index: int  # first EOS (== argmax of ids for the CLIP vocabulary)
    n_content: int  # content tokens kept (<= 75)
    truncated: int  # content tokens dropped


class ClipTokenizer:
    """Content ids of a prompt under one mode, and the 77-slot layout (BOS + <=75 + EOS + pad)."""

    def __init__(self, vocab: BPEVocab, mode: str = "hf", pad_id: int | None = None, max_length: int = 77):
        if mode not in MODES:
            raise ValueError(f"unknown CLIP tokenizer mode {mode!r}; expected one of {', '.join(MODES)}")
        self.vocab, self.mode, self.max_length = vocab, mode, max_length
        self.pad_id = vocab.eos_id if pad_id is None else pad_id
        specials = [BOS, EOS] + (["!"] if mode == "hf-bang-pad" else [])
        self._special_re = special_pattern(specials)
        self._special_ids = {BOS: vocab.bos_id, EOS: vocab.eos_id, "!": 0}

    def encode(self, text: str) -> list[int]:
        """Content ids (no BOS/EOS, no padding, no truncation)."""
        _check_text(text)
        if self.mode == "openai":
            return self._bpe_pieces(_clean_openai(text), _PAT_ICASE, lowered_specials=True)
        return split_specials(text, self._special_re, self._special_ids, self._segment)

    def _segment(self, text: str) -> list[int]:
        if not text:
            return []
        if self.mode == "hf-slow-noftfy":
            return self._bpe_pieces(_clean_basic(text), _PAT_ICASE, lowered_specials=True)
        ru = _rust_unicode()
        delta = ru.unassigned.search(text) is not None
        p = ru.delta if delta else ru.plain
        return self._bpe_pieces(_clean_rust(text, ru, p, delta), p.split, lowered_specials=False, resplit=p.gpt2)

    def _bpe_pieces(self, text: str, pat: regex.Pattern, lowered_specials: bool,
                    resplit: regex.Pattern | None = None) -> list[int]:
        b2u = bytes_to_unicode()
        ids: list[int] = []
        pieces = pat.findall(text)
        if resplit is not None:
            pieces = [q for p in pieces for q in resplit.findall(p)]
        for piece in pieces:
            if lowered_specials and piece in self._special_ids and piece != "!":
                ids.append(self._special_ids[piece])  # OpenAI's pre-filled cache; matches after lower-casing
                continue
            ids += self.vocab.bpe("".join(b2u[b] for b in piece.encode("utf-8")))
        return ids

    def __call__(self, text: str) -> ClipTokens:
        return self.layout(self.encode(text))

    def layout(self, content: list[int]) -> ClipTokens:
        """BOS + first ``max_length - 2`` content ids + EOS, padded with ``pad_id``."""
        keep = self.max_length - 2
        body = content[:keep]
        ids = [self.vocab.bos_id] + body + [self.vocab.eos_id]
        ids += [self.pad_id] * (self.max_length - len(ids))
        return ClipTokens(ids, ids.index(self.vocab.eos_id), len(body), max(0, len(content) - keep))

    def token_strings(self, ids: list[int]) -> list[str]:
        return [self.vocab.decoder.get(i, f"<{i}>") for i in ids]


def special_pattern(specials: list[str]) -> regex.Pattern:
    """Added tokens matched in the raw text, longest first (like the Rust added-vocabulary trie)."""
    return regex.compile("|".join(regex.escape(t) for t in sorted(specials, key=len, reverse=True)))


def split_specials(text: str, pattern: regex.Pattern, special_ids: dict[str, int], segment) -> list[int]:
    """Ids of ``text`` with added tokens split out first and every other run passed to ``segment``."""
    ids: list[int] = []
    pos = 0
    for m in pattern.finditer(text):
        ids += segment(text[pos : m.start()])
        ids.append(special_ids[m.group()])
        pos = m.end()
    return ids + segment(text[pos:])


def _check_text(text: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a str, got {type(text).__name__}")
    m = regex.search(r"[\ud800-\udfff]", text)
    if m:
        raise ValueError(f"prompt has an unpaired surrogate U+{ord(m.group()):04X} at index {m.start()}; "
                         "it cannot be encoded as UTF-8")
