"""T5 v1.1 SentencePiece Unigram tokenizer read straight from a ``spiece.model`` (no protobuf, no sentencepiece).

Modes (names are part of the interface):

* ``sentencepiece``  the sentencepiece library (``SentencePieceProcessor.encode``) plus EOS: normalisation byte-wise
                     through the precompiled charsmap (longest match), whitespace collapsing, dummy prefix ``▁``,
                     Viterbi over float32 scores, runs of unknown pieces merged into one ``<unk>``. Special-token
                     strings (``</s>``, ``<extra_id_0>``) are plain text.
* ``hf``             transformers 5.x ``T5Tokenizer`` built from ``spiece.model`` (a Rust ``tokenizers`` pipeline):
                     special-token strings split out first; the charsmap applied per grapheme cluster; whitespace
                     split with ``▁`` prepended to every word; Viterbi over float64 scores; unknowns fused; EOS.

The ``sai`` length rule (first 226 characters, word-wise, pad to at least 77) is built in ``impl.sai_tokenize``.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import regex

from impl.clip_tokenizer import _check_text, special_pattern, split_specials

MODES = ("sentencepiece", "hf")
SPACE = "\u2581"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNK_PENALTY = 10.0
# Rust char::is_whitespace (the Unicode White_Space property); Python's str.split() also splits on \x1c-\x1f
_RUST_WS = regex.compile(r"[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
_GRAPHEME = regex.compile(r"\X")


# ---------------------------------------------------------------------------------------------- protobuf

def _varint(buf: bytes, pos: int, where: str) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError(f"{where}: truncated varint at byte {pos}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError(f"{where}: malformed varint at byte {pos}")


def _fields(buf: bytes, where: str):
    """Yield (field number, wire type, value) of one protobuf message. Value: int, or bytes for wire type 2."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos, where)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, where)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos, where)
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"{where}: unsupported protobuf wire type {wire} (field {field}) at byte {pos}")
        if pos > len(buf):
            raise ValueError(f"{where}: field {field} runs past the end of the data (truncated file?)")
        yield field, wire, value


@dataclass(frozen=True)
class SentencePieceModel:
    pieces: list[tuple[str, float, int]]  # (piece, score, type)
    charsmap: bytes
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    escape_whitespaces: bool
    source: str

    @classmethod
    def load(cls, path: str | Path) -> "SentencePieceModel":
        path = Path(path)
        data = path.read_bytes()
        where = str(path)
        pieces, norm = [], None
        for field, wire, value in _fields(data, where):
            if field == 1 and wire == 2:
                piece, score, kind = None, 0.0, NORMAL
                for f, w, v in _fields(value, f"{where} (piece {len(pieces)})"):
                    if f == 1 and w == 2:
                        piece = v.decode("utf-8")
                    elif f == 2 and w == 5:
                        score = struct.unpack("<f", v)[0]
                    elif f == 3 and w == 0:
                        kind = v
                if piece is None:
                    raise ValueError(f"{where}: piece {len(pieces)} has no text")
                pieces.append((piece, score, kind))
            elif field == 3 and wire == 2:
                norm = value
        if not pieces:
            raise ValueError(f"{where}: no vocabulary pieces found; not a SentencePiece model")
        spec = {2: b"", 3: 1, 4: 1, 5: 1}
        for f, w, v in _fields(norm or b"", f"{where} (normalizer_spec)"):
            if f in spec and w != (2 if f == 2 else 0):
                raise ValueError(f"{where}: normalizer_spec field {f} has wire type {w}, expected "
                                 f"{'bytes' if f == 2 else 'a varint'}")
            spec[f] = v
        return cls(pieces, spec[2], bool(spec[3]), bool(spec[4]), bool(spec[5]), where)


# ---------------------------------------------------------------------------------------------- normaliser

