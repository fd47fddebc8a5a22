"""Shared by the tenant-side tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _task_identity():
    """Flower stamps every new Message with the task's run and node (as a SuperNode's task would set them)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    yield
