"""fedlora.common.offline: switches set, and library notices nobody can act on kept out of the logs."""

import logging

from fedlora.common.offline import OFFLINE_ENV, quiet_and_offline


def test_every_switch_is_set_and_returned(monkeypatch):
    # Prepare: a user's own choice for one switch
    for key in OFFLINE_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    # Execute
    env = quiet_and_offline()
    # Assert: the user's value kept, every other switch set to fedlora's
    assert env["HF_HUB_OFFLINE"] == "0"
    assert all(env[k] == v for k, v in OFFLINE_ENV.items() if k != "HF_HUB_OFFLINE")


def test_bitsandbytes_hub_kernel_notice_is_dropped_and_its_other_warnings_kept(caplog):
    # Prepare
    quiet_and_offline()
    quiet_and_offline()  # twice: one filter, not two
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    # Execute
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "No module named 'kernels'")
        logger.warning("some other problem")
    # Assert
    assert [r.getMessage() for r in caplog.records] == ["some other problem"]
    assert len(logger.filters) == 1
