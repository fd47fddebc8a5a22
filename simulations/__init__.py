"""Local runs, the commands and everything simulation-only: the outer layer (nothing in
client, server or common imports it).

- ``cli/``: the ``fedlora`` commands and the launchers they use
- ``bench/``: the benchmarks, ``python -m fedlora.simulations.bench.NAME``
- ``attacks/``: a hostile tenant and the harness that measures what the server survives
- ``scenario``: scenarios (``scenarios/*.toml``) and ``--set`` overrides -> one Config; run_config.toml
- ``synthetic``: seeded synthetic tenants (train / holdout splits), preferences, probe, corpus
- ``domains``: the four synthetic sub-domains: vocabularies, facts, prose, answers
- ``baselines``: local-only and pooled baselines, and every model on every tenant's holdout
- ``release``: the release stages' inputs from a simulated run, and their report sections
- ``report``: plots and ``report.md`` of a run directory
- ``build_base``: pretrains the embedded base model (``base_model/``)
- ``base_tokenizer``: the embedded base's tokenizer, its check, and document packing
"""
