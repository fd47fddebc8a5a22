"""Shared pieces of fedlora: config, model loading, adapters, data, evaluation."""

from common.offline import quiet_and_offline as _quiet_and_offline

# Before any Flower / Hugging Face module reads its switches.
_quiet_and_offline()
