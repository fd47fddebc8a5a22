"""Keys of the records that travel between the ServerApp and the ClientApps.

Both sides import these names so a reply can be validated against exactly what a
well-behaved client sends: the adapter delta, the example count and a fixed set of
scalar metrics — no text, no token ids, no base weights.
"""

from __future__ import annotations

ARRAYS = "arrays"    # ArrayRecord: global adapter (server -> client) or delta (client -> server)
CONFIG = "config"    # ConfigRecord: per-round instructions (server -> client)
METRICS = "metrics"  # MetricRecord: scalar results (client -> server)

# ConfigRecord keys sent by the server.
ROUND = "server-round"
SEED = "seed"
# True: evaluate the adapter this message carries before training on it, and reply with the
# evaluation metrics beside the update (federation.evaluate-with-train).
EVALUATE_FIRST = "evaluate-first"
EVALUATION = "evaluation"  # MetricRecord of such a reply: EVAL_METRICS of the adapter it was sent

# MetricRecord keys in every reply.
NUM_EXAMPLES = "num-examples"  # FedAvg weight (training) / holdout size (evaluation)
TENANT = "tenant-id"           # the tenant's number (partition id or node-config tenant-id)

# The tenant's cumulative local-DP epsilon (its privacy ledger, across rounds and runs) after
# this update; 0 when local DP is off.
DP_EPSILON = "dp-epsilon"

# Error code of a train reply from a tenant that declines (its privacy budget is spent).
DECLINED = 4030
# Error code of a reply from a tenant whose own policy declines the task (fedlora.client.policy).
POLICY_DECLINED = 4032
# Error code of a reply from a tenant under a policy whose handler failed: the reason is a
# short public text; the details stay in the node's log.
TENANT_ERROR = 4033

# Keys every reply carries; a tenant may withhold any other metric (its policy says which leave).
REQUIRED_METRICS = frozenset({NUM_EXAMPLES, TENANT})

TRAIN_METRICS = frozenset({
    NUM_EXAMPLES, TENANT, "train-loss", "train-first-loss", "train-steps", "train-tokens",
    "train-seconds", "truncated", DP_EPSILON,
})
EVAL_METRICS = frozenset({
    NUM_EXAMPLES, TENANT, "eval-exact-match", "eval-json-valid", "eval-loss", "eval-seconds",
})

# Under secure aggregation the example count (the FedAvg weight) travels only inside the
# masked vector, and counts that reveal data size are not sent at all.
SECAGG_TRAIN_METRICS = TRAIN_METRICS - {NUM_EXAMPLES, "train-tokens", "truncated"}
# Error code of a secure-aggregation stage reply from a tenant that refuses the request.
SECAGG_REFUSED = 4031
