"""Sides: each produces keyed records of what it can compute, on its own, from the model's files.

A side has ``key(run)`` (what its records depend on, for reuse), ``text(run)``, ``image(run, model, init)``,
``sources(run)`` (the files and code it read, for the report) and ``covers`` (the components it produces, None for
all: a side that computes only part of the pipeline is compared on that part, and the report says so). ``impl`` is the independent implementation,
``diffusers`` diffusers + transformers, ``sai`` the Stability-AI SD3.5 code from a local checkout. A golden set is
read by ``parity.golden``. The image records of every side are assembled the same way here (``ImageCapture``), from
hooks on the side's own transformer and VAE and from what its sampler computes.
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Callable

import torch
import xxhash

from parity import layermap as LM
from parity import naming as N
from parity import records as R
from parity import resources

INPUTS = ("latent_in", "timestep", "context", "pooled")


def checkout(arg: str | None, env: str, flag: str, markers, what: str):
    """The checkout named by option ``flag`` (``arg``) or the variable ``env`` (None when neither is set), checked
    to hold ``markers``."""
    import os
    from pathlib import Path

    from parity.run import UsageError

    raw = arg or os.environ.get(env)
    if not raw:
        return None
    d = Path(raw)
    missing = [f for f in markers if not (d / f).is_file()]
    if missing:
        raise UsageError(f"{flag if arg else '$' + env} {d}: not a checkout of {what} (missing {', '.join(missing)})")
    return d


def code_fingerprint(d, files) -> dict:
    """A reference checkout's fingerprint: the sha256 of ``files`` (each named by its path relative to ``d``), and
    the commit when ``d`` is a git checkout."""
    import subprocess

    h = hashlib.sha256()
    for p in sorted(files):
        h.update(str(p.relative_to(d)).encode() + b"\0" + p.read_bytes())
    out = {"path": str(d), "sha256": h.hexdigest()}
    if (d / ".git").exists():
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out["commit"] = subprocess.run(["git", "-C", str(d), "rev-parse", "HEAD"], capture_output=True, text=True,
                                           timeout=10, check=True).stdout.strip()
    return out


def make_side(name: str, run):
    if name == "impl":
        from parity.sides.impl import ImplSide

        return ImplSide()
    if name == "diffusers":
        from parity.sides.diffusers import DiffusersSide

        return DiffusersSide()
    if name == "sai":
        from parity.sides.sai import SaiSide

        return SaiSide(run.sai_code)
    if name == "comfyui":
        from parity.sides.comfyui import ComfySide

        return ComfySide(run.comfyui_code)
    raise ValueError(f"unknown side {name!r}")


class ImageCapture:
    """One side's records of one image run. ``attach`` hooks the side's transformer (its inputs per call, every
    mapped point, its raw output) and VAE; the side's sampler adds ``sigmas`` and, per step, the guided output
    and the new latent with ``step``. ``assemble`` attributes the calls to steps and CFG branches (a batch-1 call
    right after a CFG batch is the skip-layer call of that step) and returns the records in execution order."""

    def __init__(self, label: str, side: str, model_config, vae_config, img2img: bool):
        c, vc = model_config, vae_config
        self.label, self.rec = label, R.Recorder()
        self.mmdit = {**N.points(N.mmdit_rows(c.depth, c.qk_norm, c.dual_attention_layers), side),
                      "output": N.At("", "output")}
        vrows = N.vae_rows(vc.ch_mult, vc.num_res_blocks)
        self.encoder = N.vae_points(vrows, side, "encoder") if img2img else {}
        self.decoder = N.vae_points(vrows, side, "decoder")
        self.store: dict[str, dict] = {"mmdit": {}, "vae": {}}
        self.calls: list = []
        self.steps: list[dict] = []
        self.sigmas = None

    def attach(self, es: contextlib.ExitStack, model, vae, inputs: Callable, what: str, skip: dict) -> None:
        """``inputs(args, kwargs)`` -> (latent, timestep, context, pooled) of one transformer call."""
        N.check_coverage(self.mmdit, model, skip, what)
        keep = lambda t: self.rec.keep(t, copy=True)  # noqa: E731 - past the budget, captures go to the spill file
        es.enter_context(LM.capture(model, self.mmdit, self.store["mmdit"], self.rec.tick, keep))
        es.enter_context(LM.capture(vae, {**self.encoder, **self.decoder}, self.store["vae"], self.rec.tick, keep))
        resources.watch(es, "mmdit", model)
        for part in ("encoder", "decoder"):
            if isinstance(getattr(vae, part, None), torch.nn.Module):
                resources.watch(es, f"vae {part}", getattr(vae, part))

        def pre(_m, args, kwargs):
            counts = {k: len(v) for k, v in self.store["mmdit"].items()}
            self.calls.append((self.rec.tick(), [t.detach().clone() for t in inputs(args, kwargs)], counts))
        es.callback(model.register_forward_pre_hook(pre, with_kwargs=True).remove)

    def weights(self, mmdit_state: dict, vae_state: dict, dtype) -> None:
        """The transformer's and the VAE's parameters under impl's names, before the run."""
        put_weights(self.rec, self.label, "mmdit", mmdit_state, dtype)
        put_weights(self.rec, self.label, "vae", vae_state, dtype)

    def schedule(self, sigmas) -> None:
        self.sigmas = (self.rec.tick(), sigmas.detach().clone())

    def step(self, **tensors) -> None:
        """The guided output (``velocity`` or ``x0``) and the ``latent`` after one step, computed now."""
        now = self.rec.tick()
        self.steps.append({k: (now, v.detach().clone()) for k, v in tensors.items()})

    def _of_call(self, layer: str, n: int):
        captured, calls = self.store["mmdit"].get(layer, []), self.calls
        start = calls[n][2].get(layer, 0)
        end = calls[n + 1][2].get(layer, 0) if n + 1 < len(calls) else len(captured)
        return captured[start] if end > start else None  # None: a layer the call skipped (skip-layer guidance)

    def assemble(self, pixels, cfg_order: tuple[str, str], step0: int) -> R.Side:
        rec, label = self.rec, self.label
        for layer, at in self.encoder.items():
            t, v = self.store["vae"][layer][0]
            rec.put(in_impl_form(at, v), at=t, model=label, component="vae", layer=layer)
        if self.sigmas is not None:
            rec.put(self.sigmas[1], at=self.sigmas[0], model=label, component="sampler", layer="sigmas")
        step, prev = step0 - 1, 0
        # CFG run as two batch-1 calls per step (ComfyUI, contexts of other lengths): cond, then uncond
        split = len(self.calls) == 2 * len(self.steps) and all(c[1][0].shape[0] == 1 for c in self.calls)
        for n, (time, inputs, _) in enumerate(self.calls):
            batch = inputs[0].shape[0]
            skip = batch == 1 and prev == 2
            if split:
                step, branches = step + (n % 2 == 0), ["cond" if n % 2 == 0 else "uncond"]
            else:
                step = step if skip else step + 1
                branches = list(cfg_order) if batch == 2 else (["skip"] if skip else ["cond"])
            prev = batch
            for b, branch in enumerate(branches):
                where = {"model": label, "step": step, "branch": branch}
                for i, (name, t) in enumerate(zip(INPUTS, inputs)):
                    rec.put(t[b: b + 1], at=time, sub=8 * b + i, component="sampler", layer=f"input.{name}", **where)
                for layer, at in self.mmdit.items():
                    got = self._of_call(layer, n)
                    if got is not None:
                        rec.put(in_impl_form(at, got[1], b), at=got[0], sub=b,
                                component="mmdit", layer=layer, **where)
        for i, d in enumerate(self.steps):
            for k, (name, (time, t)) in enumerate(d.items()):
                rec.put(t, at=time, sub=k, model=label, component="sampler", layer=name, step=step0 + i)
        for layer, at in self.decoder.items():
            t, v = self.store["vae"][layer][0]
            rec.put(in_impl_form(at, v), at=t, model=label, component="vae", layer=layer)
        rec.put(pixels, model=label, component="vae", layer="image_uint8")
        return rec.side()


