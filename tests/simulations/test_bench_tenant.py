"""The one-tenant benchmark runs end to end on tiny settings and reports what it measured."""

import re

from fedlora.simulations.bench import tenant as bench_tenant


def test_bench_tenant_reports_exact_match_and_cpu_time(capsys):
    # Act: 2 training steps on 16 rows, 2 holdout rows.
    rc = bench_tenant.main(["--steps", "2", "--threads", "1", "--set", "data.train-size=16",
                            "--set", "data.holdout-size=2", "--set", "eval.max-new-tokens=4"])

    # Assert: the summary names the sizes and gives both exact matches and the CPU time.
    out = capsys.readouterr().out
    assert rc == 0
    assert "16 train rows, 2 holdout rows, 2 steps of batch 16" in out
    m = re.search(r"holdout exact match ([\d.]+) % -> ([\d.]+) % \(([+-][\d.]+) points\); "
                  r"training CPU time ([\d.]+) s", out)
    assert m, out
    assert float(m.group(4)) > 0
