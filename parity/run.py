"""The one run path: a run is described once (``Spec``), validated before any work (``validate``), resolved once
into plain impl settings, the models' files and each reference's knobs (``resolve`` -> ``Run``), executed by sides
(``parity.sides``), and compared under one tolerance rule (``parity.report``). ``check``, ``record``, ``verify``,
the benchmarks and the tests all go through here.

Independence: each side reads the model's files with its own loader. impl parses the configs with its own readers
and infers from shapes what a single file does not carry (the report notes each inferred value; ``--config DIR``
or a diffusers directory beside the file overrides it); the references never see impl's config objects.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

DEFAULT_PROMPTS = (
    "a photo of a cat",
    "wow!! amazing! so cool!!!",  # CLIP-G '!' padding (T4)
    "(masterpiece:1.2), a (red) cat, ((blue eyes))",  # weight syntax (T2)
)
DTYPES = ("float32", "bfloat16", "float16")
FAMILIES = ("sd3-medium", "sd3.5-large", "sd3.5-medium")
REFERENCES = {"diffusers": "diffusers", "sai": "sai", "comfyui": "comfyui"}  # profile -> its reference
MODES = ("propagated", "teacher-forced", "both")  # what check compares (parity.teacher)
SLG_WINDOW = (0.01, 0.2)  # both references' default skip-layer window (QUIRKS G5)


class UsageError(ValueError):
    """Bad options or input files (exit 2)."""


class Unsupported(ValueError):
    """A reference (a checkout or library) or a model the harness cannot run as asked (exit 3); the message names
    what differs."""


@dataclass(frozen=True)
class Spec:
    """Everything one run depends on, as the user gave it."""
    model: str | None = None  # a diffusers-layout directory
    checkpoint: str | None = None  # an SAI single file
    config: str | None = None  # a diffusers directory holding the configs a single file lacks
    prompts: tuple[str | tuple[str, str, str], ...] = DEFAULT_PROMPTS  # a tuple: CLIP-L's, CLIP-G's and T5's texts
    profile: str = "diffusers"
    overrides: tuple[tuple[str, Any], ...] = ()
    dtype: str = "float32"
    threads: int = 1
    text_only: bool = False
    families: tuple[str, ...] = ()
    steps: int = 2
    guidance: float = 5.0
    seed: int = 0
    shift: float | None = None
    height: int = 64
    width: int = 64
    image: str | None = None  # img2img from this picture
    strength: float = 0.6
    slg: tuple[int, ...] = ()
    negative_zero: float | None = None  # ComfyUI's zeroed negative from this fraction of the schedule (0: always)
    empty_padding: str = "empty_prompt"  # the negative by CLIPTextEncodeSD3 with this empty_padding ("none": unpadded)
    sai_code: str | None = None
    comfyui: str | None = None  # a ComfyUI checkout (the comfyui profile's reference)
    comfyui_attention: str = "sdpa"  # ComfyUI imported with PyTorch attention, or "sub_quad": its CPU default kernels
    workflow: str | None = None  # a ComfyUI workflow whose settings the other fields took (parity.workflow)
    max_ulp: int = 0
    noise_floor: bool = False  # also run the reference with threads + 1: its own jitter per record
    tolerance: str = "ulp"  # "ulp": max_ulp per element; "noise": max abs within the reference's own jitter
    mode: str = "propagated"  # "teacher-forced": impl's units on the reference's inputs (local error); "both"
    reference_dump: str | None = None  # a dump (parity.dump) as the reference instead of the profile's library
    stream: bool = False  # both sides' large models paged in one layer / block at a time (parity.stream)
    max_memory: float | None = None  # GB a run may take: more needed in memory streams (None: what is available)


def unpadded(s: Spec, prompt) -> bool:
    """Whether the empty texts of ``prompt`` get no tokens: per-encoder texts are ComfyUI's ``CLIPTextEncodeSD3``,
    whose ``empty_padding`` is the run's (``--empty-padding``); one text is ``CLIPTextEncode``, which pads."""
    return s.empty_padding == "none" and not isinstance(prompt, str)