def in_impl_form(at: N.At, captured, row: int | None = None):
    """A captured value (row ``row`` of its batch, or all of it) in impl's form: without a transform, a spilled
    capture stays in the spill file, recorded where it lies."""
    if not at.transform:
        return captured if row is None else R.rows(captured, row, row + 1)
    t = R.load(captured)
    return N.apply_transform(at.transform, t if row is None else t[row: row + 1])


DIGEST_ABOVE = 2 ** 20  # elements: a streamed model's larger parameters are recorded as a digest


def put_weights(rec: R.Recorder, label: str, component: str, state: dict, dtype) -> None:
    """A side's loaded parameters (named as impl names them) as records, taken before any activation: a missing,
    zeroed, transposed or mis-mapped tensor is reported at its parameter, not as a wrong op downstream. Floating
    parameters are taken in the run's ``dtype``, the values a run in it computes with (impl keeps float32 weights
    and casts them where the references store them cast). A streamed model's (``LazyState``) parameters of more
    than ``DIGEST_ABOVE`` elements are recorded as a digest of their bytes (``digest_later``): equal when the
    tensors are, without a second copy of the model on disk; a unit's are taken when the run pages it in for its
    forward, at their place in the order (``LazyState.record``), so the weights are read once, and hashed on
    background threads while the run goes on."""
    from parity.stream import LazyState

    digest = isinstance(state, LazyState)

    def put(name: str, t: torch.Tensor, at: int | None = None) -> None:
        with resources.span("weight records"):
            t = t.to(dtype) if t.is_floating_point() else t
            if digest and t.numel() > DIGEST_ABOVE:
                t = digest_later(t)
            rec.put(t, at=at, model=label, component=component, layer=R.WEIGHT + name)
    if digest:  # a block's while the run pages it in; the side calls its pagers' finish
        state.record(put, rec.tick)
        return
    for name, t in state.items():
        put(name, t)


