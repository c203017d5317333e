"""Activation dumps: one implementation's records as files, so that implementations outside this harness (another
runtime, another language) are compared record by record with impl, a reference or each other.

A dump is a directory::

    manifest.json         the format, the naming scheme, the producer, the run settings, one entry per record
    records.safetensors   one tensor per record, named by the entry's ``name``

``manifest.json``::

    {"format": "sd3parity-dump", "version": 1,
     "scheme": "impl" | "diffusers",
     "producer": {"name": "...", ...},            free-form: what computed the records (name, versions)
     "settings": {...},                           free-form: the run (prompts, steps, seed, size, dtype, flags)
     "records": [                                 in the producer's execution order
        {"name": "r0", "model": "embedded-sd3.5-medium", "prompt": null, "component": "mmdit",
         "layer": "block.3.x", "step": 0, "branch": "cond", "shape": [1, 16, 192], "dtype": "float32"}, ...]}

``component`` is ``clip-l``, ``clip-g``, ``t5``, ``conditioning``, ``mmdit``, ``sampler`` or ``vae``. In the
``impl`` scheme ``layer`` is the harness's record name (``sd3parity dump`` writes them; the naming tables in
``parity/naming.py`` list them). In the ``diffusers`` scheme the layers of ``mmdit``, ``vae``, ``clip-*`` and
``t5`` are diffusers / transformers module names, followed by ``:output.K`` or ``:input`` where the record is not
the module's (first) output: ``transformer_blocks.3:output.1`` is block 3's image stream, ``norm_out.linear`` the
final modulation in diffusers' (scale, shift) order. Other layers (``input_ids``, ``context``, ``input.latent_in``,
``latent``, ``image_uint8``, the transformer's ``output``, ...) have one name in both schemes. A record's tensor is what the module computed for
one prompt (text) or one CFG branch (``cond``, ``uncond``, ``skip``) of one step, batch dimension 1.

A weight record (layer ``weight:<name>``) holds the parameter, or for one of more than 2**20 elements a digest of
its bytes in the run's dtype: the hash of the bytes, or past 4 MiB the hash of the concatenated hashes of its 4 MiB
pieces, as uint8, 16 bytes for XXH3-128 (what ``sd3parity dump --stream`` writes) or 32 for sha256. A check against
the dump records its digests in the kind the dump holds.

Reading checks every entry (fields, shape and dtype against the stored tensor) and names the dump, the record and
the field at fault. Writing is atomic: a temporary directory beside the target, renamed into place.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from parity import naming as N
from parity import records as R

FORMAT, VERSION = "sd3parity-dump", 1
SCHEMES = ("impl", "diffusers")
COMPONENTS = ("clip-l", "clip-g", "t5", "conditioning", "mmdit", "sampler", "vae")
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "bool")
COMMON = ("input_ids", "output", "image_uint8")  # layers of mapped components named alike in both schemes
MAPPED = ("mmdit", "vae", "clip-l", "clip-g", "t5")  # components whose layers differ between the schemes


class DumpError(ValueError):
    """A dump that cannot be read or written; the message names the file and the record or field."""


# ---------------------------------------------------------------------------------------------- names

def _tables(component: str, layers: set[str]) -> dict[str, N.At]:
    """The naming table of ``component`` sized from the layers a dump holds (depth, levels, layer count)."""
    def top(pattern: str, default: int = 0) -> int:
        found = [int(m.group(1)) for layer in layers for m in [re.search(pattern, layer)] if m]
        return max(found, default=default - 1) + 1

    if component == "mmdit":
        depth = max(top(r"^transformer_blocks\.(\d+)"), top(r"^block\.(\d+)\."), 1)
        return N.points(N.mmdit_rows(depth, True, tuple(range(depth))), "diffusers")
    if component == "vae":
        levels = max(top(r"(?:down|up)_blocks\.(\d+)"), top(r"\.(?:down|up)\.(\d+)\."), 1)
        res = max(top(r"encoder\.down_blocks\.\d+\.resnets\.(\d+)"), top(r"decoder\.up_blocks\.\d+\.resnets\.(\d+)") - 1,
                  top(r"encoder\.down\.\d+\.block\.(\d+)"), top(r"decoder\.up\.\d+\.block\.(\d+)") - 1, 1)
        return N.points(N.vae_rows((1,) * levels, res), "diffusers")
    n = max(top(r"layers\.(\d+)"), top(r"block\.(\d+)"), 1)
    return N.points(N.t5_rows(n) if component == "t5" else N.clip_rows(n), "diffusers")


def _label(at: N.At) -> str:
    return at.module if at.reads == "output" else f"{at.module}:{at.reads}"


def to_impl(component: str, layers: list[str], where: str) -> dict[str, tuple[str, str]]:
    """diffusers-scheme layer -> (impl record name, the transform into impl's form)."""
    if component not in MAPPED:
        return {layer: (layer, "") for layer in layers}
    inverse = {_label(at): (record, at.transform) for record, at in _tables(component, set(layers)).items()}
    inverse.update({layer: (layer, "") for layer in layers if layer.startswith(R.WEIGHT) or layer in COMMON})
    missing = [layer for layer in layers if layer not in inverse]
    if missing:
        raise DumpError(f"{where}: {component} layer {missing[0]!r} is not a diffusers module of the naming table "
                        f"({len(missing)} such)")
    return {layer: inverse[layer] for layer in layers}


def to_diffusers(component: str, records: list[str]) -> dict[str, tuple[str, str]]:
    """impl record name -> (diffusers-scheme layer, the transform out of impl's form: its own inverse)."""
    if component not in MAPPED:
        return {r: (r, "") for r in records}
    table = _tables(component, set(records))
    return {r: (r, "") if r.startswith(R.WEIGHT) or r not in table else (_label(table[r]), table[r].transform)
            for r in records}


# ---------------------------------------------------------------------------------------------- write

def write(target: Path, side: R.Side, settings: dict, producer: dict, scheme: str = "impl") -> int:
    """Write ``side`` (records in impl's scheme and form) as a dump at ``target`` (which must not exist), one
    record in memory at a time."""
    from parity.stream import write_tensors

    if scheme not in SCHEMES:
        raise DumpError(f"--scheme {scheme!r}: expected one of {', '.join(SCHEMES)}")
    if target.exists():
        raise DumpError(f"{target}: exists; a dump is written to a new directory")
    names: dict[str, dict] = {}
    if scheme == "diffusers":
        by_comp: dict[str, list[str]] = {}
        for fields, _ in side.values():
            by_comp.setdefault(fields["component"], []).append(fields["layer"])
        names = {c: to_diffusers(c, layers) for c, layers in by_comp.items()}
    entries, specs, sources = [], [], {}
    for n, (fields, t) in enumerate(side.values()):
        layer, transform = names.get(fields["component"], {}).get(fields["layer"], (fields["layer"], ""))
        name = f"r{n}"
        sources[name] = (t, transform)
        shape, dtype = _form(t, transform)
        entries.append({"name": name, **{k: fields.get(k) for k in R.KEY_FIELDS}, "layer": layer,
                        "shape": list(shape), "dtype": str(dtype).removeprefix("torch.")})
        specs.append((name, dtype, shape))

    def get(name: str):  # one record in memory at a time
        t, transform = sources[name]
        return N.apply_transform(transform, R.load(t))
    manifest = {"format": FORMAT, "version": VERSION, "scheme": scheme, "producer": producer, "settings": settings,
                "records": entries}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write_tensors(tmp / "records.safetensors", specs, get)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return len(entries)


# ---------------------------------------------------------------------------------------------- read

def _form(t, transform: str) -> tuple:
    """The shape and dtype of record ``t`` (a tensor or a spilled one) once ``transform`` is applied."""
    import torch

    out = N.apply_transform(transform, torch.empty(tuple(t.shape), dtype=t.dtype, device="meta"))
    return tuple(out.shape), out.dtype


def _manifest(path: Path):
    mpath = path / "manifest.json"
    if not path.is_dir():
        raise DumpError(f"{path}: not a directory (a dump is a directory with manifest.json and records.safetensors)")
    try:
        return json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DumpError(f"{mpath}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DumpError(f"{mpath}: not JSON ({e})") from None


def digest_kind(path: Path) -> str | None:
    """The kind of the weight digests a dump holds (``parity.sides.DIGESTS``, by their length), None when it holds
    none; a dump with digests of two kinds is refused, naming a record of each."""
    from types import SimpleNamespace

    import torch

    from parity.sides import digest_kind as kind_of

    m = _manifest(path)
    entries = m.get("records") if isinstance(m, dict) else None
    kinds: dict[str, str] = {}
    for e in entries if isinstance(entries, list) else []:
        if (isinstance(e, dict) and str(e.get("layer")).startswith(R.WEIGHT) and e.get("dtype") == "uint8"
                and isinstance(e.get("shape"), list)):
            kind = kind_of(SimpleNamespace(dtype=torch.uint8, shape=e["shape"]))
            if kind:
                kinds.setdefault(kind, str(e.get("name")))
    if len(kinds) > 1:
        raise DumpError(f"{path / 'manifest.json'}: weight digests of two kinds: "
                        + ", ".join(f"record {name!r} is {kind}" for kind, name in kinds.items()))
    return next(iter(kinds), None)


def read(path: Path) -> tuple[R.Side, dict]:
    """A dump's records in impl's scheme and form, in its execution order, and its manifest. The records are read
    one at a time into a recorder (past its budget, its spill file)."""
    from types import SimpleNamespace

    import torch

    from parity.stream import Weights

    mpath, tpath = path / "manifest.json", path / "records.safetensors"
    m = _manifest(path)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DumpError(f"{mpath}: format is not {FORMAT!r}")
    if m.get("version") != VERSION:
        raise DumpError(f"{mpath}: version {m.get('version')!r}; this sd3-parity reads version {VERSION}")
    if m.get("scheme") not in SCHEMES:
        raise DumpError(f"{mpath}: scheme {m.get('scheme')!r}: expected one of {', '.join(SCHEMES)}")
    for key in ("producer", "settings"):
        if not isinstance(m.get(key, {}), dict):
            raise DumpError(f"{mpath}: {key} must be an object")
    entries = m.get("records")
    if not isinstance(entries, list) or not entries:
        raise DumpError(f"{mpath}: records must be a non-empty list")
    if not tpath.is_file():
        raise DumpError(f"{tpath}: missing")
    try:
        stored = Weights([tpath])  # header checked; each record read when its turn comes (one in memory)
    except (OSError, ValueError) as e:
        raise DumpError(f"{tpath}: unreadable ({e})") from None
    shapes = stored.shapes()
    tensors = {k: SimpleNamespace(shape=torch.Size(v), dtype=stored.dtype(k)) for k, v in shapes.items()}
    for i, e in enumerate(entries):
        _check_entry(e, i, mpath, tensors)
    names: dict[str, dict] = {}
    if m["scheme"] == "diffusers":
        by_comp: dict[str, list[str]] = {}
        for e in entries:
            by_comp.setdefault(e["component"], []).append(e["layer"])
        names = {c: to_impl(c, layers, str(mpath)) for c, layers in by_comp.items()}
    rec = R.Recorder()
    try:
        for e in entries:
            layer, transform = names.get(e["component"], {}).get(e["layer"], (e["layer"], ""))
            fields = {k: e.get(k) for k in R.KEY_FIELDS} | {"layer": layer}
            try:
                rec.put(N.apply_transform(transform, stored.get(e["name"])), **fields)
            except ValueError as err:  # the same record twice
                raise DumpError(f"{mpath}: record {e['name']!r}: {err}") from None
    finally:
        stored.close()
    return rec.side(), m


def _check_entry(e, i: int, mpath: Path, tensors: dict) -> None:
    def bad(message: str):
        raise DumpError(f"{mpath}: records[{i}]" + (f" ({e.get('name')!r})" if isinstance(e, dict) else "")
                        + f": {message}")

    if not isinstance(e, dict):
        bad("not an object")
    if not isinstance(e.get("name"), str) or e["name"] not in tensors:
        bad(f"name {e.get('name')!r} is not a tensor of records.safetensors")
    if e.get("component") not in COMPONENTS:
        bad(f"component {e.get('component')!r}: expected one of {', '.join(COMPONENTS)}")
    if not isinstance(e.get("layer"), str) or not e["layer"]:
        bad("layer must be a non-empty string")
    for k in ("model", "branch"):
        if e.get(k) is not None and not isinstance(e[k], str):
            bad(f"{k} must be a string or null")
    for k in ("prompt", "step"):
        if e.get(k) is not None and (not isinstance(e[k], int) or isinstance(e[k], bool) or e[k] < 0):
            bad(f"{k} must be an integer >= 0 or null")
    t = tensors[e["name"]]
    if e.get("shape") != list(t.shape):
        bad(f"shape {e.get('shape')!r}, the stored tensor is {list(t.shape)}")
    if e.get("dtype") != str(t.dtype).removeprefix("torch."):
        bad(f"dtype {e.get('dtype')!r}, the stored tensor is {str(t.dtype).removeprefix('torch.')}")


def compare(a: Path, b: Path, max_ulp: int = 0, max_abs: float | None = None, strict: bool = False):
    """Dump ``a`` against dump ``b`` (the reference: its execution order), on the records both hold (``strict``:
    a record only one holds fails)."""
    from parity.report import Report

    side_a, ma = read(a)
    side_b, mb = read(b)
    only_a, only_b = [k for k in side_a if k not in side_b], [k for k in side_b if k not in side_a]
    if not strict:
        side_a = {k: v for k, v in side_a.items() if k in side_b}
        side_b = {k: v for k, v in side_b.items() if k in side_a}
    if not side_b:
        raise DumpError(f"{a} and {b} hold no record in common (compare their manifests' model, component, layer, "
                        "step and branch fields)")
    report = Report(str(a), "dump", str(b), ",".join(sorted({str(f["dtype"]) for f in
                                                              ma["records"] + mb["records"]})),
                    {}, 0, max_ulp, max_abs=max_abs)
    report.add_pairs(side_a, side_b)
    report.sides = (side_a, side_b)
    report.sources = {str(a): {"producer": ma.get("producer", {})}, str(b): {"producer": mb.get("producer", {})}}
    if not strict and (only_a or only_b):
        report.notes.append(f"compared the {len(side_b)} records both dumps hold; {len(only_a)} only in {a}, "
                            f"{len(only_b)} only in {b} (--strict counts them as failures)")
    return report
