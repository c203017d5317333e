"""ComfyUI as a side: its own loaders and nodes, from a local checkout the user names.

ComfyUI (GPL-3.0) is not a dependency and nothing of it is copied here: the user points at a checkout
(``--comfyui DIR`` or ``$SD3PARITY_COMFYUI``) and its own code runs every step:

* text: ``comfy.sd.load_clip`` (the three encoder files, ``CLIPType.SD3``: its ``SD3ClipModel``, its CLIP and T5
  modules, its ``SD3Tokenizer``) or, for a single file holding them, ``load_checkpoint_guess_config``'s CLIP
  output, then the ``CLIPTextEncode`` node (``CLIPTextEncodeSD3`` for per-encoder texts and the unpadded negative);
* image: ``comfy.sd.load_checkpoint_guess_config`` on the SAI single file (its model detection, ``SD3`` model,
  VAE), then the nodes ``EmptySD3LatentImage`` (img2img: ``LoadImage`` on a copy of the picture in its input
  folder, ``VAEEncode``), ``ModelSamplingSD3`` (only with ``--shift``), ``SkipLayerGuidanceSD3`` (with ``--slg``,
  at its own defaults), ``KSampler``, ``VAEDecode`` and ``SaveImage`` (its PNG read back: the uint8 conversion is
  ComfyUI's own). Per step, k-diffusion's own callback gives the guided x0 and the latents.

What the harness adapts, at the boundary, none of it computing:

* ComfyUI parses its command line on import: it is imported with ``--cpu --use-pytorch-cross-attention
  --disable-all-custom-nodes`` (SDPA), or without ``--use-pytorch-cross-attention`` for ``--comfyui-attention
  sub_quad`` (its CPU default kernels), and its folders (output, temp, user, input) under a temporary base directory
  of this process; ``sys.argv`` is restored. Another checkout or mode imports it afresh.
* ``torchvision`` / ``torchaudio`` / ``av``: modules outside SD3 import them at module level; where they are not
  installed, empty stand-ins take their names while ComfyUI imports (an attribute read from them raises), and are
  gone after.
* torch state ComfyUI sets on import (``allow_fp16_bf16_reduction_math_sdp``) is its own while ComfyUI runs and
  the caller's otherwise.
* Sizes other than the released ones (the embedded models): its CLIP-L / CLIP-G / T5 JSON configs get the model's
  sizes through its own ``{clip_l,clip_g,t5xxl}_model_config`` model options; ``SD3ClipModel.load_sd`` (which
  tells CLIP-G by a 31st layer) gets the files in the order it was given them, and ``comfy.sd.t5xxl_detect`` (which
  finds T5-XXL by a 24th block, and with it the T5's dtype and quantization) the third; its VAE configuration
  (``ch``, ``ch_mult``, ``num_res_blocks``, hard-coded in ``comfy/sd.py``) takes the file's; ``get_cond``'s
  ``F.pad(..., 4096 - width)`` pads to the model's T5 width; a T5 whose vocabulary is not T5-XXL's uses the model's
  ``tokenizer_3`` instead of ComfyUI's bundled T5 tokenizer; without CLIP rows (empty unpadded texts) its zero
  pooled vector, 2048 wide whatever the encoders, is cut to the width of its own CLIP encoders. Each adaptation made
  is listed in the report's notes.

ComfyUI runs with its defaults otherwise (text-encoder weights in float16, the model and VAE dtypes it picks). The
run's ``sampler`` and ``schedule`` flags are the ``KSampler`` node's sampler and scheduler.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import io
import os
import re
import shutil
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

from impl.quant import SCALE_KEYS
from parity import naming as N
from parity import records as R
from parity.run import Unsupported, UsageError
from parity.sides import ImageCapture, checkout, code_fingerprint, text_side
from parity.sides.sai import joint_width

ENV = "SD3PARITY_COMFYUI"
MARKERS = ("nodes.py", "comfy/sd.py", "comfy/text_encoders/sd3_clip.py", "comfy_extras/nodes_sd3.py",
           "comfy/ldm/modules/diffusionmodules/mmdit.py")
ARGV = ("--cpu", "--use-pytorch-cross-attention", "--disable-all-custom-nodes")
PYTORCH_ATTENTION = "--use-pytorch-cross-attention"
PACKAGES = ("comfy", "comfy_extras", "comfy_api", "comfy_execution", "comfy_config", "app", "nodes", "folder_paths",
            "comfyui_version", "node_helpers", "latent_preview", "server", "execution", "utils", "api_server",
            "comfy_api_nodes", "alembic_db", "middleware", "protocol", "hook_breaker_ac10a0", "cuda_malloc")
STUBBED = ("torchvision", "torchaudio", "av")
SAMPLERS = {"sai_euler": "euler", "sai_dpmpp_2m": "dpmpp_2m"}
SCHEDULERS = {"sai": "normal", "sgm_uniform": "sgm_uniform", "simple": "simple"}
CLIP_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "projection_dim",
             "hidden_act")
T5_KEYS = ("d_ff", "d_model", "num_heads", "num_layers", "vocab_size", "d_kv")
RELEASED_VAE = {"ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2}


def code_dir(arg: str | None) -> Path | None:
    """The checkout named by ``--comfyui`` or ``$SD3PARITY_COMFYUI`` (None when neither is set), checked."""
    return checkout(arg, ENV, "--comfyui", MARKERS, "ComfyUI")


def fingerprint(d: Path) -> dict:
    """ComfyUI's version, the commit when it is a git checkout, and the sha256 of the Python files that can run
    (``comfy/``, ``comfy_extras/``, ``comfy_api/`` and the top level)."""
    files = [*d.glob("*.py"), *(p for sub in ("comfy", "comfy_extras", "comfy_api") for p in (d / sub).rglob("*.py"))]
    out = code_fingerprint(d, files)
    version = d / "comfyui_version.py"
    m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", version.read_text()) if version.is_file() else None
    if m:
        out["version"] = m.group(1)
    return out


# ---------------------------------------------------------------------------------------------- importing

class _Stand_in(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty modules for packages ComfyUI imports at module level outside SD3 and that are not installed."""

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        m = types.ModuleType(spec.name)
        m.__path__ = []

        def missing(attr, name=spec.name):
            raise AttributeError(f"{name}.{attr}: {name} is not installed (an empty stand-in for ComfyUI's imports)")
        m.__getattr__ = missing
        return m

    def exec_module(self, module):
        pass


