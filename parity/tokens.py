"""``sd3parity tokens``: the ids each encoder receives for a prompt (or a corpus of prompts), under every impl
tokenizer mode and profile and under every real tokenizer installed, with where they disagree and why.

Each impl row is checked against the tokenizer it reproduces, when that one is installed:

    clip  hf            transformers CLIPTokenizer of tokenizer/           (content ids)
          hf-bang-pad   transformers CLIPTokenizer of tokenizer_2/         (content ids)
          openai        OpenAI's SimpleTokenizer (the clip-anytorch package) (content ids)
          diffusers     StableDiffusion3Pipeline's call: padding to 77, truncation (all 77 ids)
          sai           the SD3.5 code's SD3Tokenizer (--sai-code; all ids of its first chunk)
    t5    sentencepiece the sentencepiece library on spiece.model            (content ids)
          hf            transformers T5Tokenizer of tokenizer_3/            (content ids)
          diffusers     the pipeline's call: padding to 256, truncation, </s>
          sai           SD3Tokenizer (the prompt cut at 226 characters, at least 77 ids)

``hf-slow-noftfy`` reproduces transformers 4.x's slow tokenizer, which 5.x no longer has: it is checked in the
``tf4`` environment's tests, not here. A difference between impl's rows and another reference (a mode against
diffusers) is expected and only marked; a difference from the reproduced tokenizer is a divergence (exit 1).
"""
from __future__ import annotations

import html
import json
import unicodedata
from pathlib import Path
from typing import Callable

from impl.clip_tokenizer import MODES as CLIP_MODES
from impl.clip_tokenizer import BPEVocab
from impl.t5_tokenizer import MODES as T5_MODES
from impl.t5_tokenizer import SentencePieceModel
from impl.text import TextStack, clip_chunks, t5_chunk
from parity import flags as F

CLIP_CHECKED = {"hf": "transformers tokenizer/", "hf-bang-pad": "transformers tokenizer_2/",
                "openai": "openai SimpleTokenizer", "diffusers": "diffusers pipeline", "sai": "sd3.5 code",
                "comfyui": "comfyui"}
T5_CHECKED = {"sentencepiece": "sentencepiece library", "hf": "transformers tokenizer_3/",
              "diffusers": "diffusers pipeline", "sai": "sd3.5 code", "comfyui": "comfyui"}
# references that give all ids (specials, padding; chunk 0 for the SD3.5 code and ComfyUI); the rest content ids
FULL = ("diffusers pipeline", "sd3.5 code", "comfyui")


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


def vocabulary(model_dir: str | None, stack: TextStack) -> str:
    where = f"{model_dir}: tokenizer/, tokenizer_2/, tokenizer_3/" if model_dir else \
        "the embedded default (OpenAI's CLIP BPE; a tiny T5 Unigram model, not T5-XXL's: give --model DIR)"
    return f"{where}; CLIP {len(stack.vocab.encoder)} tokens, T5 {len(stack.spiece.pieces)} pieces"


# ---------------------------------------------------------------------------------------------- the references

