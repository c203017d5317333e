"""The Stability-AI SD3.5 code as a side: its whole procedure, from a local checkout the user names.

Stability-AI/sd3.5 (``sd3_infer.py``, ``sd3_impls.py``, ``mmditx.py``, ``other_impls.py``) is not a package; the
user points at a checkout (``--sai-code DIR`` or ``$SD3PARITY_SAI_CODE``) and nothing of it is copied here. Its own
code runs every step:

* text: ``other_impls.SD3Tokenizer`` (its word-wise tokenization through transformers' tokenizers), the wrappers
  ``sd3_infer.ClipL`` / ``ClipG`` / ``T5XXL`` (``SDClipModel``, ``SDXLClipG``, ``T5XXLModel`` filled by its
  ``load_into``) and ``SD3Inferencer.get_cond``;
* image: ``sd3_impls.BaseModel`` built from the SAI single file and filled by ``load_into``, the VAE likewise, and
  ``SD3Inferencer.get_empty_latent``, ``do_sampling`` (noise, sigmas, ``fix_cond``, ``CFGDenoiser`` /
  ``SkipLayerCFGDenoiser``, ``sample_euler`` / ``sample_dpmpp_2m``), ``vae_encode`` and ``vae_decode``.

What the harness adapts, all at the boundary, none of it computing:

* ``import sd3_infer`` runs ``fire.Fire(main)`` at module level: a no-op ``fire`` module is in place while it
  imports.
* Tokenizers: ``SD3Tokenizer`` loads ``openai/clip-vit-large-patch14`` and ``google/t5-v1_1-xxl`` from the Hub;
  while it is built, those two names resolve to the model's ``tokenizer/`` and ``tokenizer_3/`` folders.
* Text encoders: the wrappers read ``clip_l.safetensors``, ``clip_g.safetensors``, ``t5xxl.safetensors`` from a
  models folder. The harness gives them a folder whose files are links to the model's ``text_encoder*/`` weights
  (or, for a sharded folder or a single file's ``text_encoders.*``, the same tensors written under the names the
  code reads; the report says so). Their configs are the code's own constants for the released sizes; for other
  sizes the five keys the code reads come from the model's ``config.json``.
* ``get_cond`` pads the CLIP features to a literal 4096, T5-XXL's width. For a T5 of another width (the embedded
  tiny one), ``torch.nn.functional.pad`` pads to that width instead while ``get_cond`` runs (``joint_width``).
* dtype: ``sd3_infer`` builds the MMDiT in float16 on CUDA; the harness calls the same ``BaseModel`` /
  ``load_into`` on the CPU in the run's dtype (the latent and ``fix_cond`` stay float16, as in the reference).
* VAE size: ``SDVAE()`` hard-codes the released VAE; other dimensions (read from the file's shapes) get
  ``VAEEncoder`` / ``VAEDecoder`` of those dimensions inside an ``SDVAE`` instance, so ``encode`` / ``decode`` run.
* Without CUDA: ``.cuda()`` returns the tensor or module unchanged, and the functions decorated with
  ``@torch.autocast("cuda", dtype=torch.float16)`` (its samplers, ``SDVAE.encode`` / ``decode``) run under
  ``impl.autocast.CudaAutocastFp16``, the same per-op dtype policy (QUIRKS N2, V2), with CPU kernels.
* Parameters get fresh storage after ``load_into`` (``determinism.own_storage``): ``get_tensor``'s storage follows
  the file's alignment, and single-row GEMMs round differently by alignment on CPU.
* The img2img posterior is ``randn_like`` on the unseeded global generator: the harness seeds it with seed + 1
  right before ``vae_encode`` (impl draws the same).
* Streamed (``--stream``): T5 and the MMDiT are built by the code's own constructors with their parameters on the
  meta device (``T5XXL`` while its ``load_into`` does nothing), and a ``parity.stream.Pager`` fills them from the
  files by the names ``load_into`` reads, cast to the dtype it casts to (T5 float32, the MMDiT the run's dtype),
  each ``encoder.block.N`` / ``joint_blocks.N`` for the length of its call; T5's ``encoder.embed_tokens.weight``
  comes from ``shared.weight`` where the file holds only that. ``t5xxl.safetensors`` in the models folder is then a
  link to T5's file, which the wrapper only opens. ``Module.cpu()`` is the identity (the sampler moves the model
  back to the CPU it is on). The CLIP encoders and the VAE load whole, as without streaming.

Checkouts differ in their API (``get_empty_latent``, ``do_sampling``'s parameters, MMDiT-X, skip-layer guidance):
``check_api`` compares the checkout with what the harness calls and names any difference (``run.Unsupported``).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import io
import re
import sys
import tempfile
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from impl.weights import safetensors_keys
from parity import naming as N
from parity import records as R
from parity.determinism import own_storage
from parity.run import Unsupported, UsageError
from parity.sides import ImageCapture, checkout, code_fingerprint, text_side

ENV = "SD3PARITY_SAI_CODE"
FILES = ("sd3_infer.py", "sd3_impls.py", "mmditx.py", "other_impls.py")
MODULES = ("sd3_infer", "sd3_impls", "mmditx", "other_impls", "dit_embedder")
HUB_TOKENIZERS = {"openai/clip-vit-large-patch14": "tokenizer", "google/t5-v1_1-xxl": "tokenizer_3"}
TEXT_FILES = (("clip-l", "clip_l", "text_encoder", "ClipL", "CLIPL_CONFIG"),
              ("clip-g", "clip_g", "text_encoder_2", "ClipG", "CLIPG_CONFIG"),
              ("t5", "t5xxl", "text_encoder_3", "T5XXL", "T5_CONFIG"))
CONFIG_KEYS = {"clip": ("hidden_act", "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers"),
               "t5": ("d_ff", "d_model", "num_heads", "num_layers", "vocab_size")}
# keys of a text encoder file the code's modules have no place for, each with the reason it is harmless
SKIPPED_TEXT_KEYS = {r"text_model\.embeddings\.position_ids": "an arange buffer older transformers saved",
                     r"shared\.weight": "T5's tied input embedding; the code reads encoder.embed_tokens.weight",
                     r"logit_scale": "CLIP's contrastive temperature, unused by SD3"}


def code_dir(arg: str | None) -> Path | None:
    """The checkout named by ``--sai-code`` or ``$SD3PARITY_SAI_CODE`` (None when neither is set), checked."""
    return checkout(arg, ENV, "--sai-code", FILES, "Stability-AI/sd3.5")


def fingerprint(d: Path) -> dict:
    """The checkout's commit when it is a git checkout, and always the sha256 of its Python files."""
    return code_fingerprint(d, d.glob("*.py"))


