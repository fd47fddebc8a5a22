"""Nothing fedlora starts calls home: set the switches before the libraries read them."""

from __future__ import annotations

import logging
import os
import warnings

# Switches that stop telemetry, update checks, runtime installs and hub look-ups.
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray otherwise finds its node address by "connecting" towards a public DNS server
    # and binds to that interface; this keeps the simulation engine on 127.0.0.1.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "TOKENIZERS_PARALLELISM": "false",
    # Quiet: no per-file "Loading weights" bars inside every tenant's log.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def _not_a_hub_kernel_notice(record: logging.LogRecord) -> bool:
    """bitsandbytes, on CPUs with AVX512-BF16, tries to fetch a 4-bit kernel from the hub
    (``kernels-community``) and logs a warning when it cannot; offline, it always cannot and
    falls back to its own kernel. Nothing a user can act on."""
    return "kernels-community" not in record.getMessage()


def quiet_and_offline() -> dict[str, str]:
    """Set every switch not already set by the user; returns the environment to pass on.

    A user may still opt in to the hub by exporting ``HF_HUB_OFFLINE=0`` themselves.
    """
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    # PEFT reads transformers' deprecated alias whenever it wraps a model; nothing a user
    # can act on, printed once per process (every tenant's log).
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # Adapters name their base portably (not by a path), so PEFT cannot open the base's
    # config when it saves one and says so; the vocabulary check it skips is ours to make
    # (the base fingerprint), not a problem.
    warnings.filterwarnings("ignore", message=r"Could not find a config file in ", category=UserWarning)
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if _not_a_hub_kernel_notice not in bnb.filters:
        bnb.addFilter(_not_a_hub_kernel_notice)
    return {key: os.environ[key] for key in OFFLINE_ENV}