def references(directory: Path, sai_code: Path | None, comfyui: Path | None = None
               ) -> tuple[dict[str, dict[str, Callable]], list[str]]:
    """encoder -> {reference: prompt -> ids} for the real tokenizers that are installed, and what is missing."""
    refs: dict[str, dict[str, Callable]] = {"clip-l": {}, "clip-g": {}, "t5": {}}
    missing = []
    try:
        from transformers import CLIPTokenizer, T5Tokenizer
    except ImportError:
        missing.append("transformers (pip install -e '.[reference]')")
    else:
        import warnings

        from transformers.utils import logging

        logging.set_verbosity_error()  # "sequence length is longer than ..." for content ids of long prompts
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clip_l, clip_g = (CLIPTokenizer.from_pretrained(directory / t) for t in ("tokenizer", "tokenizer_2"))
            t5 = T5Tokenizer.from_pretrained(directory / "tokenizer_3")

        def full(tok, n, **kw):
            return lambda p: tok(p, padding="max_length", max_length=n, truncation=True, **kw).input_ids
        refs["clip-l"].update({"transformers tokenizer/": lambda p: clip_l(p, add_special_tokens=False).input_ids,
                               "diffusers pipeline": full(clip_l, 77)})
        refs["clip-g"].update({"transformers tokenizer_2/": lambda p: clip_g(p, add_special_tokens=False).input_ids,
                               "diffusers pipeline": full(clip_g, 77)})
        refs["t5"].update({"transformers tokenizer_3/": lambda p: t5(p, add_special_tokens=False).input_ids,
                           "diffusers pipeline": full(t5, 256, add_special_tokens=True)})
    openai = openai_tokenizer()
    if openai is None:
        missing.append("OpenAI's SimpleTokenizer (pip install --no-deps clip-anytorch==2.6.0)")
    else:
        for enc in ("clip-l", "clip-g"):
            refs[enc]["openai SimpleTokenizer"] = openai.encode
    try:
        import sentencepiece
    except ImportError:
        missing.append("sentencepiece")
    else:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer_3" / "spiece.model"))
        refs["t5"]["sentencepiece library"] = lambda p: sp.encode(p)
    if sai_code is None:
        missing.append("the SD3.5 code (--sai-code DIR or $SD3PARITY_SAI_CODE)")
    else:
        tokenize = _sai_tokenizer(sai_code, directory)
        for enc, key in (("clip-l", "l"), ("clip-g", "g"), ("t5", "t5xxl")):
            refs[enc]["sd3.5 code"] = lambda p, key=key: [t for t, _ in tokenize(p)[key][0]]
    if comfyui is None:
        missing.append("ComfyUI (--comfyui DIR or $SD3PARITY_COMFYUI)")
    else:
        from parity.sides.comfyui import tokenizer

        comfy = tokenizer(comfyui, directory)
        for enc, key in (("clip-l", "l"), ("clip-g", "g"), ("t5", "t5xxl")):
            refs[enc]["comfyui"] = lambda p, key=key: [t for t, _ in comfy(p)[key][0]]
    return refs, missing


