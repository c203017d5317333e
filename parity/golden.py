"""Golden sets: recorded tensors of every record, and verification that classifies what changed.

Layout of one set (``golden/<name>/``)::

    manifest.json                      schema, settings, environment, versions, tolerance, one entry per record
    tensors-<sha256[:16]>.safetensors  the stored tensors, named by content

Storage is tiered: a tensor of at most ``FULL_LIMIT`` elements is stored whole; a larger one by its sha256, float64
statistics and ``SAMPLES`` values at fixed positions, so the committed set stays small while a divergence is still
localised to its record and sized. Writing is atomic: the tensor file gets a new content-derived name, the manifest
is replaced last with ``os.replace``, and only then are unreferenced tensor files removed; a writer killed at any
point leaves the previous set verifiable. One writer at a time: ``record`` holds an advisory lock
(``<golden-dir>/.<name>.lock``, ``fcntl.flock``) from its start to its end, and a second writer exits at once (25).
A writer removes only its own temporaries; what a killed writer left (``.partial`` files, unreferenced tensor files)
is removed and named by the next ``record``, and named by ``verify``.

Every manifest field is checked for type and range before use, and ``records_sha256`` (a checksum of the records
list) makes any edit of a record (its sha256, shape or storage; a deleted or duplicated record) a malformed
manifest rather than a change of impl or the reference. ``tensor_file`` must be a file name of the set.

``verify`` exit codes (also in the README):

    0  every record matches
    10 impl changed            impl differs; the reference (when installed) still matches
    11 reference changed       the installed reference differs while impl matches; the version drift is named
    12 environment changed     impl (and the reference) differ and threads, device, dtype, torch or the model
                               files differ
    13 impl and reference both changed in the recorded environment
    14 recorded on another CPU, nothing else changed: the bits may differ (CPU kernels round per processor); with the
       reference installed, impl still agrees with it live on this machine
    20 golden damaged: a stored tensor does not match its recorded sha256 (e.g. a flipped byte)
    21 golden damaged: the tensor file is missing, truncated or unreadable
    22 golden damaged: manifest.json is missing
    23 golden damaged: manifest.json is malformed or edited (a wrong type, a value out of range, records that do
       not match their checksum or the stored tensors)
    24 the manifest was written by a newer schema than this sd3-parity reads

``record`` exit codes: 0 written; 25 another ``record`` is writing the same set (nothing was changed); 26 the set
could not be written (disk full, file too large, permissions: the previous set is unchanged).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import math
import os
import platform
import re
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from torch import Tensor

from parity import records as R

SCHEMA = "sd3-parity-golden"
SCHEMA_VERSION = 3  # 2: settings are a run.Spec, records carry their execution order (seq); 3: records_sha256
FULL_LIMIT = 512
SAMPLES = 64
EXIT = {"ok": 0, "impl": 10, "reference": 11, "environment": 12, "both": 13, "other_cpu": 14, "tensor_damaged": 20,
        "tensor_file": 21, "manifest_missing": 22, "manifest_malformed": 23, "newer_schema": 24, "busy": 25, "write_failed": 26}
SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
TENSOR_FILE = re.compile(r"tensors-[0-9a-f]{16}\.safetensors")
SHA256 = re.compile(r"[0-9a-f]{64}")
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "bool")
VERSIONED = ("torch", "diffusers", "transformers", "tokenizers", "safetensors", "numpy")
REFERENCE_PACKAGES = ("diffusers", "transformers", "tokenizers")


class GoldenError(Exception):
    def __init__(self, kind: str, message: str, *detail):
        super().__init__(message, *detail)
        self.kind, self.code = kind, EXIT[kind]

    def __str__(self) -> str:
        return self.args[0]


def _dense(t: Tensor) -> Tensor:
    """A fresh tensor with standard strides (``contiguous()`` keeps stride 0 on size-1 dimensions)."""
    return torch.empty(t.shape, dtype=t.dtype).copy_(t.detach().cpu())


def tensor_sha256(t: Tensor) -> str:
    t = _dense(t)
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def sample_positions(n: int) -> Tensor:
    """SAMPLES flat indices spread over ``n`` elements, the same for every run (a fixed stride, no RNG)."""
    if n <= SAMPLES:
        return torch.arange(n)
    return (torch.arange(SAMPLES, dtype=torch.int64) * n) // SAMPLES + (n // (2 * SAMPLES))


def stats(t: Tensor) -> dict:
    x = t.detach().double().flatten()
    if not x.numel():
        return {}
    finite = x[torch.isfinite(x)]
    return {"mean": float(finite.mean()) if finite.numel() else None, "std": float(finite.std()) if finite.numel() > 1 else 0.0,
            "min": float(finite.min()) if finite.numel() else None, "max": float(finite.max()) if finite.numel() else None,
            "nan": int(torch.isnan(x).sum()), "inf": int(torch.isinf(x).sum())}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in VERSIONED:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def reference_installed() -> bool:
    return all(_installed(p) for p in REFERENCE_PACKAGES)


def cpu() -> dict:
    """What decides the CPU kernels' rounding: torch's vector capability and the processor's model and ISA
    extensions (measured: goldens recorded on another x86-64 processor differ from the first attention on)."""
    import torch

    model, flags = "", []
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = sorted(f for f in value.split() if f.startswith(("avx", "amx", "fma", "f16c", "sse")))
    except OSError:
        pass
    return {"capability": torch.backends.cpu.get_cpu_capability(), "model": model or platform.processor(),
            "isa": hashlib.sha256(" ".join(flags).encode()).hexdigest()[:12]}


def _installed(pkg: str) -> bool:
    try:
        metadata.version(pkg)
        return True
    except metadata.PackageNotFoundError:
        return False


# ---------------------------------------------------------------------------------------------- writing

def _entries(ref: R.Side, impl: R.Side) -> tuple[list[dict], dict[str, Tensor]]:
    """Golden entries, in the reference's execution order: the reference's tensor where it produced one
    (``source: reference``), else impl's (``source: impl``: records no reference computed)."""
    entries, tensors = [], {}
    for fields, got, want in R.paired(impl, ref):
        if R.is_weight(fields):
            continue  # the model's files are fingerprinted; their parameters are not golden data
        t, source = (want, "reference") if want is not None else (got, "impl")
        k = R.key(fields)
        e = {"key": k, **{f: fields.get(f) for f in (*R.KEY_FIELDS, "block", "stream")}, "seq": len(entries),
             "source": source, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
             "sha256": tensor_sha256(t)}
        if t.numel() <= FULL_LIMIT:
            e["storage"] = "full"
            tensors[k] = _dense(t)
        else:
            e["storage"] = "sampled"
            e["stats"] = stats(t)
            tensors[k + "#samples"] = _dense(t.flatten()[sample_positions(t.numel())])
        if got is not None and source == "reference" and tensor_sha256(got) != e["sha256"]:
            e["impl_sha256"] = tensor_sha256(got)  # impl differed when recorded (a flipped flag, a quirk)
        entries.append(e)
    return entries, tensors