@dataclass
class Reference:
    infer: Any  # sd3_infer
    impls: Any  # sd3_impls
    other: Any  # other_impls
    path: Path


@contextlib.contextmanager
def imported(d: Path):
    """Import the reference modules from ``d`` (and only from there), then restore ``sys.path``/``sys.modules``."""
    saved = {n: sys.modules.pop(n) for n in (*MODULES, "fire") if n in sys.modules}
    sys.path.insert(0, str(d))
    sys.modules["fire"] = types.SimpleNamespace(Fire=lambda *a, **k: None)  # sd3_infer ends with fire.Fire(main)
    try:
        try:
            with warnings.catch_warnings():  # its @torch.autocast("cuda") decorators warn without CUDA
                warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
                import other_impls
                import sd3_impls
                import sd3_infer
        except ModuleNotFoundError as e:
            raise Unsupported(f"--sai-code {d}: importing the reference failed: {e} (it needs einops, pillow, tqdm, "
                              "transformers: pip install -e '.[sai]')") from None
        except ImportError as e:
            raise Unsupported(f"--sai-code {d}: the checkout's modules do not import: {e}") from None
        for mod in (sd3_infer, sd3_impls, other_impls):
            if Path(mod.__file__).resolve().parent != d.resolve():
                raise Unsupported(f"--sai-code {d}: {mod.__name__} was imported from {mod.__file__}")
        yield Reference(sd3_infer, sd3_impls, other_impls, d)
    finally:
        sys.path.remove(str(d))
        for n in (*MODULES, "fire"):
            sys.modules.pop(n, None)
        sys.modules.update(saved)


# what the harness calls, by module: names, and for functions the parameters it passes
REQUIRED = {
    "infer": ("SD3Inferencer", "load_into", "ClipL", "ClipG", "T5XXL", "CLIPL_CONFIG", "CLIPG_CONFIG", "T5_CONFIG"),
    "impls": ("BaseModel", "SDVAE", "VAEEncoder", "VAEDecoder", "CFGDenoiser", "SD3LatentFormat", "sample_euler",
              "sample_dpmpp_2m"),
    "other": ("SD3Tokenizer", "CLIPTokenizer", "T5TokenizerFast"),
}
KNOWN_ARGS = {
    "get_empty_latent": {"batch_size", "width", "height", "seed", "device"},
    "do_sampling": {"latent", "seed", "conditioning", "neg_cond", "steps", "cfg_scale", "sampler", "denoise",
                    "skip_layer_config", "controlnet_cond"},
    "BaseModel": {"shift", "device", "dtype", "file", "prefix", "control_model_ckpt", "verbose"},
    "ClipL": {"model_folder", "device", "dtype"}, "ClipG": {"model_folder", "device", "dtype"},
    "T5XXL": {"model_folder", "device", "dtype"},
}
NEEDED_ARGS = {"do_sampling": {"latent", "seed", "conditioning", "neg_cond", "steps", "cfg_scale", "sampler", "denoise"},
               "BaseModel": {"shift", "device", "dtype", "file", "prefix"}}


