"""The `golden` fixture of the sd3parity pytest plugin, driven through pytester."""
import pytest

pytest_plugins = ["pytester"]

TEST = """
import torch

def test_tensors(golden):
    golden.check("a", torch.arange(6, dtype=torch.float32).reshape(2, 3) * {scale})
    golden.check("b", torch.tensor([1.0, 2.0]) + {delta}, max_ulp=2)
"""


def _run(pytester, *args):
    return pytester.runpytest("-p", "no:cacheprovider", *args)


def test_update_then_pass_then_mismatch_then_unused(pytester):
    pytester.makeini("[pytest]\ngolden_root = goldens\n")
    pytester.makepyfile(test_mod=TEST.format(scale=1.0, delta=0.0))
    r = _run(pytester)  # no goldens yet: fail, write .obtained
    r.assert_outcomes(failed=1)
    assert (pytester.path / "goldens/test_mod/test_tensors/a.safetensors.obtained").exists()
    r = _run(pytester, "--golden-update")  # writes the goldens and still fails
    r.assert_outcomes(failed=1)
    r.stdout.fnmatch_lines(["*goldens updated: a, b; rerun without --golden-update*"])
    _run(pytester).assert_outcomes(passed=1)
    assert not (pytester.path / "goldens/test_mod/test_tensors/a.safetensors.obtained").exists()

    pytester.makepyfile(test_mod=TEST.format(scale=1.0, delta="2 ** -22"))  # 1 ulp at 2.0, 2 at 1.0: tolerated
    _run(pytester).assert_outcomes(passed=1)
    pytester.makepyfile(test_mod=TEST.format(scale=1.0001, delta=0.0))
    r = _run(pytester)
    r.assert_outcomes(failed=1)
    r.stdout.fnmatch_lines(["*golden a * differs: max_abs 0.0005*obtained tensor written to a.safetensors.obtained*"])
    assert (pytester.path / "goldens/test_mod/test_tensors/a.safetensors.obtained").exists()

    pytester.makepyfile(test_mod=TEST.format(scale=1.0, delta=0.0))
    (pytester.path / "goldens/test_mod/test_tensors/c.safetensors").write_bytes(
        (pytester.path / "goldens/test_mod/test_tensors/a.safetensors").read_bytes())
    (pytester.path / "goldens/test_mod/test_gone").mkdir()
    (pytester.path / "goldens/test_mod/test_gone/x.safetensors").write_bytes(b"")
    r = _run(pytester)
    r.assert_outcomes(passed=1)
    assert r.ret == pytest.ExitCode.TESTS_FAILED
    r.stdout.fnmatch_lines(["*unused goldens*", "*x.safetensors: no test test_mod::test_gone*",
                            "*c.safetensors: not checked by test_mod::test_tensors*"])
    r = _run(pytester, "-k", "nothing_matches")  # no test ran: nothing is reported as unused
    assert r.ret == pytest.ExitCode.NO_TESTS_COLLECTED and "unused goldens" not in r.stdout.str()


def test_dtype_and_cpu_of_a_golden(pytester):
    """A float16 tensor never passes against a float32 golden (whatever the tolerance), and a golden written on
    another CPU is skipped with both CPUs named rather than compared."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    pytester.makeini("[pytest]\ngolden_root = goldens\n")
    pytester.makepyfile(test_mod=TEST.format(scale=1.0, delta=0.0))
    _run(pytester, "--golden-update")
    pytester.makepyfile(test_mod=TEST.format(scale=1.0, delta=0.0).replace("dtype=torch.float32", "dtype=torch.float16")
                        .replace("max_ulp=2", "max_ulp=2, atol=1.0"))
    r = _run(pytester)
    r.assert_outcomes(failed=1)
    r.stdout.fnmatch_lines(["*golden a * differs: dtype float16 vs float32*"])
    pytester.makepyfile(test_mod=TEST.format(scale=1.0, delta=0.0))
    path = pytester.path / "goldens/test_mod/test_tensors/a.safetensors"
    with safe_open(str(path), framework="pt") as f:
        cpu = json.loads(f.metadata()["cpu"])
    save_file(load_file(str(path)), str(path), metadata={"cpu": json.dumps({**cpu, "model": "another one"})})
    r = _run(pytester, "-rs")
    r.assert_outcomes(skipped=1)
    r.stdout.fnmatch_lines(["*golden a was recorded on another CPU*another one*"])
    assert r.ret == pytest.ExitCode.OK and "unused goldens" not in r.stdout.str()  # b: not reached, not unused
