"""The federation operator's server: the ServerApp and everything a round needs.

- ``server_app``: the ServerApp; parses the config, wires the strategy (``make_strategy``), starts it.
- ``strategy``: the one Strategy: sample -> transport -> bound -> aggregate -> noise -> apply -> record.
- ``transport``: how updates reach the strategy; the plain transport (validated individual updates).
- ``secagg``: the SecAgg+ transport (key stages before the upload, unmasking after; only the sum).
- ``aggregation``: validation, the weighted sum, weighting, and the aggregators (fedavg, median, trimmed mean, krum).
- ``optimizers``: server optimizers on the mean delta (sgd, fedexp, fedavgm, fedadam, fedyogi, fedadagrad).
- ``lora_rules``: how LoRA's factors are federated (ab, ffa: A frozen and B federated, svd: FlexLoRA).
- ``bounds``: server-side weight and norm bounds on individual updates; the per-tenant audit.
- ``central_dp``: tenant-level central DP (server clip, Gaussian noise on the sum, RDP accounting).
- ``records``: the round recorder (checkpoints and ``metrics/round_XXX.json``).
- ``run``: the run directory, the initial or resumed adapter, the final summary.
- ``grid``: a Grid that collects replies promptly.
- ``memory``: the server process keeps the memory it frees for the next round (glibc malloc tuning).
- ``release/``: after the rounds: DPO, merge, publish and verify, hot-swap (its own map).
"""