def check_api(ref: Reference, slg: bool, dual: bool) -> None:
    """The checkout against what the harness calls; a difference is named (function and parameter)."""
    where = ref.path
    for mod, names in REQUIRED.items():
        for name in names:
            if not hasattr(getattr(ref, mod), name):
                raise Unsupported(f"--sai-code {where}: {getattr(ref, mod).__name__}.{name} is missing")
    inf = ref.infer.SD3Inferencer
    for method in ("get_cond", "get_empty_latent", "do_sampling", "vae_encode", "vae_decode"):
        if not callable(getattr(inf, method, None)):
            raise Unsupported(f"--sai-code {where}: SD3Inferencer.{method} is missing")
    for name, fn in (("get_empty_latent", inf.get_empty_latent), ("do_sampling", inf.do_sampling),
                     ("BaseModel", ref.impls.BaseModel.__init__), ("ClipL", ref.infer.ClipL.__init__),
                     ("ClipG", ref.infer.ClipG.__init__), ("T5XXL", ref.infer.T5XXL.__init__)):
        params = {p.name: p for p in inspect.signature(fn).parameters.values() if p.name != "self"}
        unknown = [n for n, p in params.items() if n not in KNOWN_ARGS[name] and p.default is inspect.Parameter.empty
                   and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        missing = sorted(NEEDED_ARGS.get(name, set()) - set(params))
        if unknown or missing:
            raise Unsupported(f"--sai-code {where}: {name}({', '.join(params)}) differs from the supported API: "
                              + ", ".join([f"required parameter {n!r} unknown to the harness" for n in unknown]
                                          + [f"no parameter {n!r}" for n in missing]))
    if slg:
        if not hasattr(ref.impls, "SkipLayerCFGDenoiser"):
            raise Unsupported(f"--sai-code {where}: sd3_impls.SkipLayerCFGDenoiser is missing: this checkout "
                              "predates skip-layer guidance (--slg)")
        if "skip_layer_config" not in inspect.signature(inf.do_sampling).parameters:
            raise Unsupported(f"--sai-code {where}: SD3Inferencer.do_sampling has no skip_layer_config parameter: "
                              "this checkout predates skip-layer guidance (--slg)")
    if dual and "x_block_self_attn_layers" not in inspect.signature(ref.impls.BaseModel.__init__).parameters \
            and "x_block_self_attn_layers" not in inspect.getsource(ref.impls.BaseModel.__init__):
        raise Unsupported(f"--sai-code {where}: sd3_impls.BaseModel builds no MMDiT-X (x_block_self_attn_layers): "
                          "this checkout predates SD3.5-Medium")


@contextlib.contextmanager
def refusing(ref: Reference, what: str):
    """An error raised inside the reference's own code while it loads the model (an ``assert`` on a size it does
    not support, a shape it cannot hold) becomes ``Unsupported``, naming the file and line of the code."""
    try:
        yield
    except (Unsupported, UsageError):
        raise
    except Exception as e:  # noqa: BLE001 - whatever the reference raises
        import traceback

        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if Path(f.filename).resolve().parent == ref.path.resolve()]
        at = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} ({frames[-1].line})" if frames else ""
        raise Unsupported(f"the SD3.5 code refused {what}{at}: {type(e).__name__} {e}".rstrip()) from None


def call(fn, **known):
    """Call a reference function with the arguments its signature names (every one it requires is known:
    ``check_api``)."""
    params = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in known.items() if k in params})


@contextlib.contextmanager
def on_this_machine():
    """No CUDA: ``.cuda()`` is the identity and the reference's ``autocast("cuda")`` warning is silenced."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.Tensor.cuda, torch.nn.Module.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
            yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = saved


@contextlib.contextmanager
def modules_stay():
    """Streamed, on a machine without CUDA: ``Module.cpu()`` is the identity too (every module is on the CPU
    already; the sampler's ``self.sd3.model.cpu()`` would copy a paged model's meta parameters)."""
    if torch.cuda.is_available():
        raise Unsupported("a streamed SD3.5-code side runs on machines without CUDA only (its sampler moves the whole "
                          "model to the GPU)")
    saved, torch.nn.Module.cpu = torch.nn.Module.cpu, lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.nn.Module.cpu = saved


@contextlib.contextmanager
def cuda_autocast(ref: Reference):
    """Without CUDA, run what the reference decorates with ``@torch.autocast("cuda", dtype=torch.float16)``
    (``sample_euler``, ``sample_dpmpp_2m``, ``SDVAE.encode``, ``SDVAE.decode``) under ``impl.autocast``'s
    emulation of that policy, since torch turns the decorators off. With CUDA nothing is patched."""
    if torch.cuda.is_available():
        yield
        return
    from impl.autocast import CudaAutocastFp16

    def emulated(fn):
        @functools.wraps(fn)
        def run(*a, **k):
            with CudaAutocastFp16():
                return fn(*a, **k)
        return run
    impls = ref.impls
    saved = [(impls, n, getattr(impls, n)) for n in ("sample_euler", "sample_dpmpp_2m")]
    saved += [(impls.SDVAE, n, getattr(impls.SDVAE, n)) for n in ("encode", "decode")]
    for owner, n, fn in saved:
        setattr(owner, n, emulated(fn))
    try:
        yield
    finally:
        for owner, n, fn in saved:
            setattr(owner, n, fn)


@contextlib.contextmanager
def joint_width(width: int):
    """``get_cond``'s ``F.pad(lg_out, (0, 4096 - lg_out.shape[-1]))`` pads to ``width`` instead of 4096 (nothing
    changes for T5-XXL)."""
    if width == 4096:
        yield
        return
    pad = torch.nn.functional.pad

    def padded(x, amount, *a, **k):
        if tuple(amount) == (0, 4096 - x.shape[-1]):
            amount = (0, width - x.shape[-1])
        return pad(x, amount, *a, **k)
    torch.nn.functional.pad = padded
    try:
        yield
    finally:
        torch.nn.functional.pad = pad


def get_cond(inferencer, prompt: str):
    """The reference's ``get_cond`` (``joint_width`` for a T5 narrower than T5-XXL)."""
    with joint_width(inferencer.t5xxl.model.transformer.encoder.embed_tokens.embedding_dim):
        return inferencer.get_cond(prompt)


