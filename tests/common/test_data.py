"""Tenant data: response-only loss, located errors for bad rows, nothing dropped silently."""

from __future__ import annotations

import json

import pytest

from common.data import (IGNORE_INDEX, DataError, Example, format_prompt, read_examples, read_preferences,
                         tokenize_examples)
from common.model import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("embedded")


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_loss_is_on_response_tokens_only(tok):
    # Prepare
    ex = Example(prompt=format_prompt("Extract the visit as JSON.", "Ana Lima, 40, flu."),
                 response='{"name": "Ana Lima"}')
    prompt_ids = [tok.bos_token_id] + tok(ex.prompt, add_special_tokens=False)["input_ids"]
    response_ids = tok(ex.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # Execute
    out = tokenize_examples([ex], tok, max_length=512)
    # Assert: ids are prompt + response + eos; labels mask exactly the prompt
    assert out.input_ids[0] == prompt_ids + response_ids
    assert out.labels[0] == [IGNORE_INDEX] * len(prompt_ids) + response_ids
    assert out.truncated == 0


def test_truncation_is_counted_not_silent(tok):
    ex = Example(prompt=format_prompt("x " * 100, ""), response="answer " * 20)
    out = tokenize_examples([ex, Example("short", "ok")], tok, max_length=32)
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
    assert [r.response for r in rows] == ["hi", "2", "pong"]
    assert rows[1].prompt == "### Instruction:\nAdd.\n\n### Input:\n1+1\n\n### Response:\n"
    assert "user: ping" in rows[2].prompt


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


def test_preference_rows(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                        {"prompt": "p", "chosen": "a", "rejected": "a"}])
    with pytest.raises(DataError, match="line 2.*'rejected'.*identical"):
        read_preferences(path)
