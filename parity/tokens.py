"""``sd3parity tokens``: one prompt under every tokenizer mode and profile, side by side."""
from __future__ import annotations

from pathlib import Path

from impl.clip_tokenizer import MODES as CLIP_MODES
from impl.clip_tokenizer import BPEVocab
from impl.t5_tokenizer import MODES as T5_MODES
from impl.t5_tokenizer import SentencePieceModel
from impl.text import TextStack, clip_ids, t5_ids
from parity import flags as F


def load_tokenizer_files(model_dir: str | None) -> TextStack:
    from impl import embedded

    if model_dir is None:
        vocab, spiece = BPEVocab.from_openai_gz(embedded.BPE_GZ), SentencePieceModel.load(embedded.SPIECE)
    else:
        d = Path(model_dir)
        for sub in ("tokenizer", "tokenizer_3"):
            if not (d / sub).is_dir():
                raise FileNotFoundError(f"{d}: no {sub}/ folder (tokens needs tokenizer/, tokenizer_2/, tokenizer_3/)")
        vocab = BPEVocab.from_dir(d / "tokenizer")
        if not (d / "tokenizer_3" / "spiece.model").is_file():
            raise FileNotFoundError(f"{d / 'tokenizer_3'}: no spiece.model")
        spiece = SentencePieceModel.load(d / "tokenizer_3" / "spiece.model")
    return TextStack(vocab, spiece, None, None, None)


def _entry(fn, strings) -> dict:
    try:
        ids, extra = fn()
    except (ValueError, ImportError) as e:
        return {"error": str(e)}
    return {"ids": ids, "tokens": strings(ids), **extra}


def tokens_report(prompt: str, model_dir: str | None = None) -> dict:
    from impl.clip_tokenizer import _check_text

    _check_text(prompt)  # a prompt no tokenizer can take is a usage error, not one error per mode
    stack = load_tokenizer_files(model_dir)
    profiles = {p: F.settings(F.profile_values(p)) for p in F.PROFILES}
    out: dict = {"prompt": prompt, "encoders": {}}
    v = stack.vocab
    for enc, pad_attr, mode_attr in (("clip-l", "clip_l_pad", "clip_l_mode"), ("clip-g", "clip_g_pad", "clip_g_mode")):
        pad = getattr(profiles["diffusers"], pad_attr)
        strings = stack.clip_tokenizer("hf", pad).token_strings
        entries = {}
        for mode in CLIP_MODES:
            def run(mode=mode):
                t = stack.clip_tokenizer(mode, pad)(prompt)
                return t.ids, {"pooled_index": t.pooled_index, "n_content": t.n_content, "truncated": t.truncated,
                               "pad_id": pad}
            entries[mode] = _entry(run, strings)
        for name, s in profiles.items():
            def run(s=s, pad_attr=pad_attr, mode_attr=mode_attr):
                p = getattr(s, pad_attr)
                ids = clip_ids(stack, prompt, getattr(s, mode_attr), p, s.wordwise)
                return ids, {"pooled_index": ids.index(v.eos_id), "n_content": ids.index(v.eos_id) - 1, "pad_id": p}
            entries[name] = _entry(run, strings)
        out["encoders"][enc] = entries
    t5 = stack.t5_tokenizer("hf")
    entries = {}
    for mode in T5_MODES:
        def run(mode=mode):
            t = stack.t5_tokenizer(mode)
            r = t.pad_to(t.encode(prompt), profiles["diffusers"].t5_max_length)
            return r.ids, {"n_content": r.n_content, "truncated": r.truncated, "pad_id": t.pad_id}
        entries[mode] = _entry(run, t5.token_strings)
    for name, s in profiles.items():
        def run(s=s):
            ids = t5_ids(stack, prompt, s)
            return ids, {"n_content": ids.index(t5.eos_id), "length_rule": s.t5_length_rule, "pad_id": t5.pad_id}
        entries[name] = _entry(run, t5.token_strings)
    out["encoders"]["t5"] = entries
    return out


def format_tokens(report: dict) -> str:
    lines = [f"prompt: {report['prompt']!r}"]
    for enc, entries in report["encoders"].items():
        lines.append("")
        lines.append(f"== {enc}")
        base = entries.get("diffusers", {}).get("ids")
        for name, e in entries.items():
            if "error" in e:
                lines.append(f"  {name:<15} error: {e['error']}")
                continue
            n = e["n_content"]
            content = e["tokens"][(0 if enc == "t5" else 1) : (n if enc == "t5" else n + 1)]
            same = "" if base is None or e["ids"] == base else "  <-- differs from diffusers"
            info = f"len {len(e['ids'])} content {n}" + (f" truncated {e['truncated']}" if e.get("truncated") else "")
            if "pooled_index" in e:
                info += f" pooled@{e['pooled_index']}"
            info += f" pad {e['pad_id']}"
            lines.append(f"  {name:<15} {info}{same}")
            lines.append(f"  {'':<15} {' | '.join(content)}")
    return "\n".join(lines)
