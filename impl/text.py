"""SD3 prompt encoding: three tokenizers, three encoders, and the conditioning assembly (QUIRKS C1/C2, T1-T10).

Every behaviour that differs between references is a plain value in ``TextSettings``; named profiles live in
``parity.flags``. ``encode_prompt`` returns the context (B, 77 + L_t5, joint) and pooled (B, 2048-like) tensors
plus the token ids each encoder received.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from impl import sai_tokenize
from impl.clip import ClipOutput, ClipTextEncoder
from impl.clip_tokenizer import BPEVocab, ClipTokenizer
from impl.t5 import T5Encoder
from impl.t5_tokenizer import SentencePieceModel, T5Tokenizer


@dataclass(frozen=True, kw_only=True)
class TextSettings:
    clip_l_mode: str = "hf"  # base CLIP tokenizer mode (impl.clip_tokenizer.MODES)
    clip_g_mode: str = "hf-bang-pad"
    clip_l_pad: int = 49407
    clip_g_pad: int = 0
    split: str = "whole"  # the prompt tokenized whole; "words": weight parser, each word alone, 77-slot chunks
    #                       (the SD3.5 code); "segments": weight parser, each weighted segment alone (ComfyUI) (T1-T3)
    weights: str = "discard"  # parsed prompt weights: "apply": (z - z_empty) * w + z_empty per token (ComfyUI)
    chunks: str = "first"  # the 77-token CLIP chunks encoded: chunk 0, or "all" concatenated (ComfyUI)
    t5_mode: str = "hf"
    t5_length_rule: str = "max_length"  # pad/truncate to t5_max_length; "chars226_min77": 226 chars, >= 77 tokens;
    #                                     "min77": >= 77 tokens, no cut (ComfyUI)
    t5_max_length: int = 256
    t5_mask: bool = False  # pass the padding mask to T5 (no reference does: T9)
    t5_attention: str = "sdpa"  # "sdpa" (transformers 5), "eager" (transformers 4.x) or "matmul" (ComfyUI's CPU)
    clip_attention: str = "sdpa"  # or "matmul": impl.math.matmul_attention (ComfyUI's CPU kernel)
    t5_activation: str | None = None  # None: the config's (gelu_new for gated-gelu); "gelu_tanh": torch's tanh GELU
    t5_absent: str | None = None  # None: T5 runs; "zeros": zero rows of t5_absent_length; "none": no rows (T10)
    t5_absent_length: int = 256
    clip_pool: str = "argmax"  # T6
    clip_l_pooled_projected: bool = True  # diffusers projects CLIP-L's pooled vector, SAI does not (T6)
    encoder_dtype: torch.dtype | None = None  # None: run encoders in the pipeline dtype (diffusers); else e.g. fp32 (T7)
    weight_storage: torch.dtype | None = None  # encoder weights rounded through this dtype, computed in the encoder
    #                                            dtype (ComfyUI stores text encoders in float16 and casts per op)
    empty_encoder_text: str = "prompt"  # per-encoder texts: an empty CLIP-G or T5 text is replaced by the CLIP-L
    #                                     text (diffusers' ``prompt_2 or prompt``), or "empty": encoded as empty (T12)


SAI_T5_CHARS = 226  # sd3_infer / other_impls: text[:226]
SAI_T5_MIN = 77


@dataclass
class TextStack:
    """Tokenizer files and encoder modules of one model."""

    vocab: BPEVocab
    spiece: SentencePieceModel
    clip_l: ClipTextEncoder
    clip_g: ClipTextEncoder
    t5: T5Encoder | None
    quantized: dict[str, list[str]] = field(default_factory=dict)  # encoder -> its scaled-fp8 layers (impl.quant)
    _cache: dict = field(default_factory=dict)

    def clip_tokenizer(self, mode: str, pad: int) -> ClipTokenizer:
        key = ("clip", mode, pad)
        if key not in self._cache:
            self._cache[key] = ClipTokenizer(self.vocab, mode, pad)
        return self._cache[key]

    def encoder(self, name: str, dtype: torch.dtype, storage: torch.dtype | None = None):
        """``clip_l``, ``clip_g`` or ``t5`` in ``dtype``: a cached copy, so the loaded float32 weights are never
        rounded in place (running in bfloat16 and then in float32 gives float32 results). T5 in float16 keeps its
        ``wo`` layers in float32 as transformers does. ``storage``: every weight rounded through that dtype first
        (weights stored in it and cast to ``dtype`` by each op), except a scaled-fp8 layer's, which was dequantized
        in float32, the dtype it computes in."""
        import copy

        master = getattr(self, name)
        if master is None or (storage is None and dtype == next(master.parameters()).dtype):
            return master
        key = ("encoder", name, dtype, storage)
        if key not in self._cache:
            from impl.weights import round_through

            model = copy.deepcopy(master)
            if storage is not None:
                round_through(model, storage, skip=frozenset(f"{k}.weight" for k in self.quantized.get(name, ())))
            self._cache[key] = model.half_keep_wo_fp32() if name == "t5" and dtype == torch.float16 else model.to(dtype)
        return self._cache[key]

    def t5_tokenizer(self, mode: str) -> T5Tokenizer:
        key = ("t5", mode)
        if key not in self._cache:
            self._cache[key] = T5Tokenizer(self.spiece, mode)
        return self._cache[key]


SPLITS = ("whole", "words", "segments")
Chunks = list[list[tuple[int, float]]]  # 77-slot chunks of (id, weight)
Prompt = str | tuple[str, str, str]  # one text for the three encoders, or CLIP-L's, CLIP-G's and T5's


def encoder_texts(prompt: Prompt, s: TextSettings) -> tuple[str, str, str]:
    """The texts CLIP-L, CLIP-G and T5 encode (``empty_encoder_text``: what an empty CLIP-G / T5 text means)."""
    if isinstance(prompt, str):
        return prompt, prompt, prompt
    if not (isinstance(prompt, tuple) and len(prompt) == 3 and all(isinstance(x, str) for x in prompt)):
        raise ValueError(f"prompt {prompt!r}: a string, or a tuple of CLIP-L's, CLIP-G's and T5's texts")
    if s.empty_encoder_text not in ("prompt", "empty"):
        raise ValueError(f"empty_encoder_text {s.empty_encoder_text!r}: expected 'prompt' or 'empty'")
    l, g, t5 = prompt
    if s.empty_encoder_text == "prompt":
        return l, g or l, t5 or l
    return prompt


def clip_chunks(stack: TextStack, prompt: str, mode: str, pad: int, split: str) -> Chunks:
    """Every chunk of the prompt's CLIP tokens with their weights (``whole``: one chunk, truncated, weight 1)."""
    tok = stack.clip_tokenizer(mode, pad)
    if split == "whole":
        return [[(i, 1.0) for i in tok(prompt).ids]]
    if split not in SPLITS:
        raise ValueError(f"unknown prompt split {split!r}; expected one of {SPLITS}")
    v = stack.vocab
    return sai_tokenize.sai_tokenize(prompt, tok.encode, start=v.bos_id, end=v.eos_id, pad=pad, split=split)