def openai_tokenizer():
    """OpenAI's own ``SimpleTokenizer`` from the clip-anytorch package files (importing the package pulls
    torchvision), or None when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "simple_tokenizer.py"
    s = importlib.util.spec_from_file_location("openai_simple_tokenizer", path)
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return mod.SimpleTokenizer()


def _sai_tokenizer(code: Path, directory: Path) -> Callable:
    """The SD3.5 code's ``SD3Tokenizer.tokenize_with_weights``, its Hub names resolved to the model's folders."""
    import warnings

    from parity.sides.sai import imported, local_tokenizers

    with imported(code) as ref, local_tokenizers(ref, directory), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ref.other.SD3Tokenizer().tokenize_with_weights


# ---------------------------------------------------------------------------------------------- why they differ

TEXT_CLASSES = ("ftfy repairs", "HTML entities", "final sigma", "Unicode version skew", "IGNORECASE drop",
                "special-token strings")


def relevant(enc: str, a: str, b: str) -> tuple[str, ...] | None:
    """The classes that can separate references ``a`` and ``b`` (None: any)."""
    pair = {a, b}
    if pair <= set(FULL):
        return {"t5": ("SAI word-wise + weight parser", "T5 length rule (226 characters)",
                       "T5 padding (256 against at least 77)"),
                "clip-g": ("SAI word-wise + weight parser", "'!' as special pad")}.get(enc, ("SAI word-wise + weight parser",))
    if "openai SimpleTokenizer" in pair:
        return TEXT_CLASSES + (("'!' as special pad",) if "transformers tokenizer_2/" in pair else ())
    return None


def classes(prompt: str, only: tuple[str, ...] | None = None) -> list[str]:
    """The divergence classes (TOKENIZERS.md) whose trigger is in the prompt, among ``only``: a hint of why two
    tokenizers part, not a proof."""
    return [c for c in _triggers(prompt) if only is None or c in only]


def _triggers(prompt: str) -> list[str]:
    from impl.clip_tokenizer import _rust_unicode

    out = []
    try:
        import ftfy
        if ftfy.fix_text(prompt) != prompt:
            out.append("ftfy repairs")
    except ImportError:
        pass
    if html.unescape(prompt) != prompt:
        out.append("HTML entities")
    if "Σ" in prompt or "ς" in prompt:
        out.append("final sigma")
    if _rust_unicode().unassigned.search(prompt) or _rust_unicode().starters.search(prompt):
        out.append("Unicode version skew")
    if "\u0345" in prompt:
        out.append("IGNORECASE drop")
    if any(s in prompt.lower() for s in ("<|endoftext|>", "<|startoftext|>", "</s>", "<pad>", "<unk>", "<extra_id_")):
        out.append("special-token strings")
    if "!" in prompt:
        out.append("'!' as special pad")
    if any(unicodedata.category(c).startswith("C") and c not in "\t\n\r" for c in prompt) or \
            any(0x3400 <= ord(c) <= 0x9FFF or 0x20000 <= ord(c) <= 0x2FA1F for c in prompt):
        out.append("BasicTokenizer fallback")
    if any(c in prompt for c in "():\\"):
        out.append("SAI word-wise + weight parser")
    if len(prompt) > 226:
        out.append("T5 length rule (226 characters)")
    out.append("T5 padding (256 against at least 77)")
    return out


# ---------------------------------------------------------------------------------------------- one prompt

def _entry(fn, strings) -> dict:
    try:
        ids, extra = fn()
    except (ValueError, ImportError) as e:
        return {"error": str(e)}
    return {"ids": ids, "tokens": strings(ids), **extra}


def tokens_report(prompt: str, model_dir: str | None = None, refs: dict | None = None,
                  stack: TextStack | None = None) -> dict:
    """impl's rows (modes and profiles) per encoder; with ``refs`` (``references``) the real tokenizers' rows and,
    per impl row, ``same_as_reference`` against the tokenizer it reproduces."""
    from impl.clip_tokenizer import _check_text

    _check_text(prompt)  # a prompt no tokenizer can take is a usage error, not one error per mode
    stack = stack or load_tokenizer_files(model_dir)
    profiles = {p: F.settings(F.profile_values(p)) for p in F.PROFILES}
    out: dict = {"prompt": prompt, "encoders": {}}
    v = stack.vocab
    for enc, pad_attr, mode_attr in (("clip-l", "clip_l_pad", "clip_l_mode"), ("clip-g", "clip_g_pad", "clip_g_mode")):
        pad = getattr(profiles["diffusers"], pad_attr)
        strings = stack.clip_tokenizer("hf", pad).token_strings
        entries = {}
        for mode in CLIP_MODES:
            def run(mode=mode):
                t = stack.clip_tokenizer(mode, pad)
                return t(prompt).ids, {"content": t.encode(prompt), **_layout(t(prompt)), "pad_id": pad}
            entries[mode] = _entry(run, strings)
        for name, s in profiles.items():
            def run(s=s, pad_attr=pad_attr, mode_attr=mode_attr):
                p = getattr(s, pad_attr)
                chunks = clip_chunks(stack, prompt, getattr(s, mode_attr), p, s.split)
                ids = [i for i, _ in chunks[0]]
                return ids, {"pooled_index": ids.index(v.eos_id), "n_content": ids.index(v.eos_id) - 1, "pad_id": p,
                             **_weights(s, chunks)}
            entries[name] = _entry(run, strings)
        out["encoders"][enc] = entries
    t5 = stack.t5_tokenizer("hf")
    entries = {}
    for mode in T5_MODES:
        def run(mode=mode):
            t = stack.t5_tokenizer(mode)
            content = t.encode(prompt)
            r = t.pad_to(content, profiles["diffusers"].t5_max_length)
            return r.ids, {"content": content, "n_content": r.n_content, "truncated": r.truncated, "pad_id": t.pad_id}
        entries[mode] = _entry(run, t5.token_strings)
    for name, s in profiles.items():
        def run(s=s):
            chunk = t5_chunk(stack, prompt, s)
            ids = [i for i, _ in chunk]
            return ids, {"n_content": ids.index(t5.eos_id), "length_rule": s.t5_length_rule, "pad_id": t5.pad_id,
                         **_weights(s, [chunk])}
        entries[name] = _entry(run, t5.token_strings)
    out["encoders"]["t5"] = entries
    if refs is not None:
        _against(out, refs)
    return out


def _layout(t) -> dict:
    return {"pooled_index": t.pooled_index, "n_content": t.n_content, "truncated": t.truncated}


def _weights(s, chunks) -> dict:
    """What a profile that applies prompt weights or encodes every chunk does with them: the chunk count and the
    weights of chunk 0 that are not 1 (position: weight)."""
    out = {}
    if s.chunks == "all" and len(chunks) > 1:
        out["chunks"] = len(chunks)
    if s.weights == "apply":
        weighted = {k: w for k, (_, w) in enumerate(chunks[0]) if w != 1.0}
        if weighted:
            out["weights"] = weighted
    return out


def _against(report: dict, refs: dict) -> None:
    """The real tokenizers' ids beside impl's, and each impl row against the one it reproduces."""
    prompt = report["prompt"]
    report["references"] = {}
    for enc, entries in report["encoders"].items():
        got = {}
        for name, fn in refs[enc].items():
            try:
                got[name] = {"ids": list(fn(prompt))}
            except Exception as e:  # noqa: BLE001 - a reference's own failure on this prompt is reported, not raised
                got[name] = {"error": f"{type(e).__name__}: {e}"}
        report["references"][enc] = got
        checked = T5_CHECKED if enc == "t5" else CLIP_CHECKED
        for row, e in entries.items():
            ref = checked.get(row)
            if ref not in got or "ids" not in e or "ids" not in got[ref]:
                continue
            mine = e["content"] if "content" in e else e["ids"]
            e["reference"], e["same_as_reference"] = ref, mine == got[ref]["ids"]


def divergences(report: dict) -> list[tuple[str, str, str]]:
    """(encoder, impl row, reference) where impl's row differs from the tokenizer it reproduces."""
    return [(enc, row, e["reference"]) for enc, entries in report["encoders"].items() for row, e in entries.items()
            if e.get("same_as_reference") is False]


