"""Tenant data: JSONL readers, conversations, tokenization with assistant-only loss.

Three row formats are read:

* Alpaca: ``{"instruction": str, "input": str (optional), "output": str}``
* chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
  (every turn is kept; the last message is the assistant's answer)
* preference: ``{"prompt": str, "input": str (optional), "chosen": str, "rejected": str}``
  (``prompt`` is the user's request, formatted when it is used)

Every row becomes an :class:`Example`, a conversation; how a conversation becomes tokens
(the Alpaca template or the base's chat template) is :mod:`fedlora.common.templates`' business.
A malformed row stops loading with the file, the line, the field and what is wrong; an
empty file is an error; truncation is counted and reported. Nothing is dropped silently.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from fedlora.common.templates import PromptFormat

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
# A preference prompt written by older fedlora versions: already in the Alpaca template.
_LEGACY_PROMPT = re.compile(r"\A### Instruction:\n(?P<instruction>.*?)\n\n(?:### Input:\n(?P<input>.*)\n\n)?"
                            r"### Response:\n\Z", re.DOTALL)


class DataError(ValueError):
    """A problem in a data file, located to file, line and field."""

    def __init__(self, path: str | Path, line: int | None, field: str | None, what: str) -> None:
        where = f"{path}" + (f", line {line}" if line else "") + (f", field {field!r}" if field else "")
        super().__init__(f"{where}: {what}")
        self.path, self.line, self.field = str(path), line, field


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: str  # system, user or assistant
    content: str


@dataclass(frozen=True)
class Example:
    """One supervised conversation: its turns in order, the last one the assistant's answer
    (an example built only to prompt, e.g. a merge-check request, may end on a user turn)."""

    messages: tuple[Message, ...]
    # The instruction and input of an Alpaca row, so the Alpaca template renders it exactly
    # as it always has; None for chat rows.
    alpaca: tuple[str, str] | None = None
    # Where the example came from ("file, line N"), for error messages only.
    where: str = field(default="", compare=False)

    @classmethod
    def from_alpaca(cls, instruction: str, input: str = "", output: str | None = None, *,
                    where: str = "") -> "Example":
        """A user turn (instruction, a blank line, input) and, when given, the assistant's output."""
        user = Message("user", f"{instruction}\n\n{input}" if input else instruction)
        turns = (user,) if output is None else (user, Message("assistant", output))
        return cls(turns, alpaca=(instruction, input), where=where)

    @property
    def context(self) -> tuple[Message, ...]:
        """The turns before the final assistant answer (all turns when there is none)."""
        return self.messages[:-1] if self.messages[-1].role == "assistant" else self.messages

    @property
    def response(self) -> str:
        """The final assistant answer ("" for a prompt-only example)."""
        return self.messages[-1].content if self.messages[-1].role == "assistant" else ""


@dataclass(frozen=True)
class Preference:
    """A preference pair: the user's request (raw, not templated), a better and a worse answer."""

    prompt: str
    chosen: str
    rejected: str
    input: str = ""  # optional record the request is about, as in an Alpaca row

    def example(self, side: str) -> Example:
        """The conversation of the request answered by ``side`` ("chosen" or "rejected")."""
        return Example.from_alpaca(self.prompt, self.input, getattr(self, side))

    def request(self) -> Example:
        """The request alone, to prompt with."""
        return Example.from_alpaca(self.prompt, self.input)