def validate(s: Spec) -> None:
    """Every option checked before any work (no torch import, no model loaded)."""
    from parity import flags as F

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UsageError(message)

    need(s.profile in REFERENCES, f"--profile {s.profile!r}: expected one of {', '.join(REFERENCES)}")
    need(s.dtype in DTYPES, f"--dtype {s.dtype!r}: expected one of {', '.join(DTYPES)}")
    need(1 <= s.threads <= 1024, f"--threads {s.threads}: between 1 and 1024")
    need(s.max_ulp >= 0, f"--max-ulp {s.max_ulp}: at least 0")
    need(s.tolerance in ("ulp", "noise"), f"--tolerance {s.tolerance!r}: expected ulp or noise")
    need(s.mode in MODES, f"--mode {s.mode!r}: expected one of {', '.join(MODES)}")
    need(s.tolerance != "noise" or s.noise_floor, "--tolerance noise needs the noise floor (--noise-floor)")
    need(len(s.prompts) > 0, "at least one prompt")
    for p in s.prompts:
        need(isinstance(p, str) or (isinstance(p, tuple) and len(p) == 3 and all(isinstance(x, str) for x in p)),
             f"prompt {p!r}: a string, or CLIP-L's, CLIP-G's and T5's texts")
    need(all(isinstance(p, str) for p in s.prompts) or s.profile != "sai" or s.reference_dump is not None,
         "--prompt-clip-g / --prompt-t5: the SD3.5 code encodes one prompt for the three encoders "
         "(sd3_infer.get_cond); per-encoder texts run against diffusers (prompt_2, prompt_3) or ComfyUI "
         "(CLIPTextEncodeSD3)")
    need(s.steps >= 1, f"--steps {s.steps}: at least 1")
    need(s.steps <= 1000, f"--steps {s.steps}: at most 1000 (the schedule has 1000 training timesteps)")
    need(math.isfinite(s.guidance) and s.guidance >= 0, f"--guidance {s.guidance}: a finite value >= 0")
    need(0 <= s.seed < 2 ** 63, f"--seed {s.seed}: between 0 and 2**63 - 1")
    need(s.shift is None or (math.isfinite(s.shift) and s.shift > 0), f"--shift {s.shift}: a finite value > 0")
    need(0 < s.strength <= 1, f"--strength {s.strength}: in (0, 1]")
    for name, v in (("height", s.height), ("width", s.width)):
        need(v > 0 and v % 16 == 0, f"--size: {name} {v} must be a positive multiple of 16 (VAE 8 x patch 2)")
    need(all(f in FAMILIES for f in s.families), f"--family: expected {', '.join(FAMILIES)}")
    need(not (s.families and (s.model or s.checkpoint)),
         "--family names embedded families; with --model or --checkpoint the image side runs that model")
    need(not (s.text_only and (s.image or s.slg or s.families)), "--text-only runs no image: drop --image/--slg/--family")
    names = [n for n, _ in s.overrides]
    need(len(names) == len(set(names)), f"--flag given twice: {sorted({n for n in names if names.count(n) > 1})}")
    for name, value in s.overrides:
        need(name in F.BY_NAME and value in F.BY_NAME[name].choices, f"--flag {name}={value!r}: not a flag value")
    need(all(layer >= 0 for layer in s.slg), f"--slg {list(s.slg)}: layers are block indices >= 0")
    slg_rule = dict(s.overrides).get("slg", F.profile_values(s.profile)["slg"] if s.profile in F.PROFILES else None)
    if s.slg and slg_rule != "comfyui":  # ComfyUI's window is one of sigmas, which the schedule decides
        lo, hi = SLG_WINDOW
        active = [k for k in range(s.steps) if s.steps * lo < k < s.steps * hi]
        need(bool(active), f"--slg with {s.steps} steps: the skip-layer window ({lo} to {hi} of the steps, exclusive) "
                           "holds no step; use at least 6 steps")
    need(s.negative_zero is None or 0 <= s.negative_zero < 1,
         f"--negative-zero {s.negative_zero}: a fraction of the schedule in [0, 1)")
    need(s.negative_zero is None or s.profile == "comfyui" or s.reference_dump is not None,
         f"--negative-zero: ConditioningZeroOut and timestep ranges are ComfyUI's; the {s.profile} reference has no "
         "zeroed negative (use --profile comfyui)")
    need(not (s.text_only and s.negative_zero is not None), "--text-only runs no image: drop --negative-zero")
    need(s.empty_padding in ("empty_prompt", "none"), f"--empty-padding {s.empty_padding!r}: empty_prompt or none")
    need(s.empty_padding == "empty_prompt" or s.profile == "comfyui" or s.reference_dump is not None,
         f"--empty-padding none: CLIPTextEncodeSD3's unpadded empty texts are ComfyUI's; the {s.profile} reference "
         "pads the empty negative and empty texts (use --profile comfyui)")
    need(s.comfyui_attention in ("sdpa", "sub_quad"), f"--comfyui-attention {s.comfyui_attention!r}: sdpa or sub_quad")
    need(s.comfyui_attention == "sdpa" or s.profile == "comfyui",
         f"--comfyui-attention {s.comfyui_attention}: ComfyUI's import mode; the {s.profile} reference runs SDPA "
         "(use --profile comfyui, or --flag attention_kernel=sub_quad for impl alone)")
    values = flag_values(s)
    need(s.max_memory is None or (math.isfinite(s.max_memory) and s.max_memory > 0),
         f"--max-memory {s.max_memory}: a number of GB > 0")
    if s.stream:
        why = not_streamed(s, values)
        need(why is None, f"--stream: {why}")
    need(not (s.reference_dump and s.noise_floor), "--noise-floor reruns the reference; a dump cannot be rerun")
    for flag, path in (("--model", s.model), ("--config", s.config), ("--sai-code", s.sai_code),
                       ("--comfyui", s.comfyui),
                       ("--reference-dump", s.reference_dump)):
        need(path is None or Path(path).is_dir(), f"{flag} {path}: not a directory")
    for flag, path in (("--checkpoint", s.checkpoint), ("--image", s.image), ("--workflow", s.workflow)):
        need(path is None or Path(path).is_file(), f"{flag} {path}: no such file")


def not_streamed(s: Spec, values: dict) -> str | None:
    """Why the run ``s`` cannot stream, or None when it can."""
    if s.profile not in ("diffusers", "sai"):
        return f"the {s.profile} profile is not streamed yet (the diffusers and sai profiles are)"
    if values["half_compute"] != "native" or values["text_encoder_storage"] != "as_loaded":
        return ("weights are paged in the dtype they compute in; half_compute=float32 and "
                "text_encoder_storage=float16 round them otherwise")
    return None


# ---------------------------------------------------------------------------------------------- resolved run