class Comfy(types.SimpleNamespace):
    """The imported checkout: ``sd``, ``quant`` (``comfy.quant_ops``, None before it existed), ``nodes``, ``samplers``, ``k_sampling``, ``nodes_sd3``, ``advanced``,
    ``sd3_clip``, ``long_clip``, ``folder_paths``, its ``path`` and the torch ``state`` it chose."""


_LOADED: dict = {}  # (path, gpu, attention) -> Comfy (one import per process; another one replaces it)


def _purge() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in PACKAGES:
            del sys.modules[name]


def _torch_state() -> bool:
    return torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()


def _set_torch_state(allowed: bool) -> None:
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(allowed)


def load(d: Path, gpu: bool = False, attention: str | None = "sdpa") -> Comfy:
    """ComfyUI from ``d``, imported once per process (its modules stay loaded; torch state is restored); with
    ``gpu``, without ``--cpu``: its model management then picks the GPU and its dtypes for it. ``attention``:
    ``sdpa`` (``--use-pytorch-cross-attention``), ``sub_quad`` (without it), None: the mode already imported."""
    key = (str(d.resolve()), gpu, attention)
    for k, c in _LOADED.items():
        if k == key or (attention is None and k[:2] == key[:2]):
            return c
    key = key[:2] + (attention or "sdpa",)
    _LOADED.clear()
    _purge()
    base = Path(tempfile.mkdtemp(prefix="sd3parity-comfyui-"))
    import atexit

    atexit.register(shutil.rmtree, base, True)
    stand_in = None
    if any(importlib.util.find_spec(n) is None for n in STUBBED):
        for name in ("transformers.utils.import_utils", "diffusers.utils.import_utils"):  # their availability
            with contextlib.suppress(ImportError):  # checks run on import: before the stand-ins exist
                importlib.import_module(name)
        stand_in = _Stand_in()
        sys.meta_path.insert(0, stand_in)
    saved_argv, saved_state = sys.argv, _torch_state()
    drop = {"--cpu"} if gpu else set()
    if key[2] == "sub_quad":
        drop.add(PYTORCH_ATTENTION)
    sys.argv = ["comfyui", *(a for a in ARGV if a not in drop), "--base-directory", str(base)]
    sys.path.insert(0, key[0])
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        with contextlib.redirect_stdout(io.StringIO()):
            import comfy.k_diffusion.sampling as k_sampling
            import comfy.samplers
            import comfy.sd
            import comfy.text_encoders.long_clipl as long_clip
            import comfy.text_encoders.sd3_clip as sd3_clip
            import folder_paths
            import nodes
            from comfy_extras import nodes_model_advanced, nodes_sd3
    except ModuleNotFoundError as e:
        _purge()
        raise Unsupported(f"--comfyui {d}: importing ComfyUI failed: {e} (pip install -e '.[comfyui]')") from None
    except Exception as e:  # noqa: BLE001 - whatever its import raises
        _purge()
        raise Unsupported(f"--comfyui {d}: ComfyUI does not import: {type(e).__name__} {e}") from None
    finally:
        sys.argv = saved_argv
        sys.path.remove(key[0])
        if stand_in is not None:  # ComfyUI's modules keep the ones they imported; nothing else sees them
            sys.meta_path.remove(stand_in)
            for name in [n for n in sys.modules if n.split(".")[0] in STUBBED]:
                del sys.modules[name]
    for mod in (comfy.sd, nodes):
        if not Path(mod.__file__).resolve().is_relative_to(d.resolve()):
            raise Unsupported(f"--comfyui {d}: {mod.__name__} was imported from {mod.__file__}")
    quant = importlib.import_module("comfy.quant_ops") if (d / "comfy" / "quant_ops.py").is_file() else None
    c = Comfy(sd=comfy.sd, quant=quant, nodes=nodes, samplers=comfy.samplers, k_sampling=k_sampling, nodes_sd3=nodes_sd3,
              advanced=nodes_model_advanced, sd3_clip=sd3_clip, long_clip=long_clip, folder_paths=folder_paths,
              path=d, state=_torch_state())
    _set_torch_state(saved_state)
    _LOADED[key] = c
    return c


