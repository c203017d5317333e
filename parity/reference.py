"""The reference side: transformers encoders and tokenizers from a diffusers-layout directory, driven either by
diffusers' own ``StableDiffusion3Pipeline.encode_prompt`` (``diffusers`` profile) or by the SD3.5 reference's
procedure around the same transformers objects (``sai`` profile: word-wise tokenization through the HF tokenizer,
float32 encoders, unprojected CLIP-L pooled vector). Imports of the reference libraries stay inside functions.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from impl import sai_tokenize
from parity.determinism import own_storage
from impl.text import SAI_T5_CHARS, SAI_T5_MIN


@dataclass
class RefStack:
    tokenizer: Any
    tokenizer_2: Any
    tokenizer_3: Any
    text_encoder: Any
    text_encoder_2: Any
    text_encoder_3: Any


def load_tokenizers(directory: Path):
    from transformers import CLIPTokenizer, T5Tokenizer

    return (CLIPTokenizer.from_pretrained(directory / "tokenizer"), CLIPTokenizer.from_pretrained(directory / "tokenizer_2"),
            T5Tokenizer.from_pretrained(directory / "tokenizer_3"))


def load(directory: Path, dtype: torch.dtype) -> RefStack:
    from transformers import CLIPTextModelWithProjection, T5EncoderModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    encoders = []
    for sub, cls in (("text_encoder", CLIPTextModelWithProjection), ("text_encoder_2", CLIPTextModelWithProjection),
                     ("text_encoder_3", T5EncoderModel)):
        if sub == "text_encoder_3" and not (directory / sub).is_dir():
            encoders.append(None)  # an SD3 model without T5 (T10)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            encoders.append(own_storage(cls.from_pretrained(directory / sub, dtype=dtype).eval()))
    return RefStack(*load_tokenizers(directory), *encoders)


def joint_attention_dim(directory: Path) -> int:
    """The transformer's ``joint_attention_dim``: the width of diffusers' zero T5 rows when T5 is absent."""
    import json

    path = directory / "transformer" / "config.json"
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["joint_attention_dim"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: needed for the T5-absent context width (joint_attention_dim): {e!r}") from None


def diffusers_encode(ref: RefStack, prompt: str, max_sequence_length: int, joint_dim: int | None = None):
    """diffusers' own encode_prompt on a pipeline holding only the text components. Without T5, diffusers reads
    the zero rows' width from ``transformer.config``: a stand-in object carries just that value."""
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils import logging as d_logging

    d_logging.set_verbosity_error()
    pipe = StableDiffusion3Pipeline(transformer=None, scheduler=None, vae=None, text_encoder=ref.text_encoder,
                                    tokenizer=ref.tokenizer, text_encoder_2=ref.text_encoder_2,
                                    tokenizer_2=ref.tokenizer_2, text_encoder_3=ref.text_encoder_3,
                                    tokenizer_3=ref.tokenizer_3)
    if ref.text_encoder_3 is None:
        pipe.transformer = SimpleNamespace(config=SimpleNamespace(joint_attention_dim=joint_dim))
    context, _, pooled, _ = pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=False,
                                               max_sequence_length=max_sequence_length)
    return context, pooled


def sai_clip_ids(tokenizer, prompt: str, pad: int) -> list[int]:
    """sd3.5 SDTokenizer: each word through the HF tokenizer, BOS/EOS dropped, chunked; chunk 0."""
    bos, eos = tokenizer("")["input_ids"]
    return sai_tokenize.sai_tokenize(prompt, lambda w: tokenizer(w)["input_ids"][1:-1], start=bos, end=eos, pad=pad)[0]


def sai_t5_ids(tokenizer, prompt: str) -> list[int]:
    (eos,) = tokenizer("")["input_ids"]
    return sai_tokenize.sai_tokenize(prompt[:SAI_T5_CHARS], lambda w: tokenizer(w)["input_ids"][:-1], start=None,
                                     end=eos, pad=0, max_length=99999999, min_length=SAI_T5_MIN,
                                     pad_to_max_length=False)[0]


def sai_encode(ref: RefStack, prompt: str, dtype: torch.dtype):
    """sd3.5 sd3_infer.get_cond: float32 encoders, CLIP penultimate states, CLIP-L pooled unprojected."""
    l_ids = torch.tensor([sai_clip_ids(ref.tokenizer, prompt, pad=ref.tokenizer.eos_token_id)])
    g_ids = torch.tensor([sai_clip_ids(ref.tokenizer, prompt, pad=0)])  # CLIP-L's tokenizer object, pad 0
    t_ids = torch.tensor([sai_t5_ids(ref.tokenizer_3, prompt)])
    lo = ref.text_encoder(l_ids, output_hidden_states=True)
    go = ref.text_encoder_2(g_ids, output_hidden_states=True)
    t5 = ref.text_encoder_3(t_ids).last_hidden_state
    clip = torch.cat([lo.hidden_states[-2], go.hidden_states[-2]], dim=-1)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    context = torch.cat([clip, t5], dim=-2).to(dtype)
    l_pooled = lo.last_hidden_state[torch.arange(1), l_ids.argmax(dim=-1)]  # sd3.5 CLIPTextModel_: argmax, no projection
    pooled = torch.cat([l_pooled, go.text_embeds], dim=-1).to(dtype)
    return context, pooled
