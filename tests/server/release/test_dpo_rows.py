"""DPO's inputs come from the run's prompt format: Alpaca rows exactly as before, chat-template
rows with the template's prompt and the answer's end-of-turn token."""

from __future__ import annotations

from fedlora.common.data import Preference, format_prompt
from fedlora.common.model import load_tokenizer
from fedlora.common.templates import AlpacaFormat, ChatTemplateFormat
from fedlora.server.release.dpo import dpo_rows
from tests.conftest import chatml_tokenizer

PAIR = Preference("Extract the visit as JSON.", '{"age": 40}', '{"age": 41}', input="Ana Lima, 40, flu.")


def test_alpaca_rows_are_the_templated_prompt_and_the_bare_answers():
    rows = dpo_rows([PAIR], AlpacaFormat(load_tokenizer("embedded")))
    assert rows == [{"prompt": format_prompt("Extract the visit as JSON.", "Ana Lima, 40, flu."),
                     "chosen": '{"age": 40}', "rejected": '{"age": 41}'}]


def test_chat_rows_use_the_template_and_end_each_answer_with_its_end_of_turn_token():
    rows = dpo_rows([PAIR], ChatTemplateFormat(chatml_tokenizer()))
    assert rows == [{"prompt": "<|im_start|>user\nExtract the visit as JSON.\n\nAna Lima, 40, flu.<|im_end|>\n"
                               "<|im_start|>assistant\n",
                     "chosen": '{"age": 40}<|im_end|>', "rejected": '{"age": 41}<|im_end|>'}]
