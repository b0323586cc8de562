"""Soak: a minute of sustained mixed traffic on a real server process, through
`benchmarks/load.py` at a small size: 4 ranks streaming telemetry for 2 deployments at 50 reports/s each,
both deployments re-planned and read back 4 times a second, one watcher each.

Bars: no error at all (no failed RPC, no rejected report, no version skipped, stale or out of order),
the work really happened, and the server's RSS is flat after a 15 s warm-up (by then the window and
its 8 history intervals, 576 slots at 50 slots/s, are full): it grows by less than 5 %
between the end of the warm-up and the end. Why that bar: the server's RSS here is ~260 MiB (torch,
grpc) and measured growth after warm-up is ~0.1 % (0.3 MiB), so 5 % (~13 MiB) leaves ample room for
allocator steps, while a leak of ~2 KiB per report (~8k reports in the measured 45 s) or of one
production-sized placement (~60 KiB) per rebalance (~230 of them) would fail it. Slower leaks need the
longer `benchmarks/load.py` run, which reports the RSS slope.
"""

from __future__ import annotations

import load
import pytest
from rebalancer_testkit import workloads


@pytest.mark.slow
def test_a_minute_of_load_has_no_errors_and_flat_memory(pytestconfig):
    figures = load.run(
        duration_s=60.0,
        streams=4,
        controllers=2,
        warmup_s=15.0,
        shape=workloads.Shape("soak", 8, 32, 40, 4, 2, 8),
        report_hz=50.0,
        rebalance_interval_s=0.25,
    )
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\nsoak:\n" + load.markdown(figures))
    assert figures["errors"] == 0, figures["error_kinds"]
    assert figures["server_exit_code"] == 0
    assert figures["reports_per_s"] > 0.5 * figures["offered_reports_per_s"]
    assert figures["rebalances"] >= 60 and figures["watch_pushes"] >= 0.9 * figures["rebalances"]
    assert figures["rss_growth_pct"] < 5.0, figures