@contextlib.contextmanager
def running(c: Comfy):
    """ComfyUI's torch settings while it runs; the caller's after. The global RNG is left as it was."""
    saved = _torch_state()
    _set_torch_state(c.state)
    try:
        with torch.random.fork_rng(devices=[]), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        _set_torch_state(saved)


@contextlib.contextmanager
def patched(owner, name: str, value):
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def node_defaults(node, names: tuple[str, ...]) -> dict:
    """The default values a schema node declares for its inputs ``names``."""
    inputs = {i.id: i for i in node.define_schema().inputs}
    return {n: inputs[n].default for n in names}


def _node(result):
    """A node's outputs, for the classic (tuple) and the schema (``NodeOutput``) node APIs."""
    return result if isinstance(result, tuple) else tuple(result.result)


# ---------------------------------------------------------------------------------------------- text

def _json(path: Path) -> dict:
    from impl.weights import read_config

    return read_config(path)


def text_sizes(c: Comfy, directory: Path) -> tuple[dict, list[str]]:
    """Model options giving ComfyUI's encoder configs the model's sizes where they differ from its own JSON."""
    own = {"clip_l": c.path / "comfy" / "sd1_clip_config.json", "clip_g": c.path / "comfy" / "clip_config_bigg.json",
           "t5xxl": c.path / "comfy" / "text_encoders" / "t5_config_xxl.json"}
    options, notes = {}, []
    for name, sub, keys in (("clip_l", "text_encoder", CLIP_KEYS), ("clip_g", "text_encoder_2", CLIP_KEYS),
                            ("t5xxl", "text_encoder_3", T5_KEYS)):
        theirs, ours = _json(own[name]) if own[name].is_file() else {}, _json(directory / sub / "config.json")
        diff = {k: ours[k] for k in keys if k in ours and ours[k] != theirs.get(k)}
        if diff:
            options[f"{name}_model_config"] = diff
            notes.append(f"ComfyUI {name}: not the released size; its config gets {diff} from "
                         f"{directory / sub / 'config.json'}")
    return options, notes


T5_XXL_VOCAB = 32128  # T5-XXL's embedding rows (32000 sentencepiece pieces and 100 sentinels, padded)


@contextlib.contextmanager
def model_t5_tokenizer(c: Comfy, directory: Path):
    """While ComfyUI builds its tokenizers: a model whose T5 vocabulary is not T5-XXL's (the embedded tiny one)
    gets its own ``tokenizer_3`` instead of ComfyUI's bundled T5 tokenizer, which would index past its table.
    Yields whether it did."""
    from impl.t5_tokenizer import SentencePieceModel

    cfg = directory / "text_encoder_3" / "config.json"
    if cfg.is_file():
        local = _json(cfg).get("vocab_size") != T5_XXL_VOCAB
    else:
        local = len(SentencePieceModel.load(directory / "tokenizer_3" / "spiece.model").pieces) != 32000
    if not local:
        yield False
        return
    bundled = c.sd3_clip.T5TokenizerFast

    class ModelT5Tokenizer:
        @staticmethod
        def from_pretrained(_path, *a, **k):
            return bundled.from_pretrained(str(directory / "tokenizer_3"), *a, **k)
    with patched(c.sd3_clip, "T5TokenizerFast", ModelT5Tokenizer):
        yield True


