"""The secure-aggregation benchmark (in-process grid) runs on tiny settings and reports its ratio."""

import re

from fedlora.simulations.bench import secagg as bench_secagg


def test_bench_secagg_grid_reports_the_interleaved_ratio_and_load(capsys):
    rc = bench_secagg.main(["--tenants", "3", "--floats", "2000", "--repeats", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    row = re.search(r"\| 3 \| 2 \| 2,000 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x \| ([\d.]+)-([\d.]+)x \(\d+ %\) \|", out)
    assert row, out
    assert float(row.group(4)) <= float(row.group(3)) <= float(row.group(5))
    assert "load average (1/5/15 min) at start" in out