def format_tokens(report: dict) -> str:
    lines = [f"prompt: {report['prompt']!r}"]
    if "vocabulary" in report:
        lines.append(f"vocabulary: {report['vocabulary']}")
    for enc, entries in report["encoders"].items():
        lines += ["", f"== {enc}"]
        base = entries.get("diffusers", {}).get("ids")
        for name, e in entries.items():
            if "error" in e:
                lines.append(f"  impl {name:<15} error: {e['error']}")
                continue
            n = e["n_content"]
            content = e["tokens"][(0 if enc == "t5" else 1) : (n if enc == "t5" else n + 1)]
            marks = []
            if base is not None and e["ids"] != base:
                marks.append("differs from impl's diffusers row")
            if "same_as_reference" in e:
                marks.append(f"= {e['reference']}" if e["same_as_reference"] else f"DIFFERS from {e['reference']}")
            info = f"len {len(e['ids'])} content {n}" + (f" truncated {e['truncated']}" if e.get("truncated") else "")
            if "pooled_index" in e:
                info += f" pooled@{e['pooled_index']}"
            info += f" pad {e['pad_id']}"
            if "chunks" in e:
                info += f" chunks {e['chunks']}"
            if "weights" in e:
                info += " weights " + ", ".join(f"@{k}: {w:g}" for k, w in e["weights"].items())
            lines.append(f"  impl {name:<15} {info}" + (f"  <-- {'; '.join(marks)}" if marks else ""))
            lines.append(f"  {'':<20} ids {_ids(e['ids'])}")
            lines.append(f"  {'':<20} {' | '.join(content)}")
        for name, r in report.get("references", {}).get(enc, {}).items():
            lines.append(f"  ref  {name:<26} " + (f"error: {r['error']}" if "error" in r else f"ids {_ids(r['ids'])}"))
    if report.get("missing"):
        lines += ["", "not installed, not compared: " + "; ".join(report["missing"])]
    bad = divergences(report)
    lines += ["", f"impl differs from the tokenizer it reproduces: {', '.join(f'{e} {r} vs {ref}' for e, r, ref in bad)}"
              f" (possible classes: {', '.join(classes(report['prompt'], TEXT_CLASSES)) or 'none recognised'})" if bad else
              "impl agrees with every installed tokenizer it reproduces" if "references" in report else ""]
    return "\n".join(lines).rstrip()


def _ids(ids: list[int]) -> str:
    """Ids with a trailing run of one value (the padding) written once: ``0 x 60``."""
    n = len(ids)
    while n > 1 and ids[n - 2] == ids[-1]:
        n -= 1
    if len(ids) - n < 2:
        return str(list(ids))
    return "[" + ", ".join(map(str, ids[: n - 1])) + (", " if n > 1 else "") + f"{ids[-1]} x {len(ids) - n + 1}]"