# A weight digest's kind, named by its length. XXH3-128 (a 128-bit non-cryptographic hash, about 8.8 GB/s on one
# core here against sha256's 1.1 GB/s) is what runs record; sha256 is read too, for producers without xxhash: a
# run against a dump records the kind the dump holds (``digesting``).
DIGESTS = {"xxh3-128": (16, lambda b: xxhash.xxh3_128(b).digest()),
           "sha256": (32, lambda b: hashlib.sha256(b).digest())}
DIGEST_DEFAULT = "xxh3-128"
DIGEST_PIECE = 4 << 20  # bytes: a larger tensor is digested as the digest of its pieces' digests
DIGEST_BACKLOG = 1 << 30  # bytes: tensors kept alive at most while they wait for their digest
_hashing: dict = {"pool": None, "waiting": [], "kind": DIGEST_DEFAULT}  # threads, digests not known done, the kind


def digest_kind(t) -> str | None:
    """The kind of a weight record that is a digest (uint8 of a digest's length), None for any other tensor (a
    tensor, or a spilled one: read from its dtype and shape)."""
    if t.dtype != torch.uint8 or len(t.shape) != 1:
        return None
    return next((kind for kind, (n, _) in DIGESTS.items() if t.shape[0] == n), None)


@contextlib.contextmanager
def digesting(kind: str | None):
    """Weight digests taken inside are of ``kind`` (a key of ``DIGESTS``; None: ``DIGEST_DEFAULT``)."""
    saved, _hashing["kind"] = _hashing["kind"], kind or DIGEST_DEFAULT
    try:
        yield
    finally:
        _hashing["kind"] = saved


