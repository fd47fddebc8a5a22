"""Benchmarks, each ``python -m fedlora.simulations.bench.NAME`` (``make bench`` runs them all).

- ``server``: validate + weighted sum + apply, and adapter <-> ArrayRecord, against memcpy
- ``qlora``: QLoRA (NF4) step time and memory against fp32 LoRA
- ``tenant``: one tenant's adapter: holdout exact match before / after, training CPU time
- ``federation``: a federated run's wall time against the same work run sequentially; uplink bytes
- ``secagg``: a secure round against a plain round (in-process grid, or the simulation engine)
- ``dp``: the DP-SGD step against the non-DP step
- ``compare``: aggregation rules, server optimizers and encodings side by side (EM, bytes, server s)
- ``deployment``: seconds per round on the Deployment Engine against the simulation engine

The ratio benchmarks (server, qlora, dp, secagg, federation) interleave their two arms
(``timing.interleave``) and print the median, the spread and the load average at start and end.
"""
