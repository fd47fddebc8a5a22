"""Shared pieces of fedlora, imported by client, server and simulations alike (it imports none
of them). Importing it changes nothing: entry points call :func:`fedlora.common.offline.quiet_and_offline`.

- ``config``: the one typed run config (frozen dataclasses), parsed from Flower's flat run-config
- ``model``: base model loading (fp32 / bf16 / NF4) and PEFT attach, the only place that does it
- ``adapter``: adapter state <-> Flower ArrayRecord <-> PEFT directory (safetensors)
- ``data``: JSONL formats, the one prompt template, tokenization with prompt-token masking
- ``evaluate``: exact match, JSON validity and loss of a model on a holdout; forgetting probe
- ``records``: typed records of a run (one round, the federation summary), to and from JSON
- ``messages``: the keys of the messages the apps exchange
- ``packing``: an ArrayRecord of many tensors travels as one packed Array
- ``encoding``: wire encodings of a delta (fp32, bf16, int8 with scales), strict decoding
- ``lora``: LoRA tensor naming (A / B pairs) and rank helpers
- ``weighting``: how a tenant's example count becomes its aggregation weight
- ``secagg``, ``secagg_crypto``, ``secagg_wire``: SecAgg+ shared by both sides (quantizer and
  masks, key agreement and Shamir sharing, the wire format)
- ``credentials``: signing and SuperNode key pairs, written with safe file modes
- ``tls``: the federation's CA and the SuperLink's TLS certificate
- ``files``: atomic directory and file writes, SHA-256 of a file, pickle suffixes, default run dir
- ``offline``: the switches that keep Flower and Hugging Face from calling home
"""