def clip_ids(stack: TextStack, prompt: str, mode: str, pad: int, split: str) -> list[int]:
    """Chunk 0's ids."""
    return [i for i, _ in clip_chunks(stack, prompt, mode, pad, split)[0]]


def t5_chunk(stack: TextStack, prompt: str, s: TextSettings) -> list[tuple[int, float]]:
    """T5's one sequence of (id, weight)."""
    tok = stack.t5_tokenizer(s.t5_mode)
    if s.t5_length_rule == "max_length":
        return [(i, 1.0) for i in tok.pad_to(tok.encode(prompt), s.t5_max_length).ids]
    if s.t5_length_rule in ("chars226_min77", "min77"):
        text = prompt[:SAI_T5_CHARS] if s.t5_length_rule == "chars226_min77" else prompt
        split = "segments" if s.split == "segments" else "words"
        return sai_tokenize.sai_tokenize(text, tok.encode, start=None, end=tok.eos_id, pad=tok.pad_id,
                                         max_length=99999999, min_length=SAI_T5_MIN, pad_to_max_length=False,
                                         parse_weights=s.split != "whole", split=split)[0]
    raise ValueError(f"unknown T5 length rule {s.t5_length_rule!r}; expected 'max_length', 'chars226_min77' or "
                     "'min77'")


def t5_ids(stack: TextStack, prompt: str, s: TextSettings) -> list[int]:
    return [i for i, _ in t5_chunk(stack, prompt, s)]


def weighted(z: Tensor, rows: Chunks, sections: int) -> Tensor:
    """ComfyUI's prompt weights: ``z`` holds ``sections`` encoded rows and, after them, the empty sequence's;
    each token whose weight is not 1 becomes ``(z - z_empty) * w + z_empty`` (float32 weights, one op each)."""
    w = torch.tensor([[wt for _, wt in r] for r in rows[:sections]], dtype=torch.float32)[..., None].to(z.dtype)
    z, empty = z[:sections], z[sections:sections + 1]
    return torch.where(w != 1, (z - empty) * w + empty, z)