def digest_later(t: torch.Tensor, kind: str | None = None) -> R.Later:
    """A digest of a tensor's bytes (contiguous, its dtype) as uint8: the hash (``kind``, by default the one
    ``digesting`` set) of the bytes, or for more than ``DIGEST_PIECE`` bytes the hash of the concatenated hashes
    of its ``DIGEST_PIECE``-byte pieces. The pieces are hashed on background threads, half as many as torch's
    (both hashes release the GIL), so a streamed run hashes a block's weights while it reads the next tensors and
    computes (measured with sha256 on the synthetic SD3.5-Medium with 2 threads: the check took 119.5 s with 2
    hashing threads, 109.6 s with 1); the tensor is kept until its digest is done, and past ``DIGEST_BACKLOG``
    bytes of such tensors this waits for the oldest."""
    from concurrent.futures import ThreadPoolExecutor

    hash_ = DIGESTS[kind or _hashing["kind"]][1]
    raw = memoryview(R.flat_bytes(t).numpy())  # keeps the tensor alive
    if _hashing["pool"] is None:
        _hashing["pool"] = ThreadPoolExecutor(max(1, torch.get_num_threads() // 2),
                                              thread_name_prefix="sd3parity-digest")
    waiting = _hashing["waiting"]
    waiting[:] = [w for w in waiting if not w[1].done()]
    while waiting and sum(n for n, _ in waiting) + len(raw) > DIGEST_BACKLOG:
        waiting.pop(0)[1].get()
    pieces = [_hashing["pool"].submit(hash_, raw[i: i + DIGEST_PIECE]) for i in range(0, len(raw), DIGEST_PIECE)]

    def combine() -> torch.Tensor:
        got = [p.result() for p in pieces]
        digest = hash_(b"".join(got)) if len(got) > 1 else (got[0] if got else hash_(b""))
        return torch.frombuffer(bytearray(digest), dtype=torch.uint8)
    later = R.Later(combine, lambda: all(p.done() for p in pieces))
    waiting.append((len(raw), later))
    return later


def digest(t: torch.Tensor, kind: str | None = None) -> torch.Tensor:
    """``digest_later(t, kind)``, waited for."""
    return digest_later(t, kind).get()


def text_state(component: str, module) -> dict:
    """A text encoder's parameters (of a module, or a state dict) under impl's names: transformers' T5 ties
    ``encoder.embed_tokens.weight`` to ``shared.weight``, which impl holds alone (an untied pair is kept, so it
    shows)."""
    from collections.abc import Mapping

    from parity.stream import LazyState

    if isinstance(module, LazyState):  # a streamed model's: read in order, tied parameters once
        return module
    state = dict(module if isinstance(module, Mapping) else module.state_dict())
    tied = "encoder.embed_tokens.weight"
    if component == "t5" and tied in state:
        if "shared.weight" not in state:  # renamed where it stands (the order a streamed side records in)
            state = {"shared.weight" if k == tied else k: v for k, v in state.items()}
        elif state[tied].data_ptr() == state["shared.weight"].data_ptr():
            del state[tied]
    return state


def text_side(label: str, prompts, encoders: dict, points: dict, encode: Callable, first_arg: str,
              dtype, ids_at: dict | None = None, states: dict | None = None) -> R.Side:
    """One side's text records: each encoder's parameters, then per prompt each encoder's input ids (the first
    argument of its call, or keyword ``first_arg``; every sequence it ran, flattened) and every mapped layer, then
    the context and pooled tensors ``encode(prompt)`` returns. ``ids_at``: per encoder, the module whose calls
    carry the ids when the encoder is called with embeddings (ComfyUI embeds each sequence of the batch by itself:
    those calls, and any point captured once per sequence, are joined along the batch). ``states``: per encoder,
    the parameters a side computes with where its ``state_dict`` holds them otherwise (quantized)."""
    rec = R.Recorder()
    for comp, model in encoders.items():
        put_weights(rec, label, comp, text_state(comp, (states or {}).get(comp, model)), dtype)
    for pi, prompt in enumerate(prompts):
        stores: dict[str, dict] = {c: {} for c in encoders}
        ids: dict[str, list] = {}
        with contextlib.ExitStack() as es:
            for comp, model in encoders.items():
                es.enter_context(LM.capture(model, points[comp], stores[comp], rec.tick,
                                            lambda t: rec.keep(t, copy=True)))  # past the budget: to the spill file
                resources.watch(es, comp, model)

                def pre(_m, args, kwargs, comp=comp):
                    if comp not in ids or ids_at is not None:
                        x = args[0] if args else kwargs[first_arg]
                        ids.setdefault(comp, []).append((rec.tick(), x.detach().reshape(-1).clone()))
                at = model if ids_at is None else ids_at[comp]
                es.callback(at.register_forward_pre_hook(pre, with_kwargs=True).remove)
            context, pooled = encode(prompt)
        for comp in encoders:
            where = {"model": label, "prompt": pi, "component": comp}
            if comp in ids:
                rec.put(torch.cat([t for _, t in ids[comp]]), at=ids[comp][0][0], layer="input_ids", **where)
            for layer, at in points[comp].items():
                if stores[comp].get(layer):
                    got = stores[comp][layer] if ids_at is not None else stores[comp][layer][:1]
                    v = got[0][1] if len(got) == 1 else torch.cat([R.load(v) for _, v in got])
                    rec.put(in_impl_form(at, v), at=got[0][0], layer=layer, **where)
        where = {"model": label, "prompt": pi, "component": "conditioning"}
        rec.put(context, layer="context", **where)
        rec.put(pooled, layer="pooled", **where)
    return rec.side()