def tokenizer(code: Path, directory: Path):
    """ComfyUI's ``SD3Tokenizer().tokenize_with_weights`` (its CLIP tokenizer files; T5 by ``model_t5_tokenizer``):
    text -> {"l", "g", "t5xxl": chunks of (id, weight)}."""
    c = load(code, attention=None)
    with model_t5_tokenizer(c, directory), running(c):
        return c.sd3_clip.SD3Tokenizer().tokenize_with_weights


def load_text(c: Comfy, text_model, notes: list[str]):
    """ComfyUI's CLIP object for the model's three encoder files (``comfy.sd.load_clip``, ``CLIPType.SD3``), or
    for a single file's ``text_encoders.*`` (``load_checkpoint_guess_config``'s CLIP output, as
    ``CheckpointLoaderSimple`` gives it)."""
    from impl.quant import is_quantized
    from impl.weights import TEXT_WEIGHTS, safetensors_keys, weight_files

    if not text_model.has_t5:
        raise Unsupported("the ComfyUI side loads SD3's three text encoders (a model without T5: not yet)")
    if text_model.single_file is not None:
        return _load_single_file_text(c, text_model, notes)
    paths = []
    for sub in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        files = weight_files(text_model.directory / sub, TEXT_WEIGHTS)
        if len(files) != 1:
            raise Unsupported(f"{text_model.directory / sub}: {len(files)} weight files; ComfyUI loads one file per "
                              "text encoder")
        paths.append(str(files[0]))
        if is_quantized(safetensors_keys(files[0])):
            _refuse_old_scaled_fp8(c, files[0])
    sizes, size_notes = text_sizes(c, text_model.directory)
    options: dict = {}  # ComfyUI picks the text encoders' dtype itself (float16 unless --fp32-text-enc)
    order = iter(("clip_l", "clip_g", "t5xxl"))
    def sized(sd, tokenizer_data, model_options, original=c.long_clip.model_options_long_clip):
        tokenizer_data, model_options = original(sd, tokenizer_data, model_options)
        return tokenizer_data, {**model_options, **{k: {**model_options.get(k, {}), **v} for k, v in sizes.items()}}

    with contextlib.ExitStack() as es:
        if sizes:
            es.enter_context(patched(c.long_clip, "model_options_long_clip", sized))
            es.enter_context(patched(c.sd3_clip.SD3ClipModel, "load_sd",
                                     lambda self, sd: getattr(self, next(order)).load_sd(sd)))
            if hasattr(c.sd, "t5xxl_detect"):  # it finds T5-XXL by a 24th block; the T5 file is the third
                es.enter_context(patched(c.sd, "t5xxl_detect", lambda data: c.sd3_clip.t5_xxl_detect(data[2])))
        local_t5 = es.enter_context(model_t5_tokenizer(c, text_model.directory))
        with running(c), contextlib.redirect_stdout(io.StringIO()):
            clip = c.sd.load_clip(ckpt_paths=paths, clip_type=c.sd.CLIPType.SD3, model_options=options)
    notes += size_notes
    if sizes:
        notes.append("ComfyUI SD3ClipModel.load_sd: the files given in the order CLIP-L, CLIP-G, T5 (it tells CLIP-G "
                     "by a 31st layer); comfy.sd.t5xxl_detect reads the third (it finds T5-XXL by a 24th block)")
    if local_t5:
        notes.append(f"ComfyUI T5 tokenizer: {text_model.directory / 'tokenizer_3'} (not T5-XXL's vocabulary: "
                     "ComfyUI's bundled one does not fit it)")
    _check_text_loaded(clip, {name: (path, set(safetensors_keys(Path(path))))
                              for name, path in zip(("clip_l", "clip_g", "t5xxl"), paths)})
    return clip


