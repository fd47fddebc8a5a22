"""The secure-aggregation benchmark (in-process grid) runs on tiny settings and reports its ratios."""

import json
import re

from fedlora.simulations.bench import secagg as bench_secagg


def test_bench_secagg_grid_reports_the_interleaved_ratios_and_load(capsys, tmp_path):
    rc = bench_secagg.main(["--tenants", "3", "--floats", "2000", "--repeats", "2", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 0
    row = re.search(r"\| 3 \| 2 \| 2,000 \| [\d.]+ / [\d.]+ / [\d.]+ \| ([\d.]+)x \(([\d.]+)-([\d.]+), \d+ %\) \|", out)
    assert row, out
    assert float(row.group(2)) <= float(row.group(1)) <= float(row.group(3))
    assert "load average (1/5/15 min) at start" in out
    (got,) = json.loads((tmp_path / "r.json").read_text())
    # the critical path drops the tenants' serial time: never longer than the round as timed
    for kind in ("plain", "secure", "signed"):
        assert 0 < got[f"critical_{kind}_seconds"] <= got[f"{kind}_seconds"]
    assert got["signed_bytes_per_tenant"] > got["secure_bytes_per_tenant"]  # signatures travel
