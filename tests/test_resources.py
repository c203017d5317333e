"""parity.resources: the time and peak memory a run's stages and components took."""
import contextlib
import time

import pytest
import torch

from parity.resources import Meter, _status_kb, metering, span, table, watch


def test_stages_hold_their_components_calls_and_peaks():
    meter = Meter()
    lin = torch.nn.Linear(4, 4)
    before = _status_kb()
    with metering(meter), meter.stage("one"):
        with span("held"):  # 256 MiB touched and held for 50 ms: the sampler sees it even below the process's peak
            held = torch.ones(64 * 2 ** 20)
            time.sleep(0.05)
            del held
        with contextlib.ExitStack() as es:
            watch(es, "linear", lin)
            lin(torch.ones(1, 4))
            lin(torch.ones(1, 4))
        lin(torch.ones(1, 4))  # no longer watched
    with meter.stage("two"):
        pass
    span("outside").__enter__()  # no metered run: nothing recorded
    one, two = meter.stages
    assert [one["stage"], two["stage"]] == ["one", "two"] and two["components"] == []
    comps = {c["component"]: c for c in one["components"]}
    assert list(comps) == ["held", "linear"] and comps["linear"]["calls"] == 2 and comps["held"]["calls"] == 1
    assert one["seconds"] >= comps["held"]["seconds"] >= 0.05
    if before is None:
        pytest.skip("no /proc: times only")
    assert comps["held"]["peak_rss_mb"] >= before[0] / 1024 + 250
    assert one["peak_rss_mb"] >= comps["held"]["peak_rss_mb"]
    lines = table(meter.stages)
    assert lines[1].split()[0] == "one" and lines[2].split()[:3] == ["held", f"{comps['held']['seconds']:.2f}", "1"]
