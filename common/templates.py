"""Prompt formats: how a conversation (:class:`fedlora.common.data.Example`) becomes text and tokens.

One :class:`PromptFormat`, chosen once per run by :func:`make_format` from ``data.template``,
serves every place fedlora turns conversations into tokens: training (ids plus labels
that keep only the assistant's tokens), evaluation (the generation prompt and the stop
tokens), DPO (prompt and completions), the merge check and hot-swap (prompt strings).

* :class:`AlpacaFormat`: the fixed ``### Instruction`` template, for bases without a chat
  template (the embedded one). It has one instruction and one response, so a chat row is
  flattened into it (system messages -> instruction, earlier turns -> input) and only its
  last assistant turn is a target, exactly as fedlora always did.
* :class:`ChatTemplateFormat`: the base tokenizer's own chat template. Every turn is kept,
  and the loss falls on every assistant turn, its end-of-turn token included.

The assistant's tokens under a chat template are found by rendering the conversation
incrementally: the text up to turn k (with the generation prompt) and the text through
turn k must both be prefixes of the whole rendering, and the characters between them are
the assistant's; tokens of the whole rendering are labelled by their character offsets, so
token merges across a boundary cannot shift the mask. A template that renders a
conversation's start differently from the whole (some drop earlier turns' reasoning) is
refused with the first place they part, never given a guessed mask. Templates'
``{% generation %}`` markers are not needed and not relied on: few templates carry them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Sequence

from fedlora.common.data import IGNORE_INDEX, Example, Message, format_prompt

if TYPE_CHECKING:
    from fedlora.common.config import DataConfig


class TemplateError(ValueError):
    """A prompt template cannot be used for these conversations; the message says why and what to do."""


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a formatted text: BOS first (when the tokenizer has one and the text
    does not already start with it, as chat templates often do), no other special tokens.
    Training, generation and the merge check all encode through this rule."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return _bos(tokenizer, text) + ids


def _bos(tokenizer, text: str) -> list[int]:
    bos = tokenizer.bos_token
    if tokenizer.bos_token_id is None or (bos and text.startswith(bos)):
        return []
    return [tokenizer.bos_token_id]


class PromptFormat(ABC):
    """How conversations become text and tokens, for one tokenizer."""

    name: str

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    @abstractmethod
    def encode(self, example: Example) -> tuple[list[int], list[int]]:
        """Token ids of the whole conversation and its labels (-100 on every token that is
        not the assistant's), untruncated."""

    @abstractmethod
    def generation_prompt(self, example: Example) -> str:
        """The text a model continues to answer: every turn before the final assistant
        answer, then the template's cue for the assistant."""

    @abstractmethod
    def completion(self, example: Example) -> str:
        """The final assistant answer as the model should write it after the generation
        prompt (DPO's chosen / rejected texts)."""

    @property
    def stop_ids(self) -> frozenset[int]:
        """Token ids that end an assistant turn under this format (beyond the model's EOS)."""
        return frozenset()

    def prompt(self, request: str, input: str = "") -> str:
        """The generation prompt of a single user request (merge-check and hot-swap prompts)."""
        return self.generation_prompt(Example.from_alpaca(request, input))


def alpaca_fields(example: Example) -> tuple[str, str]:
    """(instruction, input) of an example under the Alpaca template."""
    if example.alpaca is not None:
        return example.alpaca
    context = example.context
    system = "\n".join(m.content for m in context if m.role == "system")
    dialogue = "\n".join(f"{m.role}: {m.content}" for m in context if m.role != "system")
    return system or "Continue the conversation as the assistant.", dialogue


class AlpacaFormat(PromptFormat):
    """BOS + ``### Instruction`` prompt (no loss) + response + EOS (loss)."""

    name = "alpaca"

    def encode(self, example: Example) -> tuple[list[int], list[int]]:
        p = encode_prompt(self.tokenizer, self.generation_prompt(example))
        r = self.tokenizer(example.response, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return p + r, [IGNORE_INDEX] * len(p) + r

    def generation_prompt(self, example: Example) -> str:
        return format_prompt(*alpaca_fields(example))

    def completion(self, example: Example) -> str:
        return example.response


def _dicts(messages: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _parting(a: str, b: str) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"at character {i}: {a[i:i + 40]!r} alone vs {b[i:i + 40]!r} in the whole conversation"


class ChatTemplateFormat(PromptFormat):
    """The tokenizer's chat template; loss on every assistant turn and its end-of-turn token."""

    name = "chat"

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                f"data.template=chat, but the tokenizer of {_name(tokenizer)} has no chat template "
                "(tokenizer.chat_template is unset); set data.template=alpaca (or auto, which falls back to "
                "the Alpaca template), or use a base whose tokenizer_config.json carries a chat_template")
        if not getattr(tokenizer, "is_fast", False):
            raise TemplateError(
                f"data.template=chat needs a fast tokenizer (character offsets locate the assistant's tokens); "
                f"{_name(tokenizer)} loaded a slow one. Install `tokenizers` / convert the tokenizer, or set "
                "data.template=alpaca")
        self._stop: frozenset[int] | None = None

    def _render(self, messages: Sequence[Message], *, generation: bool, where: str = "") -> str:
        try:
            text = self.tokenizer.apply_chat_template(_dicts(messages), tokenize=False,
                                                      add_generation_prompt=generation)
        except Exception as err:  # jinja raises its own errors (e.g. "roles must alternate")
            raise TemplateError(f"{where + ': ' if where else ''}the chat template of {_name(self.tokenizer)} "
                                f"refused {len(messages)} message(s) ({type(err).__name__}: {err}); make the "
                                "conversation fit the template (some refuse system turns or need strict "
                                "user/assistant alternation), or set data.template=alpaca") from err
        return str(text)

    def assistant_spans(self, example: Example) -> tuple[str, list[tuple[int, int]]]:
        """The whole rendering and the character span of each assistant turn in it
        (its content and end-of-turn marker, not the whitespace after)."""
        where = example.where or "a conversation"
        full = self._render(example.messages, generation=False, where=where)
        spans = []
        for k, msg in enumerate(example.messages):
            if msg.role != "assistant":
                continue
            before = self._render(example.messages[:k], generation=True, where=where)
            through = self._render(example.messages[:k + 1], generation=False, where=where)
            for part, label in ((before, f"the first {k} message(s) with the generation prompt"),
                                (through, f"the first {k + 1} message(s)")):
                if not full.startswith(part):
                    raise TemplateError(
                        f"{where}: the chat template of {_name(self.tokenizer)} renders {label} differently "
                        f"than inside the whole conversation ({_parting(part, full)}), so the assistant's "
                        "tokens cannot be told apart; use a template whose rendering of a conversation's start "
                        "is a prefix of the whole, or set data.template=alpaca")
            end = len(through.rstrip())
            if end <= len(before):
                raise TemplateError(f"{where}: the chat template of {_name(self.tokenizer)} renders assistant "
                                    f"turn {k} as nothing; set data.template=alpaca")
            spans.append((len(before), end))
        return full, spans

    def encode(self, example: Example) -> tuple[list[int], list[int]]:
        full, spans = self.assistant_spans(example)
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        bos = _bos(self.tokenizer, full)
        ids = bos + list(enc["input_ids"])
        labels = [IGNORE_INDEX] * len(bos)
        for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            inside = b > a and any(a < e and b > s for s, e in spans)
            labels.append(tid if inside else IGNORE_INDEX)
        return ids, labels

    def generation_prompt(self, example: Example) -> str:
        return self._render(example.context, generation=True, where=example.where)

    def completion(self, example: Example) -> str:
        full, spans = self.assistant_spans(example)
        start, end = spans[-1]
        return full[start:end]

    @property
    def stop_ids(self) -> frozenset[int]:
        """The template's end-of-turn token, when its turn ends in exactly one token."""
        if self._stop is None:
            probe = Example((Message("user", "Hi."), Message("assistant", "Hello.")))
            full, spans = self.assistant_spans(probe)
            start, end = spans[-1]
            tail = full[start:end].split("Hello.", 1)[-1]
            ids = self.tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
            self._stop = frozenset(ids) if len(ids) == 1 else frozenset()
        return self._stop


FORMATS: dict[str, type[PromptFormat]] = {"alpaca": AlpacaFormat, "chat": ChatTemplateFormat}


def _name(tokenizer) -> str:
    return f"model.base {getattr(tokenizer, 'name_or_path', '') or '(unnamed)'}"


def make_format(data: "DataConfig | str", tokenizer) -> PromptFormat:
    """The run's prompt format: ``data.template`` (auto: the chat template when the
    tokenizer has one, else Alpaca). Call once per tokenizer and pass the object on."""
    choice = data if isinstance(data, str) else data.template
    if choice == "auto":
        choice = "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if choice not in FORMATS:
        raise TemplateError(f"data.template={choice!r} is not one of auto, chat, alpaca")
    return FORMATS[choice](tokenizer)
