"""Tenant data: response-only loss, located errors for bad rows, nothing dropped silently.

(Chat templates and multi-turn masks: tests/common/test_templates.py.)"""

from __future__ import annotations

import json

import pytest

from fedlora.common.data import (IGNORE_INDEX, DataError, Example, Message, Preference, format_prompt, read_examples,
                                 read_preferences, tokenize_examples)
from fedlora.common.model import load_tokenizer
from fedlora.common.templates import AlpacaFormat


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("embedded")


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_loss_is_on_response_tokens_only(tok):
    # Prepare: an Alpaca row on the embedded base (no chat template: auto = Alpaca); the
    # expected ids are built the way fedlora always built them, so the default scenario
    # tokenizes byte-identically
    ex = Example.from_alpaca("Extract the visit as JSON.", "Ana Lima, 40, flu.", '{"name": "Ana Lima"}')
    prompt = format_prompt("Extract the visit as JSON.", "Ana Lima, 40, flu.")
    prompt_ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tok('{"name": "Ana Lima"}', add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # Execute
    out = tokenize_examples([ex], tok, max_length=512)
    # Assert: ids are prompt + response + eos; labels mask exactly the prompt
    assert out.input_ids[0] == prompt_ids + response_ids
    assert out.labels[0] == [IGNORE_INDEX] * len(prompt_ids) + response_ids
    assert out.truncated == 0


def test_truncation_is_counted_not_silent(tok):
    ex = Example.from_alpaca("x " * 100, "", "answer " * 20)
    out = tokenize_examples([ex, Example.from_alpaca("short", "", "ok")], tok, max_length=32)
    assert out.truncated == 1
    assert len(out.input_ids[0]) == 32
    assert any(label != IGNORE_INDEX for label in out.labels[0])  # some response survives


def test_alpaca_and_chat_rows_read(tmp_path):
    path = _write(tmp_path / "a.jsonl", [
        {"instruction": "Say hi.", "output": "hi"},
        {"instruction": "Add.", "input": "1+1", "output": "2"},
        {"messages": [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]},
    ])
    rows = read_examples(path)
    alpaca = AlpacaFormat(load_tokenizer("embedded"))
    assert [r.response for r in rows] == ["hi", "2", "pong"]
    assert rows[1].messages == (Message("user", "Add.\n\n1+1"), Message("assistant", "2"))
    assert rows[2].messages == (Message("user", "ping"), Message("assistant", "pong"))
    # the Alpaca template renders both as it always did (a chat row flattened into it)
    assert alpaca.generation_prompt(rows[1]) == "### Instruction:\nAdd.\n\n### Input:\n1+1\n\n### Response:\n"
    assert alpaca.generation_prompt(rows[2]) == format_prompt("Continue the conversation as the assistant.",
                                                              "user: ping")


@pytest.mark.parametrize("row, line, field, what", [
    ('{"instruction": "a", "output": "b"', 2, None, "not valid JSON"),
    ({"instruction": "a"}, 2, "output", "missing"),
    ({"instruction": "a", "output": 3}, 2, "output", "expected a string"),
    ({"instruction": "", "output": "x"}, 2, "instruction", "is empty"),
    ({"text": "x"}, 2, None, "cannot tell the format"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}, 2,
     "messages[1].role", "not one of"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}, 2,
     "messages[1].role", "must be the assistant"),
])
def test_malformed_row_names_file_line_and_field(tmp_path, row, line, field, what):
    path = _write(tmp_path / "bad.jsonl", [{"instruction": "ok", "output": "fine"}, row])
    with pytest.raises(DataError) as err:
        read_examples(path)
    assert err.value.line == line and err.value.field == field
    assert str(path) in str(err.value) and what in str(err.value)


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        read_examples(path)


def test_preference_prompts_are_requests_and_old_templated_files_still_read(tmp_path):
    # Prepare: a new-style row (request + input) and one written with the prompt already templated
    path = _write(tmp_path / "p.jsonl", [
        {"prompt": "Add.", "input": "1+1", "chosen": "2", "rejected": "3"},
        {"prompt": format_prompt("Add.", "1+1"), "chosen": "2", "rejected": "3"},
        {"prompt": format_prompt("Say hi."), "chosen": "hi", "rejected": "no"},
    ])
    # Execute
    prefs = read_preferences(path)
    # Assert: all three are plain requests, and the templated ones read back exactly
    assert prefs == [Preference("Add.", "2", "3", "1+1"), Preference("Add.", "2", "3", "1+1"),
                     Preference("Say hi.", "hi", "no")]
    assert prefs[0].example("rejected") == Example.from_alpaca("Add.", "1+1", "3")


def test_preference_rows(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                        {"prompt": "p", "chosen": "a", "rejected": "a"}])
    with pytest.raises(DataError, match="line 2.*'rejected'.*identical"):
        read_preferences(path)