class CharsMap:
    """The precompiled charsmap: a darts-clone double-array trie over UTF-8 bytes -> replacement strings."""

    def __init__(self, blob: bytes, where: str):
        if not blob:
            self.units, self.strings = [], b""
            return
        if len(blob) < 4:
            raise ValueError(f"{where}: precompiled charsmap shorter than its 4-byte header")
        (size,) = struct.unpack_from("<I", blob)
        if size % 4 or 4 + size > len(blob):
            raise ValueError(f"{where}: precompiled charsmap trie size {size} does not fit in {len(blob)} bytes")
        self.units = list(struct.unpack_from(f"<{size // 4}I", blob, 4))
        self.strings = blob[4 + size :]

    def prefixes(self, key: bytes) -> list[tuple[int, int]]:
        """All (byte length, string offset) pairs for prefixes of ``key`` in the trie, shortest first."""
        units, out = self.units, []
        if not units:
            return out
        unit = units[0]
        pos = (unit >> 10) << ((unit & (1 << 9)) >> 6)
        for i, c in enumerate(key):
            if c == 0:
                break
            pos ^= c
            if pos >= len(units):
                break
            unit = units[pos]
            if unit & 0x800000FF != c:
                break
            pos ^= (unit >> 10) << ((unit & (1 << 9)) >> 6)
            if (unit >> 8) & 1:
                out.append((i + 1, units[pos] & 0x7FFFFFFF))
        return out

    def string_at(self, offset: int) -> bytes:
        end = self.strings.find(b"\0", offset)
        return self.strings[offset : end if end >= 0 else len(self.strings)]


def _utf8_len(lead: int) -> int:
    return 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4


# ---------------------------------------------------------------------------------------------- tokenizer

@dataclass(frozen=True)
class T5Tokens:
    ids: list[int]  # the padded sequence the encoder receives
    n_content: int  # ids before EOS
    truncated: int  # content ids dropped by the length rule