def records_sha256(records: list) -> str:
    return hashlib.sha256(json.dumps(records, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_name(name: str) -> None:
    if not SET_NAME.fullmatch(name):
        raise ValueError(f"--name {name!r}: a set name is letters, digits and . _ + - (no path), starting with a "
                         "letter or digit")


@contextlib.contextmanager
def writer_lock(target: Path):
    """The set's advisory writer lock, held for the whole ``record``; taken without waiting."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / f".{target.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            raise GoldenError("busy", f"{target}: another record{f' (pid {holder})' if holder else ''} is writing "
                                      "this golden set; nothing was changed (run again when it has finished)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with the next writer)


def leftovers(target: Path) -> list[Path]:
    """What killed writers left in a set: temporaries and tensor files the manifest does not name."""
    named = None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        named = json.loads((target / "manifest.json").read_text(encoding="utf-8")).get("tensor_file")
    return sorted([*target.glob(".*.partial"), *(p for p in target.glob("tensors-*.safetensors") if p.name != named)])


def write_set(target: Path, manifest: dict, tensors: dict[str, Tensor]) -> list[str]:
    """Atomically replace the golden set at ``target`` (see the module docstring); the caller holds the writer
    lock. Returns the leftovers of killed writers it removed."""
    from safetensors.torch import save_file

    target.mkdir(parents=True, exist_ok=True)
    removed = []
    for stale in leftovers(target):
        if stale.name.endswith(".partial"):  # unreferenced tensor files go after the new manifest is in place
            stale.unlink(missing_ok=True)
            removed.append(stale.name)
    own = []
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tensors-", suffix=".partial", dir=target)
        os.close(fd)
        own.append(tmp)
        save_file(tensors, tmp)
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
        name = f"tensors-{digest[:16]}.safetensors"
        os.chmod(tmp, 0o644)
        os.replace(tmp, target / name)
        manifest = {**manifest, "tensor_file": name, "tensor_file_sha256": digest}
        fd, mtmp = tempfile.mkstemp(prefix=".manifest-", suffix=".partial", dir=target)
        own.append(mtmp)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(mtmp, 0o644)
        os.replace(mtmp, target / "manifest.json")
    except OSError as e:
        raise GoldenError("write_failed", f"{target}: could not write the golden set ({e.strerror or e}); the "
                                          "previous set is unchanged") from None
    finally:
        for path in own:
            Path(path).unlink(missing_ok=True)
    for old in leftovers(target):
        old.unlink(missing_ok=True)
        removed.append(old.name)
    return removed


def spec_of(manifest_settings: dict, source: str):
    """The ``run.Spec`` a manifest's settings describe (lists back to tuples); unknown keys are malformed."""
    from parity.run import Spec

    fields = Spec.__dataclass_fields__
    unknown = sorted(set(manifest_settings) - set(fields))
    if unknown:
        raise GoldenError("manifest_malformed", f"{source}: settings has unknown keys {unknown}")
    values = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
              for k, v in manifest_settings.items()}
    from parity.run import UsageError, validate

    spec = Spec(**values)
    types = {"threads": int, "steps": int, "seed": int, "height": int, "width": int, "max_ulp": int, "text_only": bool,
             "guidance": (int, float), "strength": (int, float), "profile": str, "dtype": str, "noise_floor": bool,
             "tolerance": str, "mode": str}
    bad = [k for k, t in types.items() if not isinstance(getattr(spec, k), t)
           or (t is int and isinstance(getattr(spec, k), bool))]
    bad += [k for k in ("model", "checkpoint", "config", "image", "sai_code", "reference_dump") if not isinstance(getattr(spec, k), (str, type(None)))]
    bad += [k for k in ("prompts", "families", "slg") if not isinstance(getattr(spec, k), tuple)]
    if bad:
        raise GoldenError("manifest_malformed", f"{source}: settings {', '.join(sorted(bad))} of the wrong type")
    try:
        validate(spec)
    except (UsageError, TypeError) as e:
        raise GoldenError("manifest_malformed", f"{source}: settings: {e}") from None
    return spec


def sides(s, with_reference: bool, sai_code: str | None = None):
    """impl's records and, when asked and available, the reference's, through the run path. The sai profile's
    reference is the SD3.5 code: without a checkout (``sai_code`` or ``$SD3PARITY_SAI_CODE``) it is not run."""
    from dataclasses import replace

    from parity.run import execute, resolve
    from parity.sides.sai import code_dir

    if s.profile == "sai":  # --sai-code, else $SD3PARITY_SAI_CODE, else the checkout it was recorded with
        import os

        from parity.sides.sai import ENV

        recorded = s.sai_code if s.sai_code and Path(s.sai_code).is_dir() else None
        s = replace(s, sai_code=sai_code or os.environ.get(ENV) or recorded)
        if with_reference and code_dir(s.sai_code) is None:
            with_reference = False
    run = resolve(s)
    impl = execute(run, "impl")
    ref = execute(run, run.reference) if with_reference else None
    return run, impl, ref


def model_fingerprint(s) -> dict:
    """What the set was computed from. The embedded default: its manifest's sha256. A named model: per file, the
    ``run.file_fingerprint`` of each file."""
    from impl import embedded

    if s.model is None and s.checkpoint is None:
        return {"name": "embedded-default",
                "manifest_sha256": hashlib.sha256(json.dumps(embedded.manifest(), sort_keys=True).encode()).hexdigest()}
    from parity.run import file_fingerprint

    files = {}
    for root in [Path(p) for p in (s.model, s.checkpoint, s.config) if p]:
        for p in sorted([root] if root.is_file() else (q for q in root.rglob("*") if q.is_file())):
            files[str(p if root.is_file() else p.relative_to(root))] = file_fingerprint(p)
    return {"name": str(s.model or s.checkpoint), "files": files}


def environment(s) -> dict:
    return {"device": "cpu", "threads": s.threads, "dtype": s.dtype, "machine": platform.machine(), "cpu": cpu()}


def record(target: Path, s, force: bool = False) -> tuple[dict, list[str]]:
    """Run impl and the reference with ``s`` and write the golden set at ``target``. Returns the manifest and the
    leftovers of killed writers that were removed. An existing set is replaced only with ``force``."""
    with writer_lock(target):
        return _record(target, s, force)


def _record(target: Path, s, force: bool) -> tuple[dict, list[str]]:
    from parity.run import spec_json

    if (target / "manifest.json").exists() and not force:
        raise FileExistsError(f"{target}: a golden set exists; --force replaces it")
    if not reference_installed():
        raise ValueError("recording needs the reference libraries (diffusers, transformers, tokenizers)")
    run, (impl, impl_src), ref = sides(s, with_reference=True)
    if ref is None:
        raise ValueError("recording the sai profile needs the SD3.5 code: --sai-code DIR or $SD3PARITY_SAI_CODE")
    entries, tensors = _entries(ref[0], impl)
    if s.noise_floor:  # the reference's own jitter per record (one more thread), kept with the set
        from dataclasses import replace

        from parity.run import execute, noise_floor, resolve

        noise = noise_floor(ref[0], execute(resolve(replace(s, threads=s.threads + 1)), run.reference)[0])
        for e in entries:
            if e["key"] in noise:
                e["noise"] = noise[e["key"]]
    manifest = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model_fingerprint(s), "settings": spec_json(s), "flags": dict(run.values),
        "reference": run.reference, "sources": {"impl": impl_src, run.reference: ref[1]},
        "environment": environment(s), "versions": versions(),
        "tolerance": {"policy": "bitwise: each record's sha256 must match; sampled records are sized on their "
                                "stored samples and statistics when it does not", "max_ulp": 0},
        "notes": run.notes, "records": entries, "records_sha256": records_sha256(entries),
    }
    removed = write_set(target, manifest, tensors)
    return manifest, removed