@dataclass(frozen=True)
class TextModel:
    """The files of the text comparison: tokenizers from ``directory``; encoder weights from its ``text_encoder*/``
    folders or, when ``single_file`` is set, from that file's ``text_encoders.*`` with their configs from
    ``config_dir`` (None: what no shape carries is inferred)."""
    label: str
    directory: Path
    single_file: Path | None = None
    config_dir: Path | None = None
    has_t5: bool = True
    joint_dim: int | None = None  # the width of diffusers' zero rows when T5 is absent


@dataclass(frozen=True)
class ImageModel:
    """One pipeline to run: its files, impl's configs (read or inferred) and each side's sigma shift."""
    label: str
    directory: Path | None  # diffusers layout: configs and scheduler (and weights unless single_file)
    single_file: Path | None  # an SAI single file: MMDiT + VAE (+ text encoders)
    mmdit: Any  # impl.mmdit.MMDiTConfig
    vae: Any  # impl.vae.VAEConfig
    shift: dict[str, float]  # side -> sigma shift
    weights_in_directory: bool = True  # False: only the single file has the weights (``--checkpoint``)
    family: str | None = None  # an embedded family: impl checks the files' tensors against the committed sha256
    quantized: bool = False  # the single file's MMDiT is scaled fp8 (``impl.quant``)


@dataclass
class Run:
    spec: Spec
    values: dict[str, Any]  # every flag's value (profile + overrides)
    text_model: TextModel
    models: list[ImageModel]
    reference: str
    notes: list[str] = field(default_factory=list)
    files: dict[str, list[Path]] = field(default_factory=dict)  # a component folder or single file -> files read
    warnings: list[str] = field(default_factory=list)  # suspect inputs: dtype casts on load, NaN / Inf weights
    meter: Any = None  # parity.resources.Meter: seconds and peak memory per stage and component, as they ran
    digest: str | None = None  # a streamed run's weight digests: the kind a dump holds (None: parity.sides's default)

    def sources(self, single_files: bool) -> dict[str, str]:
        """The files a side reads, each with its fingerprint (``file_fingerprint``): the text encoders', then per
        model its SAI single file (``single_files``, where it has one) or its ``transformer/`` and ``vae/``."""
        parts = ["text_encoders", "text_encoder", "text_encoder_2", "text_encoder_3"]
        for m in self.models:
            single = m.single_file is not None and (single_files or not m.weights_in_directory)
            parts += [m.label] if single else [f"{m.label} transformer", f"{m.label} vae"]
        return {str(f): file_fingerprint(f) for k in parts for f in self.files.get(k, ())}

    @property
    def text(self):
        from parity import flags as F

        return F.settings(self.values)

    @property
    def opts(self) -> dict:
        from parity import flags as F

        return F.image_options(self.values)

    @property
    def dtype(self):
        import torch

        return getattr(torch, self.spec.dtype)

    @property
    def sai_code(self) -> Path | None:
        from parity.sides.sai import code_dir

        return code_dir(self.spec.sai_code)

    @property
    def comfyui_code(self) -> Path | None:
        from parity.sides.comfyui import code_dir

        return code_dir(self.spec.comfyui)


def file_fingerprint(path: Path) -> str:
    """sha256 of a safetensors file's header (names, dtypes, shapes, offsets) and size (hashing multi-GB weights
    on every run would cost minutes), or of the whole file otherwise."""
    import hashlib

    with open(path, "rb") as f:
        if path.suffix != ".safetensors":
            return hashlib.sha256(f.read()).hexdigest()
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        return hashlib.sha256(head + f.read(min(n, 100_000_000)) + str(path.stat().st_size).encode()).hexdigest()


def weight_sources(text: TextModel, models: list[ImageModel]) -> dict[str, list[Path]]:
    """The files every side reads, by the layout's one rule (``impl.weights.weight_files``): a folder where the
    sides could read different bytes (another weight name, a pickle fallback, an index beside a single file) is
    refused here, before any side runs."""
    from impl.weights import MODEL_WEIGHTS, TEXT_WEIGHTS, weight_files

    out: dict[str, list[Path]] = {}
    if text.single_file is not None:
        out["text_encoders"] = [text.single_file]
    else:
        for sub in ("text_encoder", "text_encoder_2") + (("text_encoder_3",) if text.has_t5 else ()):
            out[sub] = weight_files(text.directory / sub, TEXT_WEIGHTS)
    for m in models:
        if m.single_file is not None:
            out[m.label] = [m.single_file]
        if m.weights_in_directory and m.directory is not None:
            for sub in ("transformer", "vae"):
                out[f"{m.label} {sub}"] = weight_files(m.directory / sub, MODEL_WEIGHTS)
    return out