def empty_row(length: int, start: int | None, end: int, pad: int) -> list[tuple[int, float]]:
    """The empty sequence ComfyUI appends to a weighted batch: [start] + [end] + pad up to ``length``."""
    ids = ([] if start is None else [start]) + [end]
    return [(i, 1.0) for i in ids + [pad] * (length - len(ids))]


@dataclass
class Conditioning:
    context: Tensor  # (B, 77 + L_t5, joint)
    pooled: Tensor  # (B, W_l + W_g)
    ids: dict[str, list[int]]
    clip_l: ClipOutput | None  # None: no CLIP rows (``encode_prompt``'s ``unpadded`` empty texts)
    clip_g: ClipOutput | None
    t5: Tensor | None


def assemble(l_hidden: Tensor, g_hidden: Tensor, t5_hidden: Tensor, l_pooled: Tensor, g_pooled: Tensor) -> tuple[Tensor, Tensor]:
    """C1: [L | G] zero-padded on the right to the T5 width, then the T5 rows after it along the sequence.

    Padding is ``F.pad`` by ``t5_width - clip_width`` exactly as diffusers does: a negative amount *truncates*
    the CLIP features silently (diffusers' own tiny test config hits this).
    """
    n = min(l_hidden.shape[1], g_hidden.shape[1])  # ComfyUI cuts to the shorter (equal chunk counts here)
    clip = torch.cat([l_hidden[:, :n], g_hidden[:, :n]], dim=-1)  # (B, 77 k, W_l + W_g)
    clip = F.pad(clip, (0, t5_hidden.shape[-1] - clip.shape[-1]))  # (B, 77, joint)
    return torch.cat([clip, t5_hidden], dim=-2), torch.cat([l_pooled, g_pooled], dim=-1)


def batch(rows: Chunks, s: TextSettings, start: int | None, end: int, pad: int) -> tuple[Chunks, int]:
    """The sequences one encoder call runs: the chunks kept (chunk 0, or all), then, when weights are applied
    and any differs from 1, the empty sequence. Returns them and how many are the prompt's."""
    rows = rows if s.chunks == "all" else rows[:1]
    if s.weights == "apply" and any(w != 1.0 for r in rows for _, w in r):
        return rows + [empty_row(max(len(r) for r in rows), start, end, pad)], len(rows)
    return rows, len(rows)


def encoder_rows(stack: TextStack, prompt: Prompt, s: TextSettings, unpadded: bool = False) -> dict[str, tuple[Chunks, int]]:
    """Per encoder (``clip-l``, ``clip-g``, ``t5`` unless absent), the sequences its one call runs and how many of
    them are the prompt's (``batch``). Per-encoder texts (ComfyUI's ``CLIPTextEncodeSD3``): the CLIP encoder with
    fewer chunks gets its empty text's first chunk appended until both have as many. ``unpadded`` (that node's
    ``empty_padding="none"``): an empty text has no tokens; both CLIP texts empty leave the CLIP encoders out, and
    an empty T5 text runs T5's end token alone."""
    v, out = stack.vocab, {}
    texts = dict(zip(("clip-l", "clip-g", "t5"), encoder_texts(prompt, s)))
    tokenizers = (("clip-l", s.clip_l_mode, s.clip_l_pad), ("clip-g", s.clip_g_mode, s.clip_g_pad))
    clip = {key: [] if unpadded and not texts[key] else clip_chunks(stack, texts[key], mode, pad, s.split)
            for key, mode, pad in tokenizers}
    if any(clip.values()):
        n = max(map(len, clip.values()))
        for key, mode, pad in tokenizers:
            rows = clip[key] + clip_chunks(stack, "", mode, pad, s.split)[:1] * (n - len(clip[key]))
            out[key] = batch(rows, s, v.bos_id, v.eos_id, pad)
    if s.t5_absent is None:
        if stack.t5 is None:
            raise ValueError("this model has no T5 encoder; choose a t5_absent rule")
        tok = stack.t5_tokenizer(s.t5_mode)
        rows = [[(tok.eos_id, 1.0)]] if unpadded and not texts["t5"] else [t5_chunk(stack, texts["t5"], s)]
        out["t5"] = batch(rows, s, None, tok.eos_id, tok.pad_id)
    elif not out:
        raise ValueError("no CLIP rows (empty unpadded texts) and no T5 rows (t5_absent): an empty context")
    return out