# ---------------------------------------------------------------------------------------------- verifying

def _malformed(path: Path, message: str) -> GoldenError:
    return GoldenError("manifest_malformed", f"{path}: {message}")


def check_manifest(m, path: Path) -> dict:
    """Every field the verifier reads, checked for type and range; the records against their checksum."""
    if not isinstance(m, dict) or m.get("schema") != SCHEMA:
        raise _malformed(path, f"not an {SCHEMA} manifest")
    version = m.get("schema_version")
    if type(version) is not int:
        raise _malformed(path, f"schema_version {version!r} is not an integer")
    if version < SCHEMA_VERSION:
        raise _malformed(path, f"schema_version {version} is older than this sd3-parity reads ({SCHEMA_VERSION}); "
                               "record the set again")
    if version > SCHEMA_VERSION:
        raise GoldenError("newer_schema", f"{path}: schema_version {version} is newer than this sd3-parity reads "
                                          f"({SCHEMA_VERSION}); upgrade sd3-parity")
    kinds = {"settings": dict, "environment": dict, "versions": dict, "records": list, "tensor_file": str,
             "tensor_file_sha256": str, "records_sha256": str, "flags": dict, "reference": str}
    missing = [k for k in kinds if k not in m]
    if missing:
        raise _malformed(path, f"missing keys {missing}")
    wrong = [f"{k} is {type(m[k]).__name__}, not {t.__name__}" for k, t in kinds.items() if not isinstance(m[k], t)]
    if wrong:
        raise _malformed(path, "; ".join(wrong))
    if not TENSOR_FILE.fullmatch(m["tensor_file"]):
        raise _malformed(path, f"tensor_file {m['tensor_file']!r} is not a tensor file name of this set "
                               "(tensors-<16 hex>.safetensors)")
    for k in ("tensor_file_sha256", "records_sha256"):
        if not SHA256.fullmatch(m[k]):
            raise _malformed(path, f"{k} {m[k]!r} is not a sha256")
    env = m["environment"]
    if type(env.get("threads")) is not int or env["threads"] < 1 or not isinstance(env.get("dtype"), str):
        raise _malformed(path, f"environment {env!r}: threads (an integer >= 1) and dtype are required")
    if not all(isinstance(v, (str, type(None))) for v in m["versions"].values()):
        raise _malformed(path, "versions: each package version is a string or null")
    if records_sha256(m["records"]) != m["records_sha256"]:
        raise _malformed(path, "the records do not match records_sha256: the manifest was edited (a record changed, "
                               "added or deleted)")
    if not m["records"]:
        raise _malformed(path, "no records")
    keys = set()
    for i, e in enumerate(m["records"]):
        ok = (isinstance(e, dict) and isinstance(e.get("key"), str) and isinstance(e.get("sha256"), str)
              and SHA256.fullmatch(e["sha256"]) and e.get("storage") in ("full", "sampled") and e.get("dtype") in DTYPES
              and isinstance(e.get("shape"), list) and all(type(n) is int and n >= 0 for n in e["shape"])
              and e.get("seq") == i and e.get("source") in ("reference", "impl"))
        if not ok:
            raise _malformed(path, f"record {i} is malformed: {str(e)[:200]}")
        if e["key"] in keys:
            raise _malformed(path, f"record {i} repeats the key {e['key']!r}")
        keys.add(e["key"])
    return m


