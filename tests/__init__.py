"""The test suite; it mirrors the packages. ``make test`` runs all of it, ``make test-fast``
the unit tier (``-m "not slow"``: nothing that starts Flower or a process, or trains for long).

- ``common/``, ``client/``, ``server/`` (``server/release/``), ``simulations/``: one folder per package
- ``integration/``: multi-process runs on Flower's simulation and deployment engines
- ``conftest``: offline switches, Hugging Face caches kept out of the user's home, shared fixtures
"""