def format_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca template: the prompt of bases without a chat template (data.template=alpaca)."""
    if input:
        return PROMPT_TEMPLATE.format(instruction=instruction, input=input)
    return PROMPT_TEMPLATE_NO_INPUT.format(instruction=instruction)


def parse_alpaca_prompt(prompt: str) -> tuple[str, str] | None:
    """(instruction, input) of a prompt already in the Alpaca template, else None."""
    m = _LEGACY_PROMPT.match(prompt)
    if m is None:
        return None
    fields = m.group("instruction"), m.group("input") or ""
    return fields if format_prompt(*fields) == prompt else None


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
    turns = []
    for i, msg in enumerate(msgs):
        field = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise DataError(path, lineno, field, "expected an object with 'role' and 'content'")
        role = msg.get("role")
        if role not in ROLES:
            raise DataError(path, lineno, f"{field}.role", f"{role!r} is not one of system, user, assistant")
        if not isinstance(msg.get("content"), str):
            raise DataError(path, lineno, f"{field}.content", "missing or not a string")
        turns.append(Message(role, msg["content"]))
    if turns[-1].role != "assistant":
        raise DataError(path, lineno, f"messages[{len(turns) - 1}].role",
                        "the last message must be the assistant's answer")
    return Example(tuple(turns), where=f"{path}, line {lineno}")


def read_examples(path: str | Path, *, fmt: str = "auto") -> list[Example]:
    """Supervised conversations from an Alpaca or chat JSONL file (``fmt``: the row format)."""
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
            out.append(Example.from_alpaca(instruction, inp, output, where=f"{path}, line {lineno}"))
    return out


def read_preferences(path: str | Path) -> list[Preference]:
    """Preference pairs for DPO.

    ``prompt`` is the user's request, templated when used. Files written by earlier
    versions hold prompts already in the Alpaca template; those are read back into their
    instruction and input, so they keep working (and render identically under the Alpaca
    template)."""
    path = Path(path)
    out = []
    for lineno, row in _rows(path):
        prompt, chosen, rejected = (_text(path, lineno, row, f) for f in ("prompt", "chosen", "rejected"))
        inp = _text(path, lineno, row, "input", required=False)
        if chosen == rejected:
            raise DataError(path, lineno, "rejected", "identical to 'chosen'; a preference needs two answers")
        legacy = None if inp else parse_alpaca_prompt(prompt)
        if legacy is not None:
            prompt, inp = legacy
        out.append(Preference(prompt, chosen, rejected, inp))
    return out


def read_texts(path: str | Path) -> list[str]:
    """Plain texts (``{"text": ...}`` rows), e.g. the forgetting probe."""
    path = Path(path)
    return [_text(path, lineno, row, "text") for lineno, row in _rows(path)]


@dataclass(frozen=True)
class Tokenized:
    """Token ids and labels (every non-assistant token masked with -100) of a set of examples."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    truncated: int  # examples cut to max_length (their response is partly lost)
    tokens: int     # total tokens kept

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_examples(examples: list[Example], tokenizer, *, max_length: int,
                      template: "PromptFormat | None" = None) -> Tokenized:
    """Each conversation through ``template`` (default: ``data.template=auto`` for this
    tokenizer); loss only on the assistant turns and their end-of-turn tokens.

    An example longer than ``max_length`` keeps the end of what precedes the first
    assistant turn and the start of the rest, and is counted in ``truncated``; one whose
    answer would vanish entirely is an error, never a silent drop.
    """
    if template is None:
        from fedlora.common.templates import make_format

        template = make_format("auto", tokenizer)
    ids_all, labels_all, truncated, tokens = [], [], 0, 0
    for i, ex in enumerate(examples):
        ids, labels = template.encode(ex)
        first = next((k for k, lab in enumerate(labels) if lab != IGNORE_INDEX), None)
        if first is None:
            raise ValueError(f"{ex.where or f'example {i}'}: the {template.name} template left no assistant "
                             "token to learn from; every training example needs an assistant answer")
        if len(ids) > max_length:
            truncated += 1
            p, r, rl = ids[:first], ids[first:], labels[first:]
            keep_r = max(1, max_length - len(p)) if len(p) < max_length else max(1, max_length // 4)
            r, rl = r[:keep_r], rl[:keep_r]
            p = p[-(max_length - len(r)):]
            ids, labels = p + r, [IGNORE_INDEX] * len(p) + rl
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