def check_text_files(text: TextModel) -> None:
    """Before any side runs: each text encoder folder's config parses within bounds and its weights' headers have
    the names and shapes that config builds (checked without allocating), and every tokenizer id fits the
    embedding table it indexes. A single file's encoders are sized from its shapes."""
    from impl.clip_tokenizer import BPEVocab
    from impl.t5_tokenizer import SentencePieceModel
    from impl.text import check_encoder_folder
    from impl.weights import TEXT_WEIGHTS, read_safetensors_meta, weight_files

    for tok in ("tokenizer", "tokenizer_2") + (("tokenizer_3",) if text.has_t5 else ()):
        need = ("spiece.model",) if tok == "tokenizer_3" else ("vocab.json", "merges.txt")
        missing = [n for n in need if not (text.directory / tok / n).is_file()]
        if missing:
            raise UsageError(f"{text.directory / tok}: no {' or '.join(missing)} (every side reads the model's "
                             "tokenizer folders)")
    rows: dict[str, tuple[int, str]] = {}  # tokenizer folder -> (embedding rows, where they come from)
    if text.single_file is not None:
        meta = read_safetensors_meta(text.single_file)
        for tok, key in (("tokenizer", "clip_l.transformer.text_model.embeddings.token_embedding.weight"),
                         ("tokenizer_2", "clip_g.transformer.text_model.embeddings.token_embedding.weight"),
                         ("tokenizer_3", "t5xxl.transformer.shared.weight")):
            t = meta.get(f"text_encoders.{key}")
            if t is not None and t.ndim == 2:
                rows[tok] = (t.shape[0], f"{text.single_file} text_encoders.{key}")
    else:
        for sub, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3")):
            if sub == "text_encoder_3" and not text.has_t5:
                continue
            meta = {}
            for f in weight_files(text.directory / sub, TEXT_WEIGHTS):
                meta.update(read_safetensors_meta(f))
            cfg = check_encoder_folder(text.directory / sub, meta)
            rows[tok] = (cfg.vocab_size, f"{text.directory / sub / 'config.json'} vocab_size")
    for tok, (n, where) in rows.items():
        folder = text.directory / tok
        if tok == "tokenizer_3":
            if (folder / "spiece.model").is_file():
                size, name = len(SentencePieceModel.load(folder / "spiece.model").pieces), "spiece.model"
                top = size - 1
            else:
                continue
        elif (folder / "vocab.json").is_file():
            vocab, name = BPEVocab.from_dir(folder), "vocab.json"
            top = max(vocab.encoder.values())
        else:
            continue
        if top >= n:
            raise UsageError(f"{folder / name}: token id {top} is beyond the embedding table ({n} rows, {where})")


def stored_dtypes(files: dict[str, list[Path]], dtype: str) -> list[str]:
    """A warning per weight file holding tensors of another dtype than the run's: every side casts them on load.
    Integer tensors other than position-id buffers are named too (a weight stored as integers is suspect)."""
    from collections import Counter

    from impl.weights import read_safetensors_meta

    st = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[dtype]
    out = []
    for f in sorted({f for fs in files.values() for f in fs}):
        meta = read_safetensors_meta(f)
        other = Counter(m.dtype for k, m in meta.items() if m.dtype != st and not (
            m.dtype in ("I64", "I32") and k.endswith("position_ids")))
        if other:
            what = ", ".join(f"{n} {d}" for d, n in sorted(other.items()))
            out.append(f"{f}: tensors stored in another dtype than the run's {dtype} ({what}), cast on load")
    return out


def check_json_files(directories) -> None:
    """Every JSON file of a model directory and its component folders (configs, tokenizer settings, indexes) is a
    readable JSON object: the references read them too, and their errors name no file or crash."""
    for d in {Path(x) for x in directories if x is not None}:
        for path in sorted([*d.glob("*.json"), *d.glob("*/*.json")]):
            _read_json(path)


def _read_json(path: Path) -> dict:
    from impl.weights import read_config  # impl's reader: errors name the file

    return read_config(path)


def _config_dir(s: Spec) -> Path | None:
    """Where a single file's missing configs come from: ``--config``, a diffusers directory beside the file
    (``model_index.json`` in its folder), or ``--model`` when it has ``transformer/``."""
    if s.config:
        return Path(s.config)
    if s.checkpoint and (Path(s.checkpoint).parent / "model_index.json").is_file():
        return Path(s.checkpoint).parent
    if s.model and (Path(s.model) / "transformer" / "config.json").is_file():
        return Path(s.model)
    return None


def _text_model(s: Spec, notes: list[str]) -> TextModel:
    from parity.embedded import model_dir

    directory, label, single, config_dir = Path(s.model) if s.model else model_dir(), \
        str(s.model) if s.model else "embedded-default", None, None
    if s.checkpoint:
        from impl.checkpoint import PREFIXES, split_text_encoders
        from impl.weights import safetensors_keys

        keys = [k[len(PREFIXES["text_encoders"]):] for k in safetensors_keys(Path(s.checkpoint))
                if k.startswith(PREFIXES["text_encoders"])]
        if keys:
            present = split_text_encoders(dict.fromkeys(keys), s.checkpoint)
            if set(present) != {"clip_l", "clip_g", "t5"}:
                raise UsageError(f"--checkpoint {s.checkpoint}: text_encoders.* holds {sorted(present)}; a single file "
                                 "carries all three text encoders or none")
            config_dir = _config_dir(s)
            tokenizers = Path(s.model) if s.model else config_dir
            if tokenizers is None and _embedded_vocabularies(Path(s.checkpoint)):
                tokenizers = directory
                notes.append(f"{s.checkpoint}: its text encoders have the embedded default's vocabularies; its "
                             "tokenizers are used")
            if tokenizers is None:
                raise UsageError(f"--checkpoint {s.checkpoint}: its text encoders need the model's tokenizers, which "
                                 "a single file does not hold: give --model DIR (or --config DIR) with tokenizer*/")
            directory, single, label = tokenizers, Path(s.checkpoint), Path(s.checkpoint).name
            notes.append(f"text encoders from {s.checkpoint}; tokenizers from {directory}")
    if not (directory / "tokenizer").is_dir():
        raise UsageError(f"{directory}: no tokenizer/ folder (the tokenizers come from the model's directory)")
    has_t5 = single is not None or (directory / "text_encoder_3").is_dir()
    joint_dim = None
    if not has_t5:
        path = directory / "transformer" / "config.json"
        from impl.weights import config_value

        joint_dim = config_value(_read_json(path), path, "joint_attention_dim") if path.is_file() else None
        if joint_dim is None:
            raise UsageError(f"{directory}: no text_encoder_3/ and no transformer/config.json to size diffusers' zero "
                             "T5 rows (joint_attention_dim)")
        notes.append(f"{directory}: no text_encoder_3/: T5 absent, {joint_dim}-wide zero rows (QUIRKS T10)")
    return TextModel(label, directory, single, config_dir, has_t5, joint_dim)