def _load_single_file_text(c: Comfy, text_model, notes: list[str]):
    from impl.weights import safetensors_keys

    path = text_model.single_file
    if any(k.startswith("text_encoders.") and k.endswith(".scaled_fp8") for k in safetensors_keys(path)):
        _refuse_old_scaled_fp8(c, path)
    sizes, size_notes = text_sizes(c, text_model.directory)
    with contextlib.ExitStack() as es:
        local_t5 = es.enter_context(model_t5_tokenizer(c, text_model.directory))
        with running(c), contextlib.redirect_stdout(io.StringIO()):
            clip = c.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=True, output_model=False,
                                                     output_clipvision=False, te_model_options=sizes)[1]
    if clip is None:
        raise Unsupported(f"{path}: ComfyUI found no text encoders in it")
    notes += size_notes
    if local_t5:
        notes.append(f"ComfyUI T5 tokenizer: {text_model.directory / 'tokenizer_3'} (not T5-XXL's vocabulary: "
                     "ComfyUI's bundled one does not fit it)")
    keys = safetensors_keys(path)
    _check_text_loaded(clip, {name: (f"{path} (text_encoders.{name}.*)",
                                     {k.removeprefix(f"text_encoders.{name}.transformer.") for k in keys
                                      if k.startswith(f"text_encoders.{name}.transformer.")})
                              for name in ("clip_l", "clip_g", "t5xxl")})
    return clip


def _check_text_loaded(clip, files: dict[str, tuple[str, set]]) -> None:
    """Every parameter of ComfyUI's encoders came from the files (``load_sd`` is not strict): compared by name.
    ``files``: encoder -> (where, the parameter names stored there)."""
    model = clip.cond_stage_model
    for name, (where, keys) in files.items():
        if getattr(model, name, None) is None:
            raise Unsupported(f"{where}: ComfyUI built no {name} from it")
        params = {n for n, _ in getattr(model, name).transformer.named_parameters()}
        missing = sorted(params - keys - ({"encoder.embed_tokens.weight"} if name == "t5xxl" else set()))
        if name == "t5xxl" and "shared.weight" in missing and "encoder.embed_tokens.weight" in keys:
            missing.remove("shared.weight")
        if missing:
            raise Unsupported(f"{where}: ComfyUI's {name} has parameters the file does not fill: {missing[:6]}")


def encoders(clip) -> dict:
    m = clip.cond_stage_model
    return {"clip-l": m.clip_l.transformer, "clip-g": m.clip_g.transformer, "t5": m.t5xxl.transformer}


def encode(c: Comfy, clip, prompt, width: int, padding: str = "empty_prompt", notes: list[str] | None = None):
    """The ``CLIPTextEncode`` node on one text, or ``CLIPTextEncodeSD3`` on CLIP-L's, CLIP-G's and T5's texts with
    this ``empty_padding``: its conditioning and that conditioning's (context, pooled). Without CLIP rows (empty
    texts, no padding) its zero pooled vector is 2048 wide whatever the encoders (``torch.zeros((1, 768 + 1280))``
    in ``sd3_clip.py``): for encoders of another width (the embedded ones) it is cut to theirs, zeros either way,
    and the notes say so."""
    with running(c), joint_width(width):
        if isinstance(prompt, str):
            cond = _node(c.nodes.CLIPTextEncode().encode(clip, prompt))[0]
        else:
            cond = _node(c.nodes_sd3.CLIPTextEncodeSD3.execute(clip, *prompt, padding))[0]
    pooled = cond[0][1]["pooled_output"]
    own = sum(m.get_input_embeddings().weight.shape[1] for k, m in encoders(clip).items() if k != "t5")
    if pooled.shape[-1] != own:
        if pooled.any():
            raise Unsupported(f"ComfyUI's pooled vector is {pooled.shape[-1]} wide and not zeros; its CLIP "
                              f"encoders' is {own} wide")
        cond = [[t, {**d, "pooled_output": d["pooled_output"][..., :own]}] for t, d in cond]
        if notes is not None:
            notes.append(f"ComfyUI {prompt!r}: no CLIP rows; its zero pooled vector ({pooled.shape[-1]} wide, the "
                         f"released encoders') cut to its encoders' {own}")
    return cond, (cond[0][0], cond[0][1]["pooled_output"])


# ---------------------------------------------------------------------------------------------- image

