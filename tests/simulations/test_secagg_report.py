"""The report says whether secure aggregation was on and, per round, who dropped where."""

from __future__ import annotations

from fedlora.common.config import parse_config
from fedlora.simulations.report import secagg_section
from tests.common.make_records import round_record

CFG = parse_config({"secagg.enabled": True, "secagg.neighbours": 0, "secagg.threshold": 0.5, "secagg.clip": 8.0,
                    "secagg.quantization-bits": 22, "secagg.modulus-bits": 32})


def test_rounds_table_lists_finishers_and_drops_per_stage():
    rounds = [
        round_record(1, secagg={"enabled": True, "attempts": 2, "finished": 4, "failure": None,
                                "dropped_per_stage": {"setup": 1, "key sharing": 0, "masked upload": 0,
                                                      "unmasking": 0}}),
        round_record(2, secagg={"enabled": True, "attempts": 1, "finished": 0, "failure": "below threshold",
                                "dropped_per_stage": {"setup": 0, "key sharing": 0, "masked upload": 3,
                                                      "unmasking": 0}}),
    ]
    text = "\n".join(secagg_section(CFG, rounds))
    assert "On (SecAgg+)" in text and "Neighbours per tenant: all" in text
    assert "| 1 | 2 | 4 | 1 | 0 | 0 | 0 | - |" in text
    assert "| 2 | 1 | 0 | 0 | 0 | 3 | 0 | below threshold |" in text


def test_off_is_said_plainly():
    text = "\n".join(secagg_section(parse_config({}), []))
    assert "Off: the server saw each tenant's individual delta." in text
