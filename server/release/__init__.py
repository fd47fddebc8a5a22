"""After the federated rounds: DPO refinement, fp32 merge, signed publishing, verification and
serving. Callers pass the inputs in (preference data, holdouts, prompts); nothing here knows
how they were made.

- ``stages``: the stages in order (``run_stages``) and one by one, with their inputs (``ReleaseInputs``)
- ``artifacts``: a run directory or a published version, opened as one ``Source``
- ``dpo``: DPO (TRL) of the aggregate against itself as frozen reference; preference metrics
- ``merge``: the adapter merged into the fp32 base, checked against base + adapter
- ``publish``: a versioned, immutable ``<registry>/<name>/<version>/`` with its model card
- ``manifest``: the SHA-256 manifest, its Ed25519 signature, and verification
- ``tables``: the Markdown the model card and the run report share
- ``hotswap``: one base, several published adapters, switched per request
"""