def _embedded_vocabularies(path: Path) -> bool:
    """Whether a single file's text encoders have the embedded default's vocabulary sizes (CLIP 49408 rows, the
    tiny T5's), so the embedded tokenizers fit them."""
    from impl import embedded
    from impl.weights import read_safetensors_meta

    meta = read_safetensors_meta(path)
    rows = lambda key: meta[key].shape[0] if key in meta else None  # noqa: E731
    t5 = rows("text_encoders.t5xxl.transformer.encoder.embed_tokens.weight") or \
        rows("text_encoders.t5xxl.transformer.shared.weight")
    return (t5 == embedded.T5.vocab_size and
            rows("text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight") == embedded.CLIP_L.vocab_size)


COMFYUI_SHIFT = 3.0  # ComfyUI's SD3 model config (the shift flag's comfyui value), for every SD3 family

UNSUPPORTED_SCHEDULER = {"use_dynamic_shifting": False, "invert_sigmas": False, "shift_terminal": None,
                         "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                         "stochastic_sampling": False}


def scheduler_shift(directory: Path | None) -> float:
    """The shift of ``scheduler/scheduler_config.json`` (diffusers' default 1.0 without one). Options of
    FlowMatchEulerDiscreteScheduler that impl does not reproduce are refused by name."""
    path = None if directory is None else directory / "scheduler" / "scheduler_config.json"
    if path is None or not path.is_file():
        return 1.0
    cfg = _read_json(path)
    for k, default in UNSUPPORTED_SCHEDULER.items():
        if cfg.get(k, default) not in (default, None if default is None else default):
            raise Unsupported(f"{path}: {k} = {cfg[k]!r} is not reproduced by impl (the SD3 schedule is a fixed "
                              f"shift); only {k} = {default!r} is supported")
    from impl.weights import config_value

    shift = config_value(cfg, path, "shift", float, 1.0)
    if not (math.isfinite(shift) and shift > 0):
        raise UsageError(f"{path}: shift {shift!r} must be finite and > 0")
    return shift


def _image_models(s: Spec, values: dict, reference: str, notes: list[str]) -> list[ImageModel]:
    from impl import embedded
    from parity import flags as F
    from parity.embedded import model_dir, single_file

    def shifts(label: str, directory: Path | None) -> dict[str, float]:
        if s.shift is not None:
            return {"impl": s.shift, reference: s.shift}
        rule = {"scheduler_config": scheduler_shift(directory), "comfyui": COMFYUI_SHIFT}
        impl = rule.get(values["shift"]) or F.sai_config_shift(label)
        # ComfyUI: its own model config's shift (the side reads it there; ModelSamplingSD3 only with --shift)
        ref = {"diffusers": rule["scheduler_config"], "sai": F.sai_config_shift(label), "comfyui": None}[reference]
        return {"impl": impl, reference: ref}

    if s.text_only:
        return []
    if s.checkpoint:
        model = _checkpoint_model(Path(s.checkpoint), _config_dir(s), notes, shifts)
        if model.quantized and reference != "comfyui" and not s.reference_dump:
            raise Unsupported(f"--checkpoint {s.checkpoint}: its MMDiT is in ComfyUI's scaled-fp8 layout, which "
                              f"the {reference} reference does not read (it would load the float8 values unscaled); "
                              "check it with --profile comfyui")
        return [model]
    if s.model:
        d = Path(s.model)
        if not ((d / "transformer").is_dir() and (d / "vae").is_dir()):
            notes.append(f"image side not run: {d} has no transformer/ and vae/")
            return []
        from impl.checkpoint import match_presets
        from impl.mmdit import MMDiTConfig
        from impl.vae import VAEConfig

        mc = MMDiTConfig.from_diffusers(_read_json(d / "transformer" / "config.json"), str(d / "transformer" / "config.json"))
        vc = VAEConfig.from_diffusers(_read_json(d / "vae" / "config.json"), str(d / "vae" / "config.json"))
        label = "/".join(match_presets(mc)) or d.name
        return [ImageModel(label, d, None, mc, vc, shifts(label, d))]
    out = []
    for family in s.families or FAMILIES:
        label = f"embedded-{family}"
        d = model_dir(family)
        out.append(ImageModel(label, d, single_file(family), embedded.MMDIT[family], embedded.VAE, shifts(label, d),
                              family=family))
    return out


def _checkpoint_model(path: Path, config_dir: Path | None, notes: list[str], shifts) -> ImageModel:
    """impl's configs of an SAI single file: from its shapes, with the values no shape carries read from the
    configs in ``config_dir`` (else inferred, and noted)."""
    from impl.checkpoint import PREFIXES, infer_mmdit, infer_vae, match_presets
    from impl.quant import is_quantized
    from impl.weights import read_safetensors_meta
    from parity.convert import given_configs

    meta = read_safetensors_meta(path)
    parts = {p: {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)} for p, prefix in PREFIXES.items()}
    given = given_configs(config_dir)
    if config_dir is not None:
        notes.append(f"configs of {path.name} from {config_dir}")
    mc, inferred = infer_mmdit(parts["mmdit"], f"{path} (model.diffusion_model.*)", given.get("mmdit"))
    if not parts["vae"]:
        raise UsageError(f"{path}: no first_stage_model.* (VAE) keys; the image check needs the VAE")
    vc, inferred_v = infer_vae(parts["vae"], f"{path} (first_stage_model.*)", given.get("vae"))
    notes.extend(inferred + inferred_v)
    label = "/".join(match_presets(mc)) or path.name
    quantized = is_quantized(parts["mmdit"])
    if quantized:
        notes.append(f"{path.name}: scaled-fp8 MMDiT; impl dequantizes each scaled weight in the dtype it computes in")
    return ImageModel(label, config_dir, path, mc, vc, shifts(label, config_dir), weights_in_directory=False,
                      quantized=quantized)