def clip_result(out: ClipOutput, rows: Chunks, n: int) -> ClipOutput:
    """One prompt's CLIP output from its batch: the prompt's rows weighted and joined along the sequence; the
    pooled vectors of chunk 0."""
    hidden = weighted(out.penultimate, rows, n) if len(rows) > n else out.penultimate[:n]
    return ClipOutput(out.last[:1], hidden.reshape(1, -1, hidden.shape[-1]), out.pooled[:1], out.projected[:1])


def t5_result(hidden: Tensor, rows: Chunks, n: int) -> Tensor:
    return weighted(hidden, rows, n) if len(rows) > n else hidden


def encode_prompt(stack: TextStack, prompt: Prompt, s: TextSettings, dtype: torch.dtype = torch.float32,
                  joint_dim: int | None = None, unpadded: bool = False) -> Conditioning:
    """Run the three encoders on one prompt (``encoder_rows``: per-encoder texts, ``unpadded``); outputs are cast to
    ``dtype`` (the pipeline dtype). Each encoder runs once on its batch of sequences; ``ids`` holds them
    concatenated. Without CLIP rows the context is T5's rows alone and the pooled vector zeros."""
    run_dtype = s.encoder_dtype or dtype
    plan = encoder_rows(stack, prompt, s, unpadded)
    ids = {key: [i for r in rows for i, _ in r] for key, (rows, _) in plan.items()}
    outs = {}
    for key, name in (("clip-l", "clip_l"), ("clip-g", "clip_g")):
        if key in plan:
            rows, n = plan[key]
            out = stack.encoder(name, run_dtype, s.weight_storage)(torch.tensor([[i for i, _ in r] for r in rows]),
                                                                  pool=s.clip_pool, attention=s.clip_attention)
            outs[key] = clip_result(out, rows, n)
    t5_hidden = None
    if "t5" in plan:
        rows, n = plan["t5"]
        t5_in = torch.tensor([[i for i, _ in r] for r in rows])
        mask = (t5_in != stack.t5_tokenizer(s.t5_mode).pad_id) if s.t5_mask else None  # EOS (1) is never pad (0)
        t5_hidden = t5_result(stack.encoder("t5", run_dtype, s.weight_storage)(
            t5_in, attention_mask=mask, attention=s.t5_attention, activation=s.t5_activation), rows, n)
    if not outs:
        context, pooled = without_clip(stack, t5_hidden, s, dtype)
        return Conditioning(context, pooled, ids, None, None, context)
    width = joint_dim or (stack.t5.config.d_model if stack.t5 is not None else None)
    context, pooled, t5_hidden = conditioning(outs["clip-l"], outs["clip-g"], t5_hidden, s, dtype, width)
    return Conditioning(context, pooled, ids, outs["clip-l"], outs["clip-g"], t5_hidden)


