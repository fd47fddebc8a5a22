"""Benchmarks, each ``python -m simulations.bench.NAME`` (``make bench`` runs them all).

- ``qlora``: QLoRA (NF4) step time and memory against fp32 LoRA
- ``tenant``: one tenant's adapter: holdout exact match before / after, training CPU time
- ``federation``: a federated run's wall time against the same work run sequentially; uplink bytes
- ``secagg``: a secure round against a plain round (in-process grid, or the simulation engine)
- ``dp``: the DP-SGD step against the non-DP step
- ``deployment``: seconds per round on the Deployment Engine against the simulation engine
"""