def flag_values(s: Spec) -> dict:
    """The profile's flag values, ``--comfyui-attention sub_quad`` setting ``attention_kernel`` unless a ``--flag``
    names it, then the ``--flag`` overrides."""
    from parity import flags as F

    values = F.profile_values(s.profile)
    if s.comfyui_attention == "sub_quad":
        values["attention_kernel"] = "sub_quad"
    return {**values, **dict(s.overrides)}


def resolve(s: Spec) -> Run:
    """The run ``s`` describes: flag values, the models' files and configs, each side's shift; options that need
    the models' configs (skip layers, image size) are checked here, still before any side runs."""
    validate(s)
    reference = REFERENCES[s.profile]
    notes: list[str] = []
    if s.workflow:
        from parity.workflow import settings

        notes += settings(s.workflow).notes
    values = flag_values(s)
    text_model = _text_model(s, notes)
    if not text_model.has_t5:
        if reference in ("sai", "comfyui"):
            raise Unsupported(f"{text_model.directory}: no text_encoder_3/; the {reference} side requires T5 here")
        values = {**values, "t5_absent": values["t5_absent"] or "zeros", **dict(s.overrides)}
    check_json_files([text_model.directory, text_model.config_dir, _config_dir(s)])
    check_text_files(text_model)
    models = _image_models(s, values, reference, notes)
    for m in models:
        for layer in s.slg:
            if layer >= m.mmdit.depth:
                raise UsageError(f"--slg {layer}: {m.label} has {m.mmdit.depth} blocks (0..{m.mmdit.depth - 1})")
        p, side = m.mmdit.patch, m.mmdit.pos_embed_max_size
        for name, v in (("height", s.height), ("width", s.width)):
            if v // 8 // p > side:
                raise UsageError(f"--size: {name} {v} gives {v // 8 // p} patches; {m.label}'s position table "
                                 f"holds {side} (at most {side * p * 8} pixels)")
    if reference in ("sai", "comfyui") and models and any(m.single_file is None for m in models):
        raise UsageError(f"the {reference} side reads SAI single files: give the model's --checkpoint FILE "
                         "(e.g. the repository's sd3.5_large.safetensors)")
    files = weight_sources(text_model, models)
    return Run(s, values, text_model, models, reference, notes, files, stored_dtypes(files, s.dtype))


IN_MEMORY_BYTES = 16  # per weight element: what a run holding both sides' models whole takes (see plan_memory)


def plan_memory(run: Run) -> Run:
    """A run of named models (--model / --checkpoint) that would not fit in memory streams (``--stream``), or is
    refused before anything loads when it cannot stream. Its need in memory is estimated as ``IN_MEMORY_BYTES``
    per element of the weight files it reads (a folder and a single file of one model both counted): impl's
    float32 copy (4), the reference's model with the load's transient copies (about twice its float32 size) and
    the records; measured, a check of diffusers-built models with 1.5 GB of float32 weights (0.375 G elements)
    peaked at 6.2 GB, 16.5 bytes per element. The budget is ``--max-memory``, else the memory available now."""
    s = run.spec
    if s.stream or (s.model is None and s.checkpoint is None):
        return run
    import torch

    from impl.math import available_memory  # MemAvailable (unknown: unlimited)
    from impl.weights import read_safetensors_meta

    budget = s.max_memory * 1e9 if s.max_memory is not None else available_memory(torch.device("cpu"))
    elements = sum(math.prod(t.shape) for f in {f for fs in run.files.values() for f in fs}
                   for t in read_safetensors_meta(f).values())
    need = elements * IN_MEMORY_BYTES
    if need <= budget:
        return run
    what = f"--max-memory {s.max_memory:g} GB" if s.max_memory is not None else "the memory available now"
    why = not_streamed(s, run.values)
    if why is not None:
        raise UsageError(f"in memory this run needs about {need / 1e9:.1f} GB ({elements / 1e9:.2f} G weights), more "
                         f"than {what} ({budget / 1e9:.1f} GB), and it cannot stream: {why}. A larger --max-memory "
                         "runs it in memory anyway")
    run.spec = replace(s, stream=True)
    run.notes.append(f"streamed by itself: in memory this run would need about {need / 1e9:.1f} GB "
                     f"({elements / 1e9:.2f} G weights), more than {what} ({budget / 1e9:.1f} GB)")
    return run


