"""pytest plugin (entry point ``sd3parity``): the ``golden`` fixture compares named tensors with stored goldens.

    def test_context(golden):
        golden.check("context", tensor)                 # bitwise
        golden.check("pooled", other, max_ulp=2)        # per-tensor tolerance (ULPs), or atol=...

Goldens live in ``<golden_root>/<test file stem>/<test name>/<tensor name>.safetensors`` (ini option
``golden_root``, default ``tests/goldens``). A mismatch fails the test and writes ``<golden>.obtained`` beside it
(a missing golden too). Each golden records the CPU it was written on: CPU kernels round differently per
processor, so on another CPU the check is skipped with both named. ``--golden-update`` rewrites the goldens from what the tests produce and still fails each
test that changed one, so an update is never silent. After the session, goldens of tests that ran (and did not
skip) but were not checked, and goldens of tests that no longer exist in a collected file, fail the run.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import pytest
import torch

from parity.metrics import compare


def pytest_addoption(parser):
    group = parser.getgroup("sd3parity goldens")
    group.addoption("--golden-update", action="store_true", help="rewrite goldens from the tests' tensors")
    parser.addini("golden_root", "folder of the golden fixture's files", default="tests/goldens")


def _write(path: Path, tensor: torch.Tensor) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        save_file({"tensor": torch.empty(tensor.shape, dtype=tensor.dtype).copy_(tensor.detach().cpu())}, tmp,
                  metadata={"cpu": _cpu()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cpu() -> str:
    import json

    from parity.golden import cpu

    return json.dumps(cpu(), sort_keys=True)


def _safe(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+", name) or name.startswith("."):
        raise ValueError(f"golden name {name!r}: use letters, digits, '_', '-', '.', '[', ']'")
    return name


class Golden:
    def __init__(self, folder: Path, update: bool, used: set):
        self.folder, self.update, self.used = folder, update, used
        self.updated: list[str] = []

    def path(self, name: str) -> Path:
        return self.folder / f"{_safe(name)}.safetensors"

    def check(self, name: str, tensor: torch.Tensor, max_ulp: int = 0, atol: float | None = None) -> None:
        """Compare ``tensor`` with the golden ``name``: bitwise by default, else within ``max_ulp`` ULPs per
        element, or within ``atol`` absolute error."""
        from safetensors.torch import load_file

        path = self.path(name)
        self.used.add(path.resolve())
        if self.update:
            if not path.exists() or not torch.equal(load_file(str(path))["tensor"], tensor.detach().cpu()):
                _write(path, tensor)
                self.updated.append(name)
            return
        if not path.exists():
            _write(path.with_suffix(".safetensors.obtained"), tensor)
            pytest.fail(f"golden {path} does not exist; the tensor was written to {path.name}.obtained "
                        "(run with --golden-update to accept it)", pytrace=False)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            recorded_on = (f.metadata() or {}).get("cpu")
        if recorded_on is not None and recorded_on != _cpu():
            pytest.skip(f"golden {name} was recorded on another CPU ({recorded_on}; this one: {_cpu()}): CPU kernels "
                        "round differently per processor, so bitwise goldens hold on the recording CPU only")
        want = load_file(str(path))["tensor"]
        m = compare(tensor.detach().cpu(), want)
        ok = m.get("bitwise_equal", False) or ("shape_mismatch" not in m and "dtype_mismatch" not in m and (
            (atol is not None and m["max_abs_err"] <= atol) or (atol is None and m["max_ulp"] <= max_ulp)))
        if not ok:
            _write(path.with_suffix(".safetensors.obtained"), tensor)
            detail = m.get("shape_mismatch") or (f"dtype {m['dtype_mismatch']}" if "dtype_mismatch" in m else
                                                 f"max_abs {m['max_abs_err']:.3g}, max_ulp {m['max_ulp']}")
            pytest.fail(f"golden {name} ({path}) differs: {detail} (tolerance: "
                        + (f"atol {atol}" if atol is not None else f"max_ulp {max_ulp}")
                        + f"); obtained tensor written to {path.name}.obtained", pytrace=False)
        obtained = path.with_suffix(".safetensors.obtained")
        if obtained.exists():
            obtained.unlink()


def _root(config) -> Path:
    return Path(config.rootpath) / config.getini("golden_root")


def _folder(config, node) -> Path:
    return _root(config) / Path(node.path).stem / node.name


@pytest.fixture
def golden(request):
    config = request.config
    g = Golden(_folder(config, request.node), config.getoption("golden_update"), config.stash[_USED])
    config.stash[_RAN].add(request.node.nodeid)
    return g


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A test that rewrote goldens fails in its call phase, after all its checks ran. A test that skipped (a golden
    recorded on another CPU) checked only part of its goldens: the rest are not reported as unused."""
    try:
        result = yield
    except pytest.skip.Exception:
        item.config.stash[_RAN].discard(item.nodeid)
        raise
    g = getattr(item, "funcargs", {}).get("golden")
    if isinstance(g, Golden) and g.updated:
        pytest.fail(f"goldens updated: {', '.join(g.updated)}; rerun without --golden-update", pytrace=False)
    return result


_USED = pytest.StashKey[set]()
_RAN = pytest.StashKey[set]()
_ITEMS = pytest.StashKey[dict]()


def pytest_configure(config):
    config.stash[_USED], config.stash[_RAN], config.stash[_ITEMS] = set(), set(), {}


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        config.stash[_ITEMS].setdefault(Path(item.path).stem, set()).add(item.name)


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    root = _root(config)
    if not root.is_dir() or not config.stash[_RAN]:
        return
    ran = {(Path(n.split("::")[0]).stem, n.split("::")[-1]) for n in config.stash[_RAN]}
    problems = []
    for path in sorted(root.glob("*/*/*.safetensors")):
        module, test = path.parent.parent.name, path.parent.name
        if module not in config.stash[_ITEMS]:
            continue  # that test file was not collected in this session
        if test not in config.stash[_ITEMS][module]:
            problems.append(f"{path}: no test {module}::{test}")
        elif (module, test) in ran and path.resolve() not in config.stash[_USED]:
            problems.append(f"{path}: not checked by {module}::{test}")
    if problems:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_sep("=", "unused goldens", red=True)
            for p in problems:
                reporter.write_line(p)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
