"""A tenant's side: the ClientApp and the plain functions behind it.

- ``client_app``: the ClientApp Flower loads: forwards each message to the tenant worker, or runs the handlers.
- ``handlers``: the message handlers (train, evaluate, and the four secure-aggregation stages).
- ``worker``: the tenant worker, one long-running process per deployment node with the model loaded.
- ``worker_link``: the worker's private Unix socket, both ends (imports no torch).
- ``clientapp_shim``: fedlora's ``flwr-clientapp`` on a node: hands each task to the worker (standard library only).
- ``task_runner``: one ClientApp task pulled and answered inside the worker, with Flower's runtime functions.
- ``task``: one tenant round (load once, train, return the delta; evaluate the global adapter).
- ``train``: local LoRA/QLoRA training (AdamW, schedule, gradient accumulation).
- ``lora_rules``: the tenant's side of the LoRA rule (ffa freezes A; a lower-rank svd tenant).
- ``feedback``: the delta in the run's wire encoding, with error feedback kept in the state dir.
- ``prox``: FedProx's proximal step after each optimizer step.
- ``privacy``: privacy mechanisms as objects (none, local DP-SGD with Opacus, central-DP client clip).
- ``ledger``: the tenant's persistent privacy ledger and its budget.
- ``secagg``: the tenant's SecAgg+ state machine (keys, shares, masked upload, unmasking).
"""