def _vae_dims(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        from parity.sides.sai import _vae_dims as dims

        d = dims(f, "first_stage_model.")
    return {"ch": d["ch"], "ch_mult": list(d["ch_mult"]), "num_res_blocks": d["num_res_blocks"]}


def load_image(c: Comfy, path: Path, dtype: torch.dtype, notes: list[str]):
    """(ModelPatcher, VAE) from the single file by ``load_checkpoint_guess_config``."""
    dims = _vae_dims(path)
    engine = c.sd.AutoencodingEngine

    def sized(*a, encoder_config, decoder_config, **k):
        for cfg in (encoder_config, decoder_config):
            cfg["params"] = {**cfg["params"], **dims}
        return engine(*a, encoder_config=encoder_config, decoder_config=decoder_config, **k)

    with contextlib.ExitStack() as es:
        if dims != RELEASED_VAE:
            es.enter_context(patched(c.sd, "AutoencodingEngine", sized))
            notes.append(f"ComfyUI VAE: not the released size; its encoder/decoder configuration gets {dims} from "
                         f"{path.name}'s shapes")
        with running(c), contextlib.redirect_stdout(io.StringIO()):
            out = c.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=False,
                                                    output_clipvision=False, model_options={"dtype": dtype})
    model, vae = out[0], out[2]
    if model is None or vae is None or vae.first_stage_model is None:
        raise Unsupported(f"{path}: ComfyUI did not detect an SD3 model and VAE in it")
    if type(model.model).__name__ != "SD3":
        raise Unsupported(f"{path}: ComfyUI detects it as {type(model.model).__name__}, not SD3")
    return model, vae


