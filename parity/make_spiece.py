"""Train the tiny T5 SentencePiece Unigram model shipped as ``impl/embedded/spiece.model``.

Run once by a developer (``python -m parity.make_spiece``); the output is committed and its sha256 recorded in
``impl/embedded/manifest.json``. Deterministic: a fixed corpus generated below, a fixed trainer seed, one thread,
and an in-memory writer (a file-based run records the input path inside the model).
"""
from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path

WORDS = (
    "a an the of in on at with and or photo picture painting portrait close-up view of cat dog bird horse fox "
    "owl robot astronaut castle city street forest mountain river lake ocean beach desert sky sun moon star "
    "cloud rain snow fog night morning evening sunset sunrise red orange yellow green blue purple pink black "
    "white gray golden silver bright dark soft warm cold old young small large tiny giant beautiful detailed "
    "realistic photorealistic cinematic dramatic lighting studio shot lens bokeh 35mm 85mm 4k 8k hdr oil "
    "watercolor sketch anime style digital art trending masterpiece best quality highly wearing holding "
    "sitting standing running flying under over near behind inside outside glass wooden stone metal "
    "café naïve résumé Zürich São Paulo Ελλάδα Москва 東京 ½ ① ﬁ Ａ"
).split()
PUNCT = ["", "", "", ",", ".", "!", "?", ":", ";", "(", ")", "'s", "-", "\"", "1.2", "2024"]


def corpus(n: int = 4000) -> list[str]:
    """Deterministic prompt-like sentences from a 32-bit LCG (no library RNG involved)."""
    state = 12345
    out = []
    for _ in range(n):
        words = []
        state = (state * 1103515245 + 12345) & 0x7FFFFFFF
        for _ in range(4 + state % 12):
            state = (state * 1103515245 + 12345) & 0x7FFFFFFF
            w = WORDS[state % len(WORDS)]
            state = (state * 1103515245 + 12345) & 0x7FFFFFFF
            if state % 7 == 0:
                w = w.capitalize()
            words.append(w + PUNCT[(state >> 8) % len(PUNCT)])
        out.append(" ".join(words))
    return out


def train(vocab_size: int = 320) -> bytes:
    import sentencepiece as spm

    spm.set_random_generator_seed(1234)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=buf, model_type="unigram", vocab_size=vocab_size,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0, num_threads=1, shuffle_input_sentence=False, input_sentence_size=0,
        normalization_rule_name="nmt_nfkc", minloglevel=2,
    )
    return buf.getvalue()


if __name__ == "__main__":
    data = train()
    out = Path(__file__).resolve().parent.parent / "impl" / "embedded" / "spiece.model"
    out.write_bytes(data)
    print(out, len(data), hashlib.sha256(data).hexdigest(), file=sys.stderr)