# ---------------------------------------------------------------------------------------------- execution

def read_image(path: str, height: int, width: int):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise UsageError(f"--image {path}: not a readable image ({e})") from None
    if arr.shape[:2] != (height, width):
        raise UsageError(f"--image {path}: {arr.shape[0]}x{arr.shape[1]} pixels; --size is {height}x{width} "
                         "(resize it first: the pipelines' resampling is not compared)")
    return arr


class Progress:
    """A run's stages (each side's text and image parts, the noise floor, teacher forcing) as a progress bar on
    stderr (tqdm, when installed), drawn only on a terminal."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.bar = enabled, None

    def start(self, total: int) -> None:
        if not self.enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        import sys

        self.bar = tqdm(total=total, file=sys.stderr, unit="stage", disable=None, leave=False, dynamic_ncols=True)

    def step(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_description(what)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def execute(run: Run, side_name: str, cache: dict | None = None, progress: Progress | None = None):
    """One side's records of the whole run (text, then each model's image run), in its execution order. With
    ``cache`` (a dict), a side whose inputs are unchanged is computed once (e.g. the reference of a flag sweep)."""
    from parity import records as R
    from parity.determinism import pinned
    from parity.resources import metering
    from parity.sides import digesting, make_side

    side = make_side(side_name, run)
    key = (side_name, side.key(run), run.digest) if cache is not None else None
    meter = metered(run)
    step = progress.step if progress is not None else lambda what: None
    if key is not None and key in cache:
        for what in ["text"] + [m.label for m in run.models]:
            meter.skipped(f"{side_name} {what} (computed before)")
            step(f"{side_name} {what} (computed before)")
        return cache[key]
    if run.spec.stream:
        from parity.stream import return_freed_memory

        return_freed_memory()
    init = read_image(run.spec.image, run.spec.height, run.spec.width) if run.spec.image else None
    with pinned(run.spec.threads), metering(meter), digesting(run.digest):
        with meter.stage(f"{side_name} text"):
            parts = [side.text(run)]
        step(f"{side_name} text")
        for m in run.models:
            with meter.stage(f"{side_name} {m.label}"):
                parts.append(side.image(run, m, init))
            step(f"{side_name} {m.label}")
    out = R.merge(*parts), {**side.sources(run), **({"covers": sorted(side.covers)} if side.covers else {})}
    if key is not None:
        cache[key] = out
    return out


def metered(run: Run):
    """The run's ``parity.resources.Meter`` (made on first use)."""
    if run.meter is None:
        from parity.resources import Meter

        run.meter = Meter()
    return run.meter


def compare(run: Run, impl, ref, noise: dict | None = None, local=None):
    """The report of impl's records against the reference's; ``local``: impl's teacher-forced records
    (``parity.teacher.local_side``), compared instead of impl's (``--mode teacher-forced``) or beside them."""
    from parity.report import Report

    mode = run.spec.mode
    report = Report(run.text_model.label if not run.models else ", ".join(m.label for m in run.models),
                    run.spec.profile, run.reference, run.spec.dtype, run.values, run.spec.threads, run.spec.max_ulp,
                    notes=list(run.notes), warnings=list(run.warnings), mode=mode)
    covers = ref[1].get("covers")
    keep = lambda side: side if not covers or side is None else {  # noqa: E731
        k: v for k, v in side.items() if v[0]["component"] in covers}
    if covers:
        report.notes.append(f"{run.reference} produces {', '.join(covers)} only: impl is compared on those")
    meter = metered(run)
    with meter.stage("comparison"):  # every record's metrics
        if mode == "teacher-forced":
            report.add_pairs(keep(local), ref[0], noise, run.spec.tolerance)
        else:
            report.add_pairs(keep(impl[0]), ref[0], noise, run.spec.tolerance, keep(local))
    import resource
    import sys

    from parity.golden import versions

    report.versions, report.text_dir = versions(), run.text_model.directory
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    stages = meter.stages
    report.resources = {"peak_rss_mb": round(peak / (2 ** 20 if sys.platform == "darwin" else 2 ** 10), 1),
                        "seconds": [[st["stage"], st["seconds"]] for st in stages], "stages": stages}
    if run.spec.max_memory is not None and report.resources["peak_rss_mb"] * 2 ** 20 > run.spec.max_memory * 1e9:
        report.warnings.append(f"peak RSS {report.resources['peak_rss_mb'] / 1024:.2f} GB: more than --max-memory "
                               f"{run.spec.max_memory:g} GB")
    report.sides = (keep(local) if mode == "teacher-forced" else keep(impl[0]), ref[0])
    if mode != "propagated":
        report.notes.append(f"teacher forcing: each impl unit also ran on {run.reference}'s inputs; sources "
                            "(parameters, token ids, sigmas, the start latent) keep impl's own values")
    report.sources = {"impl": impl[1], run.reference: ref[1]}
    if run.reference == "diffusers":  # a parameter that differs is named in diffusers' scheme too
        from parity.convert import _rules

        names = {m.label: {c: {r.sai: f"{'|'.join(r.diffusers)} ({r.transform})" for r in _rules(cfg)}
                           for c, cfg in (("mmdit", m.mmdit), ("vae", m.vae))} for m in run.models}
        from parity import records as R

        for r in report.records:
            if R.is_weight(r) and not r["bitwise_equal"]:
                name = r["layer"].removeprefix(R.WEIGHT)
                r["reference_name"] = names.get(r["model"], {}).get(r["component"], {}).get(name, name)
    if run.spec.text_only:
        report.notes.append("image side not run (--text-only)")
    return report