def load_set(d: Path) -> tuple[dict, dict[str, Tensor]]:
    """The manifest and stored tensors of one set, or a GoldenError naming what is damaged. A manifest replaced by
    a writer between reading it and opening its tensor file is read again."""
    for attempt in range(3):
        try:
            return _load_set(d)
        except GoldenError as e:
            if e.kind != "tensor_file" or attempt == 2:
                raise
            path = d / "manifest.json"
            if json.loads(path.read_text(encoding="utf-8")).get("tensor_file") == e.args[1]:
                raise  # the manifest still names the missing file: not a race


def _load_set(d: Path) -> tuple[dict, dict[str, Tensor]]:
    from impl.weights import WeightError, read_safetensors

    path = d / "manifest.json"
    if not path.is_file():
        raise GoldenError("manifest_missing", f"{path}: missing (no golden set here)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GoldenError("manifest_malformed", f"{path}: not valid JSON ({e})") from None
    check_manifest(manifest, path)
    tfile = d / manifest["tensor_file"]
    if not tfile.is_file():
        raise GoldenError("tensor_file", f"{tfile}: missing (named by {path.name})", manifest["tensor_file"])
    try:
        tensors = read_safetensors(tfile)
    except (WeightError, OSError) as e:
        raise GoldenError("tensor_file", f"{tfile}: unreadable ({e})", manifest["tensor_file"]) from None
    if hashlib.sha256(tfile.read_bytes()).hexdigest() != manifest["tensor_file_sha256"]:
        damaged = [e["key"] for e in manifest["records"] if e["storage"] == "full"
                   and (e["key"] not in tensors or tensor_sha256(tensors[e["key"]]) != e["sha256"])]
        raise GoldenError("tensor_damaged", f"{tfile}: sha256 differs from the manifest's"
                          + (f"; damaged records: {', '.join(damaged[:5])}" if damaged else
                             " (the damage is in sampled data or the header)"))
    stored = set()
    for e in manifest["records"]:
        k = e["key"] if e["storage"] == "full" else e["key"] + "#samples"
        t = tensors.get(k)
        n = math.prod(e["shape"])
        want = e["shape"] if e["storage"] == "full" else [min(n, SAMPLES)]
        if t is None or list(t.shape) != want or str(t.dtype).removeprefix("torch.") != e["dtype"]:
            raise _malformed(path, f"record {e['key']!r} ({e['storage']} {e['shape']} {e['dtype']}) does not match "
                                   f"its stored tensor {None if t is None else (list(t.shape), t.dtype)}")
        if e["storage"] == "full" and tensor_sha256(t) != e["sha256"]:
            raise GoldenError("tensor_damaged", f"{tfile}: record {e['key']!r} does not match its recorded sha256")
        if (e["storage"] == "full") != (n <= FULL_LIMIT):
            raise _malformed(path, f"record {e['key']!r}: storage {e['storage']} for {n} elements")
        stored.add(k)
    extra = sorted(set(tensors) - stored)
    if extra:
        raise _malformed(path, f"{tfile.name} holds tensors no record names: {', '.join(extra[:5])}")
    return manifest, tensors


@dataclass
class Verdict:
    name: str
    kind: str
    lines: list[str]

    @property
    def code(self) -> int:
        return EXIT[self.kind]


def _size(e: dict, got: Tensor, tensors: dict[str, Tensor]) -> str:
    """How far ``got`` is from the golden record, from what is stored."""
    from parity.metrics import compare

    if list(got.shape) != e["shape"] or str(got.dtype).removeprefix("torch.") != e["dtype"]:
        return f"shape/dtype {list(got.shape)} {got.dtype} vs golden {e['shape']} {e['dtype']}"
    if e["storage"] == "full":
        m = compare(got.contiguous(), tensors[e["key"]])
    else:
        m = compare(got.detach().flatten()[sample_positions(got.numel())].contiguous(), tensors[e["key"] + "#samples"])
        m["note"] = f"on {SAMPLES} sampled values"
    return f"max_abs {m.get('max_abs_err', 0):.3g}, ulp {m.get('max_ulp', 0)}" + (f" ({m['note']})" if "note" in m else "")


def _first_bad(side: R.Side, manifest: dict, tensors: dict, impl: bool) -> str | None:
    for e in manifest["records"]:
        if not impl and e.get("source") == "impl":
            continue  # no reference computes this record
        want = e.get("impl_sha256", e["sha256"]) if impl else e["sha256"]
        if e["key"] not in side:
            return f"{e['key']}: not produced"
        got = R.load(side[e["key"]][1])
        if tensor_sha256(got) != want:
            where = " ".join(f"{f}={e[f]}" for f in ("model", "prompt", "component", "layer", "step", "branch",
                                                     "block", "stream") if e.get(f) is not None)
            size = _size(e, got, tensors) if want == e["sha256"] else "differs from impl's recorded tensor"
            return f"{where} ({size})"
    known = {e["key"] for e in manifest["records"]}
    extra = [k for k, (f, _) in side.items() if k not in known and not R.is_weight(f)]  # a new record: new structure
    return f"{extra[0]}: not in the golden set" if extra else None


def verify(d: Path, threads: int | None = None, with_reference: bool | None = None,
           sai_code: str | None = None) -> Verdict:
    from dataclasses import replace

    manifest, tensors = load_set(d)
    s = spec_of(manifest["settings"], str(d / "manifest.json"))
    if threads is not None:
        s = replace(s, threads=threads)
    use_ref = reference_installed() if with_reference is None else with_reference
    run, (impl, _), ref = sides(s, with_reference=use_ref, sai_code=sai_code)
    ref_side = None if ref is None else ref[0]
    env_now, env_then = environment(s), manifest["environment"]
    now, then = versions(), manifest["versions"]
    env_diff = {k: (env_then.get(k), v) for k, v in env_now.items() if env_then.get(k) != v}
    if now.get("torch") != then.get("torch"):
        env_diff["torch"] = (then.get("torch"), now.get("torch"))
    drift = {p: (then.get(p), now.get(p)) for p in REFERENCE_PACKAGES if ref is not None and then.get(p) != now.get(p)}
    if manifest.get("model") and model_fingerprint(s) != manifest["model"]:
        env_diff["model files"] = ("as recorded", "changed")  # the inputs moved: not impl's or the reference's fault
    impl_bad = _first_bad(impl, manifest, tensors, impl=True)
    ref_bad = _first_bad(ref_side, manifest, tensors, impl=False) if ref_side is not None else None
    lines = [f"{len(manifest['records'])} records; reference "
             + (f"{run.reference} compared" if ref_side is not None else "not run: impl only")]
    left = leftovers(d)
    if left:
        lines.append(f"leftovers of a killed record: {', '.join(p.name for p in left)} (the next record removes them)")
    fmt = lambda d_: ", ".join(f"{k} {a} -> {b}" for k, (a, b) in d_.items())  # noqa: E731
    if impl_bad:
        lines.append(f"impl: first difference at {impl_bad}")
    if ref_bad:
        lines.append(f"reference: first difference at {ref_bad}")
    if env_diff:
        lines.append(f"environment: {fmt(env_diff)}")
    if drift:
        lines.append(f"reference versions: {fmt(drift)}")
    if not impl_bad and not ref_bad:
        kind = "ok"
    elif impl_bad and not ref_bad:
        kind = "environment" if env_diff else "impl"
    elif ref_bad and not impl_bad:
        kind = "reference"
        if not drift:
            lines.append("reference versions: unchanged (the same versions produced other numbers)")
    else:
        kind = "environment" if env_diff else "both"
    if env_diff and impl_bad and ref_side is not None:
        # another machine computes other bits: the goldens cannot tell, the live comparison can
        live = _live(impl, ref_side, manifest)
        lines.append(f"live on this machine: impl vs {run.reference}: " + (live or "every record that agreed when "
                                                                             "recorded agrees"))
        if live:
            kind = "both" if drift else "impl"
    if kind == "environment" and set(env_diff) == {"cpu"}:
        kind = "other_cpu"
    return Verdict(d.name, kind, lines)


def _live(impl: R.Side, ref: R.Side, manifest: dict) -> str | None:
    """The first record, among those impl and the reference agreed on when recorded, where they differ now."""
    for e in manifest["records"]:
        if e.get("source") != "reference" or "impl_sha256" in e:
            continue
        k = e["key"]
        if k not in impl or k not in ref:
            return f"{k}: produced by one side only"
        if tensor_sha256(R.load(impl[k][1])) != tensor_sha256(R.load(ref[k][1])):
            return " ".join(f"{f}={e[f]}" for f in ("model", "prompt", "component", "layer", "step", "branch")
                            if e.get(f) is not None)
    return None


def golden_sets(root: Path) -> list[Path]:
    if (root / "manifest.json").exists() or any(root.glob("tensors-*.safetensors")):
        return [root]
    sets = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    if not sets:
        raise GoldenError("manifest_missing", f"{root}: no golden sets (no manifest.json in it or its subfolders)")
    return sets