class ComfySide:
    name = "comfyui"
    covers = None

    def __init__(self, code: Path | None):
        if code is None:
            raise UsageError(f"the comfyui profile's reference is ComfyUI's own code: point --comfyui or ${ENV} at a "
                             "local checkout")
        self.code = code
        self._text = None  # (CLIP object, T5 width), loaded once
        self._conditioning: dict[str, list] = {}  # prompt -> the CLIPTextEncode conditioning

    def _load(self, run) -> Comfy:
        mode = run.spec.comfyui_attention
        note = ("ComfyUI imported without --use-pytorch-cross-attention: its CPU default attention (sub-quadratic in "
                "the MMDiT, matrix products in CLIP, T5 and the VAE)" if mode == "sub_quad" else
                "ComfyUI imported with --use-pytorch-cross-attention (SDPA)")
        if note not in run.notes:
            run.notes.append(note)
        return load(self.code, attention=mode)

    def key(self, run) -> tuple:
        s = run.spec
        return (str(self.code), s.model, s.checkpoint, s.config, s.prompts, s.dtype, s.threads, s.families, s.steps,
                s.guidance, s.seed, s.height, s.width, s.shift, s.image, s.strength, s.slg, s.text_only,
                s.negative_zero, s.empty_padding, s.comfyui_attention, self.sampler(run))

    def sources(self, run) -> dict:
        return {"files": run.sources(single_files=True), "comfyui": fingerprint(self.code)}

    @staticmethod
    def sampler(run) -> tuple[str, str]:
        """ComfyUI's sampler and scheduler names for the run's flags."""
        v = run.values
        if v["sampler"] not in SAMPLERS:
            raise UsageError(f"--flag sampler={v['sampler']}: ComfyUI's side runs sai_euler (euler) or sai_dpmpp_2m "
                             "(dpmpp_2m)")
        if v["schedule"] not in SCHEDULERS:
            raise UsageError(f"--flag schedule={v['schedule']}: ComfyUI's side runs sai (normal), sgm_uniform or simple")
        return SAMPLERS[v["sampler"]], SCHEDULERS[v["schedule"]]

    def _clip(self, c: Comfy, run):
        if self._text is None:
            clip = load_text(c, run.text_model, run.notes)
            width = encoders(clip)["t5"].get_input_embeddings().weight.shape[1]
            self._text = clip, width
        return self._text

    def text(self, run) -> R.Side:
        c = self._load(run)
        clip, width = self._clip(c, run)
        mods = encoders(clip)
        points = {}
        for comp, model in mods.items():
            layers = model.num_layers
            rows = N.t5_rows(layers) if comp == "t5" else N.clip_rows(layers)
            points[comp] = N.points(rows, "comfyui")
            N.check_coverage(points[comp], model, (N.T5_SKIP if comp == "t5" else N.CLIP_SKIP)["comfyui"],
                             f"{comp} (ComfyUI)")

        def run_encode(prompt):
            cond, out = encode(c, clip, prompt, width, run.spec.empty_padding, run.notes)
            self._conditioning[prompt] = cond
            return out
        ids_at = {comp: m.get_input_embeddings() for comp, m in mods.items()}
        states = {comp: _model_state(c, m, torch.float32) for comp, m in mods.items()}  # the CPU computes in float32
        return text_side(run.text_model.label, run.spec.prompts, mods, points, run_encode, "input", run.dtype,
                         ids_at=ids_at, states=states)

    def image(self, run, model, init) -> R.Side:
        s = run.spec
        if model.single_file is None:
            raise Unsupported(f"{model.label}: the ComfyUI side loads an SAI single file (--checkpoint or an embedded "
                              "family)")
        sampler, scheduler = self.sampler(run)
        c = self._load(run)
        if model.quantized:
            _refuse_old_scaled_fp8(c, model.single_file)
        clip, width = self._clip(c, run)
        for p in (s.prompts[0], ""):
            if p not in self._conditioning:
                self._conditioning[p] = encode(c, clip, p, width, s.empty_padding, run.notes)[0]
        patcher, vae = load_image(c, model.single_file, run.dtype, run.notes)
        if s.shift is not None:  # ComfyUI's own shift (its SD3 model config) unless the run names one
            patcher = _node(c.advanced.ModelSamplingSD3().patch(patcher, s.shift))[0]
        if s.slg:  # the SkipLayerGuidanceSD3 node with its own defaults, on the run's layers
            defaults = node_defaults(c.nodes_sd3.SkipLayerGuidanceSD3, ("scale", "start_percent", "end_percent"))
            patcher = _node(c.nodes_sd3.SkipLayerGuidanceSD3.execute(patcher, ", ".join(map(str, s.slg)), **defaults))[0]
            run.notes.append(f"ComfyUI SkipLayerGuidanceSD3: layers {list(s.slg)}, its defaults {defaults}")
        net, first_stage = patcher.model.diffusion_model, vae.first_stage_model
        cap = ImageCapture(model.label, "comfyui", model.mmdit, model.vae, init is not None)
        compute = patcher.model.manual_cast_dtype or patcher.model.get_dtype()
        cap.weights(_model_state(c, net, compute), _vae_state(first_stage), run.dtype)
        out = Path(c.folder_paths.get_output_directory())
        prefix = f"sd3parity-{os.getpid()}-{id(cap)}"
        schedules: list[int] = []  # the step counts ComfyUI computes schedules for (img2img: int(N / denoise))
        with contextlib.ExitStack() as es:
            es.enter_context(running(c))
            es.enter_context(self._steps(c, cap, schedules))
            cap.attach(es, net, first_stage, lambda a, k: (a[0], a[1], k["context"], k["y"]),
                       f"{model.label} mmdit (ComfyUI)", N.MMDIT_SKIP["comfyui"])
            if init is None:
                latent = _node(c.nodes_sd3.EmptySD3LatentImage.execute(width=s.width, height=s.height,
                                                                       batch_size=1))[0]
            else:  # LoadImage from ComfyUI's input folder, then VAEEncode
                folder = Path(c.folder_paths.get_input_directory())
                folder.mkdir(parents=True, exist_ok=True)
                name = f"{prefix}{Path(s.image).suffix}"
                shutil.copyfile(s.image, folder / name)
                try:
                    pixels = _node(c.nodes.LoadImage().load_image(name))[0]
                finally:
                    (folder / name).unlink(missing_ok=True)
                latent = _node(c.nodes.VAEEncode().encode(vae, pixels))[0]
            negative = self._conditioning[""]
            if s.empty_padding == "none":
                negative = unpadded_negative(c, clip, width, run.notes)
            if s.negative_zero is not None:
                negative = zeroed_negative(c, negative, s.negative_zero, run.notes)
            sampled = _node(c.nodes.KSampler().sample(patcher, s.seed, s.steps, s.guidance, sampler, scheduler,
                                                      self._conditioning[s.prompts[0]], negative,
                                                      latent, denoise=1.0 if init is None else s.strength))[0]
            decoded = _node(c.nodes.VAEDecode().decode(vae, sampled))[0]
            saved = c.nodes.SaveImage().save_images(decoded, filename_prefix=prefix)
        files = [out / (im.get("subfolder") or "") / im["filename"] for im in saved["ui"]["images"]]
        from PIL import Image

        image = np.asarray(Image.open(files[0]).convert("RGB")).copy()
        for f in files:
            f.unlink(missing_ok=True)
        # records numbered by schedule index: the steps run are the last of the schedule ComfyUI computed
        start = schedules[-1] - (len(cap.sigmas[1]) - 1) if init is not None else 0
        return cap.assemble(torch.from_numpy(image), ("uncond", "cond"), start)

    @staticmethod
    @contextlib.contextmanager
    def _steps(c: Comfy, cap: ImageCapture, schedules: list[int]):
        """Per step, from k-diffusion's own callback: the guided x0 (``denoised``) and the latent after the step
        (the next callback's ``x``, or what the sampler returns); the sigmas the sampler is given; the step count
        of each schedule ``KSampler.calculate_sigmas`` computes (into ``schedules``)."""
        ks = c.k_sampling
        calculate = c.samplers.KSampler.calculate_sigmas

        def observed(self, steps, *a, **k):
            schedules.append(steps)
            return calculate(self, steps, *a, **k)

        def wrap(fn):
            @functools.wraps(fn)
            def sample(model, x, sigmas, *a, callback=None, **k):
                cap.schedule(sigmas)

                def seen(d):
                    if cap.steps:
                        cap.steps[-1]["latent"] = (cap.rec.tick(), d["x"].detach().clone())
                    cap.steps.append({"x0": (cap.rec.tick(), d["denoised"].detach().clone())})
                    if callback is not None:
                        callback(d)
                final = fn(model, x, sigmas, *a, callback=seen, **k)
                cap.steps[-1]["latent"] = (cap.rec.tick(), final.detach().clone())
                return final
            return sample
        with contextlib.ExitStack() as es:
            for n in ("sample_euler", "sample_dpmpp_2m"):
                es.enter_context(patched(ks, n, wrap(getattr(ks, n))))
            es.enter_context(patched(c.samplers.KSampler, "calculate_sigmas", observed))
            yield