def check(s: Spec, cache: dict | None = None, progress: Progress | None = None):
    """impl against the profile's reference, every record: the ``sd3parity check`` command. A run that would not fit
    in memory streams (``plan_memory``)."""
    run = plan_memory(resolve(s))
    s = run.spec
    progress = progress or Progress(False)
    progress.start((1 + len(run.models)) * (3 if s.noise_floor else 2) + (s.mode != "propagated"))
    try:
        return _check(s, run, cache, progress)
    finally:
        progress.close()


def _check(s: Spec, run: Run, cache: dict | None, progress: Progress):
    if s.reference_dump:  # weight digests of the kind the dump holds
        from parity.dump import digest_kind

        from parity.sides import DIGEST_DEFAULT

        kind = digest_kind(Path(s.reference_dump))
        if kind and kind != DIGEST_DEFAULT:
            run.digest = kind
            run.notes.append(f"weight digests: {kind}, the kind the dump holds")
    impl = execute(run, "impl", cache, progress)
    if s.reference_dump:
        return _against_dump(s, run, impl, progress)
    try:
        ref = execute(run, run.reference, cache, progress)
    except Unsupported as e:
        inferred = [n for n in run.notes if "inferred" in n]
        raise Unsupported(str(e) + "".join(f"\n  impl {n}" for n in inferred)) from None
    if s.stream:  # a weight one side pages and the other loads whole (the SD3.5 code's CLIP encoders)
        held, records = _as_digests(impl[0], ref[0])
        impl, ref = (held, impl[1]), (records, ref[1])
    noise = None
    if s.noise_floor:  # the reference against itself on another thread count: CPU reductions in another order
        other = execute(resolve(replace(s, threads=s.threads + 1)), run.reference, cache, progress)
        noise = noise_floor(ref[0], other[0])
        run.notes.append(f"noise floor: {run.reference} with {s.threads} against {s.threads + 1} threads, per record")
    return compare(run, impl, ref, noise, _teacher(run, impl[0], ref[0], progress))


def _teacher(run: Run, impl, ref, progress: Progress):
    """impl's teacher-forced records against ``ref`` (``parity.teacher``), when the mode asks for them."""
    if run.spec.mode == "propagated":
        return None
    from parity.resources import metering
    from parity.teacher import local_side

    meter = metered(run)
    with metering(meter), meter.stage("teacher forcing"):
        local = local_side(run, impl, ref)
    progress.step("teacher forcing")
    return local


def _against_dump(s: Spec, run: Run, impl, progress: Progress):
    """impl against a dump's records (``--reference-dump``), on the records the dump holds."""
    from parity import dump as D

    path = Path(s.reference_dump)
    records, manifest = D.read(path)
    for _ in range(1 + len(run.models)):
        progress.step("reference dump")
    run.reference = f"dump {path}"
    held, records = _as_digests({k: v for k, v in impl[0].items() if k in records}, records)
    run.notes.append(f"reference: the dump {path} ({manifest.get('producer', {}).get('name', 'unnamed producer')}); "
                     f"impl compared on the {len(held)} records it holds ({len(impl[0]) - len(held)} not dumped)")
    ref = (records, {"dump": str(path), "producer": manifest.get("producer", {})})
    return compare(run, (held, impl[1]), ref, None, _teacher(run, impl[0], records, progress))


def _as_digests(impl: dict, ref: dict) -> tuple[dict, dict]:
    """impl's records and the reference's (a dump's, or a side that loads a model whole while the other pages it),
    with a weight record that one of them holds as a digest (a streamed run's parameter of over 2**20 elements)
    and the other in full replaced by the digest of the full one, of the same kind (``parity.sides.digest`` of
    the same bytes), so that the two compare."""
    import math

    from parity import records as R
    from parity.sides import DIGEST_ABOVE, digest, digest_kind

    impl, ref = dict(impl), dict(ref)
    for k, (fields, t) in list(impl.items()):
        if R.is_weight(fields) and k in ref:
            u = ref[k][1]
            if digest_kind(t) and not digest_kind(u) and math.prod(u.shape) > DIGEST_ABOVE:
                ref[k] = (ref[k][0], digest(R.load(u), digest_kind(t)))
            elif digest_kind(u) and not digest_kind(t) and math.prod(t.shape) > DIGEST_ABOVE:
                impl[k] = (fields, digest(R.load(t), digest_kind(u)))
    return impl, ref


def noise_floor(a, b) -> dict[str, dict]:
    """Per record key: the reference's own jitter between two runs (max abs and max ULP of its two tensors)."""
    from parity import records as R
    from parity.metrics import compare as metrics

    out = {}
    for key, (fields, t) in a.items():
        if key in b:
            m = metrics(R.load(t), R.load(b[key][1]))
            if "shape_mismatch" not in m:
                out[key] = {"max_abs": m["max_abs_err"], "max_ulp": m["max_ulp"]}
    return out


def with_overrides(s: Spec, **flags) -> Spec:
    return replace(s, overrides=tuple(sorted({**dict(s.overrides), **flags}.items())))


def spec_json(s: Spec) -> dict:
    return json.loads(json.dumps({k: getattr(s, k) for k in s.__dataclass_fields__}, default=list))
