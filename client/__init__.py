"""A tenant's side: the ClientApp and the plain functions behind it.

- ``client_app``: the ClientApp (train, evaluate, and the four secure-aggregation stages).
- ``task``: one tenant round (load once, train, return the delta; evaluate the global adapter).
- ``train``: local LoRA/QLoRA training (AdamW, schedule, gradient accumulation).
- ``privacy``: privacy mechanisms as objects (none, local DP-SGD with Opacus, central-DP client clip).
- ``ledger``: the tenant's persistent privacy ledger and its budget.
- ``secagg``: the tenant's SecAgg+ state machine (keys, shares, masked upload, unmasking).
"""