# ---------------------------------------------------------------------------------------------- loading

def load_into(ref: Reference, f, module, prefix: str, dtype, skippable: dict, source: str) -> None:
    """The reference's ``load_into``, then checks it does not make itself: every parameter and buffer filled from
    the file with the shape the module was built with, and every key under ``prefix`` used (or known harmless)."""
    names = [n for n, _ in (*module.named_parameters(), *module.named_buffers())]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ref.infer.load_into(f, module, prefix, "cpu", dtype)
    own_storage(module)
    check_loaded(names, {k[len(prefix):] for k in f.keys() if k.startswith(prefix)}, out.getvalue(), skippable,
                 ("model_sampling.sigmas",), f"{source}: the SD3.5 code's modules do not match the file")


def check_loaded(names: list[str], keys: set[str], log: str, skippable: dict, exempt: tuple, what: str) -> None:
    """After ``load_into``: every parameter filled (``exempt``: those the code sets itself), none re-shaped (it
    prints a warning and loads anyway), and every key of the file used or known harmless (``skippable``)."""
    shapes = [line for line in log.splitlines() if "shape mismatch" in line]
    unfilled = sorted(n for n in names if n not in keys and n not in exempt)
    unused = sorted(k for k in keys if k not in names and not any(re.fullmatch(p, k) for p in skippable))
    if shapes or unfilled or unused:
        raise Unsupported(f"{what}: " + "; ".join(x for x in (f"mis-shaped {shapes[:3]}" if shapes else "",
                                                              f"not filled {unfilled[:6]}" if unfilled else "",
                                                              f"no module for {unused[:6]}" if unused else "") if x))