def without_clip(stack: TextStack, t5_hidden: Tensor, s: TextSettings, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(context, pooled) in ``dtype`` without CLIP rows: T5's rows alone, and zeros as wide as the CLIP encoders'
    pooled vector."""
    widths = [c.config.projection_dim if projected else c.config.width
              for c, projected in ((stack.clip_l, s.clip_l_pooled_projected), (stack.clip_g, True))]
    return t5_hidden.to(dtype), torch.zeros(1, sum(widths), dtype=dtype)


def conditioning(l_out: ClipOutput, g_out: ClipOutput, t5_hidden: Tensor | None, s: TextSettings, dtype: torch.dtype,
                 width: int | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(context, pooled, T5 rows) in ``dtype`` from the encoders' outputs: T5's last hidden state, or without T5
    the rows of the ``t5_absent`` rule, ``width`` wide (T10)."""
    if s.t5_absent is None:
        t5_rows = t5_hidden = t5_hidden.to(dtype)
    else:
        if width is None:
            raise ValueError("t5_absent needs the joint width (joint_dim) when the model has no T5")
        n = s.t5_absent_length if s.t5_absent == "zeros" else 0
        t5_rows = torch.zeros(1, n, width, dtype=dtype)
    l_pool = l_out.projected if s.clip_l_pooled_projected else l_out.pooled
    context, pooled = assemble(l_out.penultimate.to(dtype), g_out.penultimate.to(dtype), t5_rows,
                               l_pool.to(dtype), g_out.projected.to(dtype))
    return context, pooled, t5_hidden


# checkpoint keys that are known and not parameters of impl: each with the reason it is dropped
CLIP_DROP = ("text_model.embeddings.position_ids",)  # a buffer (arange) older transformers versions saved
T5_TIED = {"shared.weight": "encoder.embed_tokens.weight"}  # transformers ties them; either key may be stored


def check_encoder_folder(folder: Path, shapes: dict):
    """The config of a text-encoder folder (``text_encoder_3`` is T5, the others CLIP), parsed within bounds and
    checked against stored tensors' names and shapes (``shapes``: anything with ``.shape``) on the meta device,
    before anything is allocated. Returns the config."""
    from impl.clip import ClipConfig
    from impl.t5 import T5Config
    from impl.weights import expect_layout, read_config

    from impl import quant

    path = folder / "config.json"
    shapes = quant.without_scales(shapes) if quant.is_quantized(shapes) else shapes
    if folder.name == "text_encoder_3":
        cfg = T5Config.from_hf(read_config(path), str(path))
        expect_layout(lambda: T5Encoder(cfg), shapes, str(folder), tied=T5_TIED)
    else:
        cfg = ClipConfig.from_hf(read_config(path), str(path))
        expect_layout(lambda: ClipTextEncoder(cfg), shapes, str(folder), drop=CLIP_DROP)
    return cfg


def load_text_stack(directory: str | Path | None = None) -> TextStack:
    """The embedded default when ``directory`` is None; else a diffusers-layout model directory (``text_encoder/``,
    ``text_encoder_2/``, optional ``text_encoder_3/``, ``tokenizer/``, ``tokenizer_2/``, ``tokenizer_3/``)."""
    from impl import embedded, quant
    from impl.clip import ClipConfig
    from impl.t5 import T5Config
    from impl.weights import TEXT_WEIGHTS, load_strict, read_config, read_weights_dir

    if directory is None:
        w = embedded.text_weights()
        embedded.verify(w)
        l, g, t = ClipTextEncoder(embedded.CLIP_L), ClipTextEncoder(embedded.CLIP_G), T5Encoder(embedded.T5)
        for model, key in ((l, "clip_l"), (g, "clip_g"), (t, "t5")):
            load_strict(model, w[key], f"embedded {key}")
        return TextStack(BPEVocab.from_openai_gz(embedded.BPE_GZ), SentencePieceModel.load(embedded.SPIECE), l, g, t)
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: not a directory (expected a diffusers-layout SD3/SD3.5 model)")
    quantized = {}

    def weights(sub: str, name: str) -> dict:
        state = read_weights_dir(d / sub, TEXT_WEIGHTS)
        if quant.is_quantized(state):  # dequantized in float32, as the encoders compute
            state, quantized[name] = quant.dequantize(state, torch.float32, str(d / sub))
        return state
    encoders = []
    for sub, name in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
        cfg = ClipConfig.from_hf(read_config(d / sub / "config.json"), str(d / sub / "config.json"))
        model = ClipTextEncoder(cfg)
        load_strict(model, weights(sub, name), str(d / sub), drop=CLIP_DROP)
        encoders.append(model)
    t5 = None
    if (d / "text_encoder_3").is_dir():
        cfg = T5Config.from_hf(read_config(d / "text_encoder_3" / "config.json"), str(d / "text_encoder_3" / "config.json"))
        t5 = T5Encoder(cfg)
        load_strict(t5, weights("text_encoder_3", "t5"), str(d / "text_encoder_3"), tied=T5_TIED)
    return TextStack(*tokenizer_files(d), *encoders, t5, quantized)


def tokenizer_files(d: Path) -> tuple[BPEVocab, SentencePieceModel]:
    """The CLIP BPE table (``tokenizer/``, which ``tokenizer_2/`` must equal) and T5's sentencepiece model of a
    diffusers-layout directory."""
    spiece = d / "tokenizer_3" / "spiece.model"
    if not spiece.is_file():
        raise FileNotFoundError(f"{spiece}: missing (the T5 tokenizer is read from its sentencepiece model)")
    for name in ("vocab.json", "merges.txt"):  # impl holds one BPE table for both CLIP tokenizers
        a, b = d / "tokenizer" / name, d / "tokenizer_2" / name
        if b.is_file() and a.is_file() and a.read_bytes() != b.read_bytes():
            raise ValueError(f"{b} differs from {a}; SD3 models share one CLIP BPE table")
    return BPEVocab.from_dir(d / "tokenizer"), SentencePieceModel.load(spiece)