def unpadded_negative(c: Comfy, clip, width: int, notes: list[str]):
    """The ``CLIPTextEncodeSD3`` node on three empty texts with ``empty_padding="none"`` (``encode``)."""
    notes.append("ComfyUI negative: CLIPTextEncodeSD3 with three empty texts, empty_padding none")
    return encode(c, clip, ("", "", ""), width, "none", notes)[0]


def zeroed_negative(c: Comfy, negative, fraction: float, notes: list[str]):
    """The negative of ComfyUI's older SD3 workflows, from its own nodes: ``ConditioningZeroOut`` of the encoded
    negative; with a fraction > 0, the encoded negative on ``ConditioningSetTimestepRange(0, fraction)`` combined
    (``ConditioningCombine``) with the zeros on ``(fraction, 1)``."""
    zeros = _node(c.nodes.ConditioningZeroOut().zero_out(negative))[0]
    if fraction == 0:
        notes.append("ComfyUI negative: ConditioningZeroOut of the empty prompt")
        return zeros
    ranged = c.nodes.ConditioningSetTimestepRange()
    first = _node(ranged.set_range(negative, 0.0, fraction))[0]
    rest = _node(ranged.set_range(zeros, fraction, 1.0))[0]
    notes.append(f"ComfyUI negative: the empty prompt on ConditioningSetTimestepRange(0, {fraction}), combined with "
                 f"its ConditioningZeroOut on ({fraction}, 1)")
    return _node(c.nodes.ConditioningCombine().combine(first, rest))[0]


QUANT_KEYS = SCALE_KEYS + (".weight_scale_2",)  # the scaled layouts' keys, and nvfp4's second scale
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _model_state(c: Comfy, net, compute: torch.dtype) -> dict:
    """A model's parameters by name; a scaled-fp8 layer's weight as ComfyUI dequantizes it to compute in
    ``compute`` (its ``QuantizedTensor`` cast to that dtype and dequantized, or before ``comfy.quant_ops`` its
    ``scaled_fp8_ops`` layer's ``convert_weight`` of the weight cast to it), its scales and format left out."""
    state = {k: v for k, v in net.state_dict().items() if not k.endswith(QUANT_KEYS)}
    for name, m in net.named_modules():
        weight = getattr(m, "weight", None)
        if c.quant is not None and isinstance(weight, c.quant.QuantizedTensor):
            state[f"{name}.weight"] = weight.to(compute).dequantize()
        elif isinstance(weight, torch.Tensor) and weight.dtype in FP8 and hasattr(m, "scale_weight"):
            state[f"{name}.weight"] = m.convert_weight(weight.to(compute))
    return state


def _refuse_old_scaled_fp8(c: Comfy, path) -> None:
    if c.quant is None:
        version = fingerprint(c.path).get("version", "unknown")
        raise Unsupported(f"{path}: scaled fp8; a ComfyUI from before comfy/quant_ops.py (--comfyui {c.path}, "
                          f"version {version}) computes scaled-fp8 layers with its scaled_fp8_ops: biases stored in "
                          "float8, and the scale applied to the input instead of the weight when the weight is the "
                          "larger; impl reproduces comfy/quant_ops.py's dequantized weights only")


def _vae_state(first_stage) -> dict:
    """The VAE's parameters under impl's (the SAI file's) names: the encoder's and decoder's."""
    return {k: v for k, v in first_stage.state_dict().items() if k.startswith(("encoder.", "decoder."))}