class T5Tokenizer:
    def __init__(self, model: SentencePieceModel, mode: str = "hf", extra_ids: int = 100):
        if mode not in MODES:
            raise ValueError(f"unknown T5 tokenizer mode {mode!r}; expected one of {', '.join(MODES)}")
        self.model, self.mode = model, mode
        self.charsmap = CharsMap(model.charsmap, model.source)
        vocab = [p for p, _, _ in model.pieces] + [f"<extra_id_{i}>" for i in reversed(range(extra_ids))]
        self.id_to_piece = vocab
        kinds = {k: [i for i, (_, _, t) in enumerate(model.pieces) if t == k] for k in (UNKNOWN, CONTROL)}
        if len(kinds[UNKNOWN]) != 1:
            raise ValueError(f"{model.source}: expected exactly one <unk> piece, found {len(kinds[UNKNOWN])}")
        self.unk_id = kinds[UNKNOWN][0]
        self.eos_id = self._id_of("</s>")
        self.pad_id = self._id_of("<pad>")
        if mode == "sentencepiece":  # the library's trie holds NORMAL, USER_DEFINED and UNUSED pieces
            scores = {p: (i, s) for i, (p, s, t) in enumerate(model.pieces) if t in (NORMAL, USER_DEFINED, UNUSED)}
            self.min_score = min(s for p, s, t in model.pieces if t == NORMAL)
            self._unused = {i for i, (_, _, t) in enumerate(model.pieces) if t == UNUSED}
        else:  # tokenizers' Unigram holds every vocabulary entry; extra ids score 0
            scores = {p: (i, float(s)) for i, (p, s, _) in enumerate(model.pieces)}
            scores.update({p: (i, 0.0) for i, p in enumerate(vocab) if i >= len(model.pieces)})
            self.min_score = min(s for _, s in scores.values())
            self._unused = set()
        self._pieces = {p.encode("utf-8"): v for p, v in scores.items()}
        self._max_len = max(map(len, self._pieces))
        specials = [self.id_to_piece[i] for i in kinds[CONTROL] + [self.unk_id]] + vocab[len(model.pieces) :]
        self._special_re = special_pattern(specials)
        self._special_ids = {s: self._id_of(s) for s in specials}

    def _id_of(self, piece: str) -> int:
        try:
            return self.id_to_piece.index(piece)
        except ValueError:
            raise ValueError(f"{self.model.source}: vocabulary has no {piece!r} piece") from None

    # -- normalisation -------------------------------------------------------------------------------------
    def _spm_prefix(self, data: bytes, pos: int) -> tuple[bytes, int]:
        hits = self.charsmap.prefixes(data[pos : pos + 64])
        if hits:
            n, off = max(hits)
            return self.charsmap.string_at(off), n
        n = _utf8_len(data[pos])
        return data[pos : pos + n], n

    def normalize_spm(self, text: str) -> bytes:
        """sentencepiece ``Normalizer::Normalize``: returns the normalised UTF-8 with spaces escaped to ``▁``."""
        data, pos, m = text.encode("utf-8"), 0, self.model
        if m.remove_extra_whitespaces:
            while pos < len(data):
                rep, n = self._spm_prefix(data, pos)
                if rep != b" ":
                    break
                pos += n
        if pos >= len(data):
            return b""
        out = bytearray(SPACE.encode() if m.add_dummy_prefix else b"")
        prev_space = m.remove_extra_whitespaces
        while pos < len(data):
            rep, n = self._spm_prefix(data, pos)
            while prev_space and rep.startswith(b" "):
                rep = rep[1:]
            if rep:
                out += rep.replace(b" ", SPACE.encode()) if m.escape_whitespaces else rep
                prev_space = rep.endswith(b" ")
            pos += n
            if not m.remove_extra_whitespaces:
                prev_space = False
        if m.remove_extra_whitespaces:
            sp = SPACE.encode() if m.escape_whitespaces else b" "
            while out.endswith(sp):
                del out[-len(sp) :]
        return bytes(out)

    def _precompiled(self, text: str) -> str:
        """tokenizers' ``Precompiled`` normaliser: per grapheme cluster (< 6 bytes) first, else per character."""
        out = []
        for g in _GRAPHEME.findall(text):
            gb = g.encode("utf-8")
            if len(gb) < 6:
                hits = self.charsmap.prefixes(gb)
                if hits:
                    out.append(self.charsmap.string_at(hits[0][1]).decode("utf-8"))
                    continue
            for c in g:
                hits = self.charsmap.prefixes(c.encode("utf-8"))
                out.append(self.charsmap.string_at(hits[0][1]).decode("utf-8") if hits else c)
        return "".join(out)

    # -- segmentation --------------------------------------------------------------------------------------
    def _viterbi(self, data: bytes, f32: bool) -> list[int]:
        size = len(data)
        score_at = [0.0] * (size + 1)
        start_at = [-1] * (size + 1)
        id_at = [-1] * (size + 1)
        unk_score = self.min_score - UNK_PENALTY
        if f32:
            unk_score = _f32(unk_score)
        pos = 0
        while pos < size:
            base = score_at[pos]
            mblen = min(_utf8_len(data[pos]), size - pos)
            single = False
            for end in range(pos + 1, min(size, pos + self._max_len) + 1):
                hit = self._pieces.get(data[pos:end])
                if hit is None or hit[0] in self._unused:
                    continue
                cand = _f32(hit[1] + base) if f32 else hit[1] + base
                if start_at[end] == -1 or cand > score_at[end]:
                    score_at[end], start_at[end], id_at[end] = cand, pos, hit[0]
                single |= end - pos == mblen
            if not single:
                end = pos + mblen
                cand = _f32(unk_score + base) if f32 else unk_score + base
                if start_at[end] == -1 or cand > score_at[end]:
                    score_at[end], start_at[end], id_at[end] = cand, pos, self.unk_id
            pos += mblen
        ids, end = [], size
        while end > 0:  # backtrack; runs of unknowns become one <unk> in both libraries
            i = id_at[end]
            if not (i == self.unk_id and ids and ids[-1] == self.unk_id):
                ids.append(i)
            end = start_at[end]
        return ids[::-1]

    def encode(self, text: str) -> list[int]:
        """Content ids, without EOS."""
        _check_text(text)
        if self.mode == "sentencepiece":
            return self._viterbi(self.normalize_spm(text), f32=True)
        return split_specials(text, self._special_re, self._special_ids, self._hf_segment)

    def _hf_segment(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in _RUST_WS.split(self._precompiled(text)):
            if word:
                ids += self._viterbi((SPACE + word.replace(" ", SPACE)).encode("utf-8"), f32=False)
        return ids

    def pad_to(self, content: list[int], length: int) -> T5Tokens:
        """diffusers: truncate to ``length - 1`` content ids, EOS, pad with ``<pad>`` to ``length``."""
        body = content[: length - 1]
        ids = body + [self.eos_id] + [self.pad_id] * (length - 1 - len(body))
        return T5Tokens(ids, len(body), len(content) - len(body))

    def token_strings(self, ids: list[int]) -> list[str]:
        return [self.id_to_piece[i] if 0 <= i < len(self.id_to_piece) else f"<{i}>" for i in ids]


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]
