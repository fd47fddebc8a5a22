"""The ratio benchmarks' shared timing, and the server benchmark on its smallest settings."""

import re

from fedlora.simulations.bench import server as bench_server
from fedlora.simulations.bench.timing import interleave, ratio_summary


def test_interleave_alternates_the_order_of_the_arms():
    order = []
    t = interleave({"a": lambda: order.append("a") or 1.0, "b": lambda: order.append("b") or 2.0}, 4)
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert t == {"a": [1.0] * 4, "b": [2.0] * 4}


def test_interleave_runs_the_warmup_first_and_does_not_count_it():
    calls = {"a": [], "b": []}

    def arm(name, seconds):
        return lambda: calls[name].append(1) or seconds[len(calls[name]) - 1]

    t = interleave({"a": arm("a", [9.0, 1.0, 1.5]), "b": arm("b", [7.0, 2.0, 2.5])}, 2, warmup=1)
    assert t == {"a": [1.0, 1.5], "b": [2.0, 2.5]}
    assert len(calls["a"]) == len(calls["b"]) == 3


def test_ratio_summary_is_the_median_of_paired_ratios_with_its_spread():
    r = ratio_summary([2.0, 3.0, 8.0], [1.0, 2.0, 4.0])  # pairs 2.0, 1.5, 2.0
    assert r["median"] == 2.0 and r["min"] == 1.5 and r["max"] == 2.0 and r["spread_pct"] == 25.0


def test_server_bench_reports_every_arm_against_memcpy_and_the_load(capsys, tmp_path):
    rc = bench_server.main(["--sizes", "17", "--updates", "2", "--repeats", "1", "--default-allocator",
                            "--json", str(tmp_path / "s.json")])
    out = capsys.readouterr().out
    assert rc == 0
    for what in ("validate + sum + apply | 2 | 16.8", "to_arrayrecord | 1 | 16.8", "from_arrayrecord | 1 | 16.8"):
        assert what in out, out
    assert re.search(r"load average \(1/5/15 min\) at start [\d./]+, at end [\d./]+", out), out
    assert (tmp_path / "s.json").is_file()