def _vae_dims(f, prefix: str) -> dict:
    """ch, ch_mult, num_res_blocks of the file's VAE, from its shapes (the code's VAE classes take them)."""
    keys = list(f.keys())
    ch = f.get_slice(f"{prefix}encoder.conv_in.weight").get_shape()[0]
    levels = sorted({int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"encoder\.down\.(\d+)\.", k))})
    blocks = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"encoder\.down\.0\.block\.(\d+)\.", k))}
    mult = tuple(f.get_slice(f"{prefix}encoder.down.{i}.block.0.conv1.weight").get_shape()[0] // ch for i in levels)
    return {"ch": ch, "ch_mult": mult, "num_res_blocks": len(blocks)}


def build_vae(ref: Reference, dims: dict, dtype: torch.dtype):
    """``SDVAE`` for the released dimensions; otherwise an ``SDVAE`` holding encoder/decoder of ``dims``."""
    if dims == {"ch": 128, "ch_mult": (1, 2, 4, 4), "num_res_blocks": 2}:
        return ref.impls.SDVAE(dtype=dtype, device="cpu").eval()
    vae = ref.impls.SDVAE.__new__(ref.impls.SDVAE)
    torch.nn.Module.__init__(vae)
    vae.encoder = ref.impls.VAEEncoder(**dims, dtype=dtype, device="cpu")
    vae.decoder = ref.impls.VAEDecoder(**dims, dtype=dtype, device="cpu")
    return vae.eval()


def check_transformer_config(config_dir: Path | None, depth: int) -> None:
    """The code builds ``depth`` heads of 64 (``MMDiTX``: hidden = 64 * depth, num_heads = depth); a model whose
    ``transformer/config.json`` says otherwise would load and compute something else."""
    path = None if config_dir is None else config_dir / "transformer" / "config.json"
    if path is None or not path.is_file():
        return
    from impl.weights import read_config

    cfg = read_config(path)
    heads, dim = cfg.get("num_attention_heads"), cfg.get("attention_head_dim")
    if (heads, dim) != (depth, 64):
        raise Unsupported(f"{path}: {heads} heads of {dim}, but the SD3.5 code runs depth = {depth} heads of 64 "
                          "(MMDiTX: hidden = 64 * depth)")


def check_vae_config(config_dir: Path | None) -> None:
    """What the code's VAE fixes (32 norm groups, eps 1e-6, ``SD3LatentFormat``'s scale and shift) against the
    model's ``vae/config.json`` when there is one: another value would load and compute something else."""
    path = None if config_dir is None else config_dir / "vae" / "config.json"
    if path is None or not path.is_file():
        return
    from impl.weights import read_config

    cfg = read_config(path)
    for k, fixed in (("norm_num_groups", 32), ("scaling_factor", 1.5305), ("shift_factor", 0.0609)):
        if cfg.get(k, fixed) != fixed:
            raise Unsupported(f"{path}: {k} {cfg[k]!r}, but the SD3.5 code fixes {fixed}")


def load_image_models(ref: Reference, path: Path, dtype: torch.dtype, shift: float, pagers: dict | None = None):
    """(BaseModel, SDVAE) from the SAI single file, as ``sd3_infer.SD3`` / ``VAE`` build them (in ``dtype``). With
    ``pagers``, the MMDiT streamed (``streamed_mmdit``, its pager in ``pagers["mmdit"]``); the VAE loads whole."""
    from safetensors import safe_open

    from parity.stream import meta_parameters

    with safe_open(path, framework="pt", device="cpu") as f:
        keys = list(f.keys())
        depth = f.get_slice("model.diffusion_model.x_embedder.proj.weight").get_shape()[0] // 64
        blocks = {int(m.group(1)) for k in keys if (m := re.match(r"model\.diffusion_model\.joint_blocks\.(\d+)\.", k))}
        if len(blocks) != depth:
            raise Unsupported(f"{path}: the SD3.5 code builds hidden = 64 * depth (BaseModel: depth = hidden / 64 = "
                              f"{depth}), but the file has {len(blocks)} joint blocks: heads of 64 are the only "
                              "shape it runs")
        with meta_parameters() if pagers is not None else contextlib.nullcontext():
            model = call(ref.impls.BaseModel, shift=shift, file=f, prefix="model.diffusion_model.", device="cpu",
                         dtype=dtype).eval()
        if pagers is not None:
            pagers["mmdit"] = streamed_mmdit(model, path, keys, dtype)
        else:
            load_into(ref, f, model, "model.", dtype, {}, f"{path} (model.*)")
        vae = build_vae(ref, _vae_dims(f, "first_stage_model."), dtype)
        load_into(ref, f, vae, "first_stage_model.", dtype, {}, f"{path} (first_stage_model.*)")
    return model, vae


def streamed_mmdit(model, path: Path, keys: list[str], dtype: torch.dtype):
    """A ``parity.stream.Pager`` giving ``model.diffusion_model`` (built on the meta device) the file's
    ``model.diffusion_model.*`` tensors, each ``joint_blocks.N`` for the length of its call, in ``dtype`` as the
    code's ``load_into`` casts them (int32 tensors as stored)."""
    from parity.stream import Pager, Weights

    prefix = "model.diffusion_model."
    other = [k for k in keys if k.startswith("model.") and not k.startswith(prefix)]
    if other:
        raise Unsupported(f"{path}: the SD3.5 code's modules do not match the file: no module for {other[:6]}")
    w = Weights([path])
    shapes = w.shapes(prefix)
    m = model.diffusion_model
    with not_matching(f"{path}: the SD3.5 code's MMDiT does not match the file"):
        return Pager(m, [f"joint_blocks.{i}" for i in range(len(m.joint_blocks))], lambda k: w.get(prefix + k),
                     shapes, lambda k, t: torch.int32 if w.dtype(prefix + k) == torch.int32 else dtype,
                     f"{path} ({prefix}*)")


@contextlib.contextmanager
def not_matching(what: str):
    """A pager's refusal of the files (a missing, misshapen or unused tensor, named) as ``Unsupported``, as
    ``check_loaded`` refuses them for a model loaded whole."""
    try:
        yield
    except (KeyError, ValueError) as e:
        raise Unsupported(f"{what}: {e.args[0] if e.args else e}") from None


def _impl_t5_name(name: str) -> str:
    """impl's name of a parameter of the code's T5 (impl holds the input embedding as ``shared.weight``)."""
    return "shared.weight" if name == "encoder.embed_tokens.weight" else name


def _released(config: dict, constant: dict) -> bool:
    return all(config.get(k) == v for k, v in constant.items())


def text_folder(text_model, tmp: Path, notes: list[str], streamed: bool = False) -> Path:
    """A models folder holding ``clip_l.safetensors``, ``clip_g.safetensors``, ``t5xxl.safetensors`` for the
    code's wrappers: links to the model's files, or the same tensors under the names the code reads. ``streamed``:
    ``t5xxl.safetensors`` links to a file of T5's source (``t5_source``), which its wrapper only opens."""
    from safetensors.torch import load_file, save_file

    from impl.weights import TEXT_WEIGHTS, read_weights_dir, weight_files

    folder = tmp / "models"
    folder.mkdir()
    for _, name, sub, _, _ in TEXT_FILES:
        target = folder / f"{name}.safetensors"
        if streamed and name == "t5xxl":
            target.symlink_to(t5_source(text_model)[0][0].resolve())
        elif text_model.single_file is not None:
            prefix = f"text_encoders.{name}.transformer."
            from safetensors import safe_open

            with safe_open(text_model.single_file, framework="pt", device="cpu") as f:
                state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
            why = f"the {prefix}* tensors of {text_model.single_file.name}"
        elif len(files := weight_files(text_model.directory / sub, TEXT_WEIGHTS)) == 1:  # the rule every side reads by
            single, state = files[0], None
            if name == "t5xxl" and "encoder.embed_tokens.weight" not in safetensors_keys(single):
                state = load_file(str(single))
                why = f"{single} with shared.weight also stored as encoder.embed_tokens.weight (the name the code reads)"
            else:
                target.symlink_to(single.resolve())
        else:
            state = read_weights_dir(text_model.directory / sub, TEXT_WEIGHTS)
            why = f"the shards of {text_model.directory / sub} in one file"
        if state is not None:
            if name == "t5xxl" and "encoder.embed_tokens.weight" not in state and "shared.weight" in state:
                state["encoder.embed_tokens.weight"] = state["shared.weight"]
            save_file({k: v.contiguous() for k, v in state.items()}, str(target))
            notes.append(f"SD3.5 code {name}.safetensors: {why}")
    return folder


@contextlib.contextmanager
def local_tokenizers(ref: Reference, directory: Path):
    """While ``SD3Tokenizer`` is built, its two Hub names resolve to the model's tokenizer folders."""
    saved = {n: getattr(ref.other, n) for n in ("CLIPTokenizer", "T5TokenizerFast")}

    def local(cls):
        class Local:
            @staticmethod
            def from_pretrained(name, *a, **k):
                if name not in HUB_TOKENIZERS:
                    raise Unsupported(f"the SD3.5 code asks for the tokenizer {name!r}; the harness maps only "
                                      f"{sorted(HUB_TOKENIZERS)} to local folders")
                return cls.from_pretrained(directory / HUB_TOKENIZERS[name], *a, **k)
        return Local
    for n, cls in saved.items():
        setattr(ref.other, n, local(cls))
    try:
        yield
    finally:
        for n, cls in saved.items():
            setattr(ref.other, n, cls)


def t5_source(text_model) -> tuple[list[Path], str]:
    """The files holding the model's T5 and the prefix of its tensors' names there."""
    from impl.weights import TEXT_WEIGHTS, weight_files

    if text_model.single_file is not None:
        return [text_model.single_file], "text_encoders.t5xxl.transformer."
    return weight_files(text_model.directory / "text_encoder_3", TEXT_WEIGHTS), ""


def streamed_t5(module, text_model):
    """A ``parity.stream.Pager`` giving the code's T5 (built on the meta device) the model's T5 tensors, each
    ``encoder.block.N`` for the length of its call, in float32 (what the wrapper's ``load_into`` casts them to):
    ``encoder.embed_tokens.weight`` is read from ``shared.weight`` where the file holds only that."""
    from parity.stream import Pager, Weights

    files, prefix = t5_source(text_model)
    w = Weights(files)
    shapes = w.shapes(prefix)
    alias = {}
    if "encoder.embed_tokens.weight" not in shapes and "shared.weight" in shapes:
        alias["encoder.embed_tokens.weight"] = "shared.weight"
        shapes["encoder.embed_tokens.weight"] = shapes["shared.weight"]
    skipped = [k for k in shapes if any(re.fullmatch(p, k) for p in SKIPPED_TEXT_KEYS)]
    blocks = [f"encoder.block.{i}" for i in range(len(module.encoder.block))]
    where = ", ".join(map(str, files))
    with not_matching(f"{where}: the SD3.5 code's T5XXL does not match the file"):
        return Pager(module, blocks, lambda k: w.get(prefix + alias.get(k, k)), shapes,
                     lambda k, t: torch.float32 if t.is_floating_point() else t.dtype, where, ignore=skipped)


@contextlib.contextmanager
def without_load_into(ref: Reference):
    """The code's ``load_into`` does nothing while a wrapper is built (a pager fills the module instead)."""
    saved, ref.infer.load_into = ref.infer.load_into, lambda *a, **k: None
    try:
        yield
    finally:
        ref.infer.load_into = saved


def load_text(ref: Reference, text_model, tmp: Path, notes: list[str], pagers: dict | None = None):
    """An ``SD3Inferencer`` with the code's own tokenizers and text encoders (what its ``load`` builds); with
    ``pagers``, T5 streamed (``streamed_t5``, its pager in ``pagers["t5"]``)."""
    from impl.weights import read_config
    from parity.stream import meta_parameters

    inferencer = ref.infer.SD3Inferencer()
    inferencer.verbose = False
    with local_tokenizers(ref, text_model.directory), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inferencer.tokenizer = ref.other.SD3Tokenizer()
    folder = text_folder(text_model, tmp, notes, streamed=pagers is not None)
    for comp, name, sub, wrapper, constant in TEXT_FILES:
        paged = pagers is not None and comp == "t5"
        released = getattr(ref.infer, constant)
        config, path = dict(released), text_model.directory / sub / "config.json"
        if path.is_file():
            cfg = read_config(path)
            config = {k: cfg.get(k, config[k]) for k in CONFIG_KEYS["t5" if comp == "t5" else "clip"]}
            if comp == "t5":
                _check_t5(cfg, path)
            if not _released(config, released):
                notes.append(f"SD3.5 code {wrapper}: not the released size; its config {config} from {path}")
        setattr(ref.infer, constant, config)  # the wrapper reads the module constant when it is built
        try:
            cls, out = getattr(ref.infer, wrapper), io.StringIO()
            # current checkouts take the models folder; older ones read models/*.safetensors from the working directory
            here = contextlib.nullcontext() if "model_folder" in inspect.signature(cls).parameters else \
                contextlib.chdir(folder.parent)
            with contextlib.redirect_stdout(out), here, refusing(ref, f"the {comp} encoder ({wrapper})"), \
                    meta_parameters() if paged else contextlib.nullcontext(), \
                    without_load_into(ref) if paged else contextlib.nullcontext():
                obj = call(cls, model_folder=str(folder), device="cpu", dtype=torch.float32)
        finally:
            setattr(ref.infer, constant, released)
        setattr(inferencer, {"clip-l": "clip_l", "clip-g": "clip_g", "t5": "t5xxl"}[comp], obj)
        if paged:
            pagers["t5"] = streamed_t5(obj.model.transformer, text_model)
            continue
        own_storage(obj.model)
        module, path = obj.model.transformer, folder / f"{name}.safetensors"
        check_loaded([n for n, _ in (*module.named_parameters(), *module.named_buffers())], set(safetensors_keys(path)),
                     out.getvalue(), SKIPPED_TEXT_KEYS, ("text_projection.weight",),
                     f"{path}: the SD3.5 code's {wrapper} does not match the file")
    return inferencer


def _check_t5(cfg: dict, path: Path) -> None:
    """What the code's T5 cannot represent: inner width other than d_model, other bucket settings."""
    inner = cfg.get("num_heads", 0) * cfg.get("d_kv", 0)
    if inner != cfg.get("d_model"):
        raise Unsupported(f"{path}: num_heads * d_kv = {inner} but the SD3.5 code's T5 has inner width d_model "
                          f"({cfg.get('d_model')})")
    for k, v in (("relative_attention_num_buckets", 32), ("relative_attention_max_distance", 128)):
        if cfg.get(k, v) != v:
            raise Unsupported(f"{path}: {k} {cfg[k]} but the SD3.5 code's T5 fixes {v}")


@contextlib.contextmanager
def _used_modules(model: torch.nn.Module):
    """The names of ``model``'s modules that ran (a checkout whose code skips some of the file's layers loads their
    weights and ignores them: that is a model it does not run, not a divergence)."""
    used: set[str] = set()
    handles = [m.register_forward_hook(lambda *_, n=n: used.add(n)) for n, m in model.named_modules()]
    try:
        yield used
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------- the side

class SaiSide:
    name = "sai"
    covers = None  # every component

    def __init__(self, code: Path | None):
        if code is None:
            raise UsageError(f"the sai profile's reference is the SD3.5 code (Stability-AI/sd3.5, not a package): "
                             f"point --sai-code or ${ENV} at a local checkout")
        self.code = code
        self._conditioning: dict[str, tuple] = {}  # prompt -> get_cond's (context, pooled), computed once

    def key(self, run) -> tuple:
        s = run.spec
        return (str(self.code), s.model, s.checkpoint, s.config, s.prompts, s.dtype, s.threads, s.families, s.steps,
                s.guidance, s.seed, s.height, s.width, s.image, s.strength, s.slg, s.text_only, s.stream, self.sampler(run),
                tuple((m.label, m.shift["sai"]) for m in run.models))

    def sources(self, run) -> dict:
        return {"files": run.sources(single_files=True), "sd3.5 code": fingerprint(self.code)}

    @staticmethod
    def sampler(run) -> str:
        """The reference's ``--sampler`` for the impl sampler flag (the diffusers form has no SD3.5-code twin)."""
        update = run.values["sampler"]
        if not update.startswith("sai_"):
            raise UsageError(f"--flag sampler={update}: the SD3.5 code runs sai_euler or sai_dpmpp_2m")
        return update.removeprefix("sai_")

    @contextlib.contextmanager
    def _reference(self, run):
        dual = any(m.mmdit.dual_attention_layers for m in run.models)
        with imported(self.code) as ref, on_this_machine(), tempfile.TemporaryDirectory(prefix="sd3parity-sai-") as tmp:
            check_api(ref, bool(run.spec.slg), dual)
            yield ref, Path(tmp)

    def text(self, run) -> R.Side:
        pagers = {} if run.spec.stream else None
        with self._reference(run) as (ref, tmp):
            inferencer = load_text(ref, run.text_model, tmp, run.notes, pagers)
            encoders = {"clip-l": inferencer.clip_l.model.transformer, "clip-g": inferencer.clip_g.model.transformer,
                        "t5": inferencer.t5xxl.model.transformer}
            points = {}
            for comp, model in encoders.items():
                layers = model.num_layers
                points[comp] = N.points(N.t5_rows(layers) if comp == "t5" else N.clip_rows(layers), "sai")
                N.check_coverage(points[comp], model, (N.T5_SKIP if comp == "t5" else N.CLIP_SKIP)["sai"],
                                 f"{comp} (SD3.5 code)")
            def encode(prompt):
                self._conditioning[prompt] = get_cond(inferencer, prompt)
                return self._conditioning[prompt]
            states = {"t5": pagers["t5"].state(_impl_t5_name)} if pagers else None
            out = text_side(run.text_model.label, run.spec.prompts, encoders, points, encode, "tokens", run.dtype,
                            states=states)
            for p in (pagers or {}).values():
                p.finish()
            run.notes.extend(p.summary(f"SD3.5 code {comp}") for comp, p in (pagers or {}).items())
            return out

    def image(self, run, model, init) -> R.Side:
        s = run.spec
        img2img = init is not None
        cap = ImageCapture(model.label, "sai", model.mmdit, model.vae, img2img)
        sampler = self.sampler(run)
        slg = {"scale": 2.5, "start": 0.01, "end": 0.20, "layers": list(s.slg)} if s.slg else {}  # CONFIGS (G5)
        with self._reference(run) as (ref, tmp), torch.random.fork_rng(devices=[]):
            missing = [p for p in (s.prompts[0], "") if p not in self._conditioning]
            if missing:  # the text side computed the prompts' conditioning already; the negative once per run
                text = load_text(ref, run.text_model, tmp, [], {} if s.stream else None)
                self._conditioning.update({p: get_cond(text, p) for p in missing})
            cond, neg = self._conditioning[s.prompts[0]], self._conditioning[""]
            inferencer = ref.infer.SD3Inferencer()
            inferencer.verbose = False
            check_vae_config(model.directory)
            check_transformer_config(model.directory, model.mmdit.depth)
            pagers = {} if s.stream else None
            with refusing(ref, f"{model.single_file}"):
                mmdit, vae = load_image_models(ref, model.single_file, run.dtype, model.shift["sai"], pagers)
            inferencer.sd3, inferencer.vae = SimpleNamespace(model=mmdit), SimpleNamespace(model=vae)
            mmdit_state = pagers["mmdit"].state() if pagers else mmdit.diffusion_model.state_dict()
            cap.weights(mmdit_state, vae.state_dict(), run.dtype)  # the code's names are impl's
            with contextlib.ExitStack() as es:
                es.enter_context(cuda_autocast(ref))
                es.enter_context(modules_stay() if pagers is not None else contextlib.nullcontext())
                es.enter_context(self._steps(ref, cap))
                used = es.enter_context(_used_modules(mmdit.diffusion_model))
                cap.attach(es, mmdit.diffusion_model, vae, lambda a, k: (a[0], a[1], k["context"], k["y"]),
                           f"{model.label} mmdit (SD3.5 code)", N.MMDIT_SKIP["sai"])
                latent = call(inferencer.get_empty_latent, batch_size=1, width=s.width, height=s.height, seed=s.seed,
                              device="cpu")
                start = 0
                if img2img:
                    from PIL import Image

                    from impl.sampling import sai_start_index

                    torch.manual_seed(s.seed + 1)  # the posterior's randn_like (unseeded in the reference)
                    latent = ref.impls.SD3LatentFormat().process_in(inferencer.vae_encode(Image.fromarray(init)))
                    start = sai_start_index(s.steps, s.strength)  # records numbered by schedule index
                with contextlib.redirect_stderr(io.StringIO()):  # tqdm progress bars
                    sampled = call(inferencer.do_sampling, latent=latent, seed=s.seed, conditioning=cond,
                                   neg_cond=neg, steps=s.steps, cfg_scale=s.guidance, sampler=sampler,
                                   controlnet_cond=None, denoise=s.strength if img2img else 1.0, skip_layer_config=slg)
                image = inferencer.vae_decode(sampled)
            if pagers:
                pagers["mmdit"].finish()
                run.notes.append(pagers["mmdit"].summary(f"SD3.5 code {model.label} mmdit"))
            unused = sorted(n for n, m in mmdit.diffusion_model.named_modules()
                            if any(True for _ in m.parameters(recurse=False)) and n not in used)
            if unused:
                raise Unsupported(f"--sai-code {self.code}: its MMDiT never called {unused[:4]} while sampling "
                                  f"{model.single_file.name} (the file's weights there were loaded and ignored): this "
                                  "checkout does not run this model")
        return cap.assemble(torch.from_numpy(np.asarray(image).copy()), ("cond", "uncond"), start)

    @staticmethod
    @contextlib.contextmanager
    def _steps(ref: Reference, cap: ImageCapture):
        """Per step: the guided x0 (a global hook on the code's denoiser classes) and the latent after it (the
        next denoiser call's input, or what the sampler returns); the sigmas the sampler is given."""
        impls = ref.impls
        kinds = tuple(getattr(impls, n) for n in ("CFGDenoiser", "SkipLayerCFGDenoiser") if hasattr(impls, n))

        def before(module, args):
            if isinstance(module, kinds) and cap.steps:
                cap.steps[-1]["latent"] = (cap.rec.tick(), args[0].detach().clone())

        def after(module, args, out):
            if isinstance(module, kinds):
                cap.steps.append({"x0": (cap.rec.tick(), out.detach().clone())})
        handles = [torch.nn.modules.module.register_module_forward_pre_hook(before),
                   torch.nn.modules.module.register_module_forward_hook(after)]
        saved = {n: getattr(impls, n) for n in ("sample_euler", "sample_dpmpp_2m")}

        def wrap(fn):
            @functools.wraps(fn)
            def sample(model, x, sigmas, *a, **k):
                cap.schedule(sigmas)
                final = fn(model, x, sigmas, *a, **k)
                cap.steps[-1]["latent"] = (cap.rec.tick(), final.detach().clone())
                return final
            return sample
        for n, fn in saved.items():
            setattr(impls, n, wrap(fn))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for n, fn in saved.items():
                setattr(impls, n, fn)
