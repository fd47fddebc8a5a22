"""Tenant data: JSONL readers, the one prompt template, tokenization with response-only loss.

Three row formats are read:

* Alpaca: ``{"instruction": str, "input": str (optional), "output": str}``
* chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
  (the last message is the assistant's answer; earlier ones form the prompt)
* preference: ``{"prompt": str, "chosen": str, "rejected": str}``

A malformed row stops loading with the file, the line, the field and what is wrong; an
empty file is an error; truncation is counted and reported. Nothing is dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
IGNORE_INDEX = -100


class DataError(ValueError):
    """A problem in a data file, located to file, line and field."""

    def __init__(self, path: str | Path, line: int | None, field: str | None, what: str) -> None:
        where = f"{path}" + (f", line {line}" if line else "") + (f", field {field!r}" if field else "")
        super().__init__(f"{where}: {what}")
        self.path, self.line, self.field = str(path), line, field


@dataclass(frozen=True)
class Example:
    """One supervised example: the prompt (no loss) and the response (loss)."""

    prompt: str
    response: str


@dataclass(frozen=True)
class Preference:
    prompt: str
    chosen: str
    rejected: str


def format_prompt(instruction: str, input: str = "") -> str:
    """The single prompt template every fedlora model is trained and evaluated with."""
    if input:
        return PROMPT_TEMPLATE.format(instruction=instruction, input=input)
    return PROMPT_TEMPLATE_NO_INPUT.format(instruction=instruction)


def _rows(path: Path) -> Iterable[tuple[int, dict]]:
    if not path.is_file():
        raise DataError(path, None, None, "file not found")
    seen = False
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            seen = True
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(path, lineno, None, f"not valid JSON ({err.msg} at column {err.colno}); "
                                "each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise DataError(path, lineno, None, f"expected a JSON object, got {type(row).__name__}")
            yield lineno, row
    if not seen:
        raise DataError(path, None, None, "file is empty; a tenant needs at least one example")


def _text(path: Path, lineno: int, row: dict, field: str, *, required: bool = True) -> str:
    if field not in row:
        if required:
            raise DataError(path, lineno, field, "missing")
        return ""
    value = row[field]
    if not isinstance(value, str):
        raise DataError(path, lineno, field, f"expected a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(path, lineno, field, "is empty")
    return value


def _detect(path: Path, lineno: int, row: dict) -> str:
    if "messages" in row:
        return "chat"
    if "instruction" in row or "output" in row:
        return "alpaca"
    raise DataError(path, lineno, None, "cannot tell the format: expected 'instruction'/'output' "
                    f"(alpaca) or 'messages' (chat); found keys {sorted(row)}")


def _chat_example(path: Path, lineno: int, row: dict) -> Example:
    msgs = row["messages"]
    if not isinstance(msgs, list) or len(msgs) < 2:
        raise DataError(path, lineno, "messages", "expected a list of at least 2 messages")
    parts = []
    for i, msg in enumerate(msgs):
        field = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise DataError(path, lineno, field, "expected an object with 'role' and 'content'")
        role = msg.get("role")
        if role not in ("system", "user", "assistant"):
            raise DataError(path, lineno, f"{field}.role", f"{role!r} is not one of system, user, assistant")
        if not isinstance(msg.get("content"), str):
            raise DataError(path, lineno, f"{field}.content", "missing or not a string")
        parts.append((role, msg["content"]))
    if parts[-1][0] != "assistant":
        raise DataError(path, lineno, f"messages[{len(parts) - 1}].role",
                        "the last message must be the assistant's answer")
    system = "\n".join(c for r, c in parts[:-1] if r == "system")
    dialogue = "\n".join(f"{r}: {c}" for r, c in parts[:-1] if r != "system")
    instruction = system or "Continue the conversation as the assistant."
    return Example(prompt=format_prompt(instruction, dialogue), response=parts[-1][1])


def read_examples(path: str | Path, *, fmt: str = "auto") -> list[Example]:
    """Supervised examples from an Alpaca or chat JSONL file."""
    path = Path(path)
    out = []
    for lineno, row in _rows(path):
        kind = _detect(path, lineno, row) if fmt == "auto" else fmt
        if kind == "chat":
            if "messages" not in row:
                raise DataError(path, lineno, "messages", "missing (data.format is chat)")
            out.append(_chat_example(path, lineno, row))
        else:
            instruction = _text(path, lineno, row, "instruction")
            inp = _text(path, lineno, row, "input", required=False)
            output = _text(path, lineno, row, "output")
            out.append(Example(prompt=format_prompt(instruction, inp), response=output))
    return out


def read_preferences(path: str | Path) -> list[Preference]:
    """Preference pairs for DPO."""
    path = Path(path)
    out = []
    for lineno, row in _rows(path):
        prompt, chosen, rejected = (_text(path, lineno, row, f) for f in ("prompt", "chosen", "rejected"))
        if chosen == rejected:
            raise DataError(path, lineno, "rejected", "identical to 'chosen'; a preference needs two answers")
        out.append(Preference(prompt, chosen, rejected))
    return out


def read_texts(path: str | Path) -> list[str]:
    """Plain texts (``{"text": ...}`` rows), e.g. the forgetting probe."""
    path = Path(path)
    return [_text(path, lineno, row, "text") for lineno, row in _rows(path)]


@dataclass(frozen=True)
class Tokenized:
    """Token ids and labels (prompt tokens masked with -100) of a set of examples."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    truncated: int  # examples cut to max_length (their response is partly lost)
    tokens: int     # total tokens kept

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_examples(examples: list[Example], tokenizer, *, max_length: int) -> Tokenized:
    """Prompt + response + EOS; loss only on the response and EOS.

    An example longer than ``max_length`` keeps its prompt's end and the response's
    start and is counted in ``truncated``; one whose response would vanish entirely is
    an error, never a silent drop.
    """
    ids_all, labels_all, truncated, tokens = [], [], 0, 0
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for i, ex in enumerate(examples):
        p = bos + tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(p) + len(r) > max_length:
            truncated += 1
            keep_r = max(1, max_length - len(p)) if len(p) < max_length else max(1, max_length // 4)
            r = r[:keep_r]
            p = p[-(max_length - len(r)):]
        ids = p + r
        labels = [IGNORE_INDEX] * len(p) + r
        ids_all.append(ids)
        labels_all.append(labels)
        tokens += len(ids)
    return Tokenized(ids_all, labels_all, truncated, tokens)


def collate(input_ids: list[list[int]], labels: list[list[int]] | None, pad_id: int, *,
            left: bool = False):
    """Pad a batch to its longest row; returns torch tensors (ids, attention_mask, labels)."""
    import torch

    width = max(len(x) for x in input_ids)
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    lab = torch.full((len(input_ids), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(input_ids):
        sl = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, sl] = torch.tensor(row)
        mask[i, sl] = 1
        if labels is not None:
            lab[i, sl] = torch.tensor(labels[i])
    return ids, mask, lab


def tenant_paths(data_dir: str | Path, partition_id: int) -> tuple[Path, Path]:
    """(train, holdout) files of tenant ``partition_id`` in a simulation data directory."""
    root = Path(data_dir) / f"tenant_{partition_id:03d}"
    return root / "train.jsonl", root / "holdout.jsonl"


def holdout_for(train_path: str | Path) -> Path:
    """A deployment tenant's holdout lives beside its training file: X.jsonl -> X.holdout.jsonl,
    or holdout.jsonl next to train.jsonl."""
    train_path = Path(train_path)
    if train_path.name == "train.jsonl":
        return train_path.with_name("holdout.jsonl")
    return train_path.with_name(train_path.stem + ".holdout.jsonl")