# ---------------------------------------------------------------------------------------------- a corpus

def read_prompts(path: Path) -> list[str]:
    """One prompt per line, or JSON Lines (``.jsonl``, or every non-empty line an object) with a ``prompt`` key."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--prompt-file {path}: not a readable UTF-8 text file ({e})") from None
    jsonl = path.suffix == ".jsonl" or (lines and all(ln.lstrip().startswith("{") for ln in lines if ln.strip()))
    if not jsonl:
        return [ln for ln in lines if ln.strip()]
    prompts = []
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            raise ValueError(f"--prompt-file {path}:{i}: not JSON ({e})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise ValueError(f"--prompt-file {path}:{i}: expected an object with a string 'prompt'")
        prompts.append(obj["prompt"])
    if not prompts:
        raise ValueError(f"--prompt-file {path}: no prompts")
    return prompts


def corpus_report(prompts: list[str], model_dir: str | None, refs: dict) -> dict:
    """Per impl row: how many prompts differ from the tokenizer it reproduces, by class, with examples; and per
    pair of references, how many prompts they disagree on (the differences impl reproduces by design)."""
    stack = load_tokenizer_files(model_dir)
    rows: dict[str, dict] = {}
    pairs: dict[str, int] = {}
    for i, prompt in enumerate(prompts):
        r = tokens_report(prompt, model_dir, refs, stack)
        for enc, entries in r["encoders"].items():
            for row, e in entries.items():
                if "same_as_reference" not in e:
                    continue
                s = rows.setdefault(f"{enc} {row} vs {e['reference']}", {"compared": 0, "differ": 0, "classes": {},
                                                                          "examples": []})
                s["compared"] += 1
                if not e["same_as_reference"]:
                    s["differ"] += 1
                    for c in classes(prompt, TEXT_CLASSES + ("SAI word-wise + weight parser", "'!' as special pad",
                                                             "T5 length rule (226 characters)")) or ["unclassified"]:
                        s["classes"][c] = s["classes"].get(c, 0) + 1
                    if len(s["examples"]) < 3:
                        s["examples"].append(i)
            ids = {k: v["ids"] for k, v in r["references"][enc].items() if "ids" in v}
            names = sorted(ids)
            for a in range(len(names)):
                for b in range(a + 1, len(names)):
                    if (names[a] in FULL) != (names[b] in FULL):
                        continue  # all ids against content ids: not comparable
                    s = pairs.setdefault(f"{enc} {names[a]} vs {names[b]}", {"differ": 0, "classes": {}})
                    if ids[names[a]] != ids[names[b]]:
                        s["differ"] += 1
                        for c in classes(prompt, relevant(enc, names[a], names[b])) or ["unclassified"]:
                            s["classes"][c] = s["classes"].get(c, 0) + 1
    return {"prompts": len(prompts), "rows": rows, "reference_pairs": pairs}


def format_corpus(report: dict, prompts: list[str]) -> str:
    lines = [f"{report['prompts']} prompts; vocabulary: {report['vocabulary']}", "",
             "impl against the tokenizer each row reproduces:"]
    for name, s in report["rows"].items():
        why = ", ".join(f"{c} {n}" for c, n in sorted(s["classes"].items(), key=lambda kv: -kv[1]))
        lines.append(f"  {name:<58} {s['differ']:>5} of {s['compared']} differ" + (f"  ({why})" if why else ""))
        lines += [f"  {'':<58} e.g. prompt {i}: {prompts[i][:60]!r}" for i in s["examples"]]
    lines += ["", "the references against each other (differences impl reproduces by design, as flags or modes):"]
    for name, s in report["reference_pairs"].items():
        why = ", ".join(f"{c} {n}" for c, n in sorted(s["classes"].items(), key=lambda kv: -kv[1]))
        lines.append(f"  {name:<58} {s['differ']:>5} of {report['prompts']} differ" + (f"  ({why})" if why else ""))
    if report.get("missing"):
        lines += ["", "not installed, not compared: " + "; ".join(report["missing"])]
    return "\n".join(lines)
