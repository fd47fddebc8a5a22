"""Prompt formats: exact assistant-only masks under chat templates and the Alpaca template,
generation that stops at the end-of-turn token, and data.template chosen as documented."""

from __future__ import annotations

import pytest

from fedlora.common.config import parse_config
from fedlora.common.data import IGNORE_INDEX, Example, Message, format_prompt, tokenize_examples
from fedlora.common.model import load_tokenizer
from fedlora.common.templates import AlpacaFormat, ChatTemplateFormat, TemplateError, make_format
from tests.conftest import chatml_tokenizer

# A multi-turn chat row: system, user, assistant, user, assistant.
CONVERSATION = Example((Message("system", "Answer briefly."), Message("user", "Capital of France?"),
                        Message("assistant", "Paris"), Message("user", "And of Italy?"),
                        Message("assistant", "Rome")))

LLAMA3_TEMPLATE = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
# Renders earlier assistant turns differently from the last one (as templates that strip
# reasoning do): a conversation's start is then no prefix of the whole.
UNSTABLE_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
    "<|im_start|>assistant\n(earlier answer)<|im_end|>\n{% else %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def embedded():
    return load_tokenizer("embedded")


@pytest.fixture(scope="module")
def chatml():
    return chatml_tokenizer()


def _labelled(labels: list[int]) -> list[int]:
    return [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]


def test_chatml_mask_covers_every_assistant_turn_and_its_end_token_only(chatml):
    # Prepare: the rendering cut by hand into pieces at token boundaries (special tokens and
    # newlines), each marked whether the loss should see it
    pieces = [("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
               "<|im_start|>assistant\n", False),
              ("Paris<|im_end|>", True),
              ("\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n", False),
              ("Rome<|im_end|>", True),
              ("\n", False)]
    ids, want = [chatml.bos_token_id], []
    for text, loss in pieces:
        part = chatml(text, add_special_tokens=False)["input_ids"]
        want += list(range(len(ids), len(ids) + len(part))) if loss else []
        ids += part
    # Execute
    out = tokenize_examples([CONVERSATION], chatml, max_length=512, template=ChatTemplateFormat(chatml))
    # Assert: the same ids; labels exactly on the tokens of "Paris<|im_end|>" and
    # "Rome<|im_end|>", nothing of the system, user or header turns
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    assert out.input_ids[0] == ids and len(ids) == 70
    # 'P' 'ar' 'is' <|im_end|> at 41..44 and 'R' 'ome' <|im_end|> at 66..68; the final newline (69) is not
    assert _labelled(out.labels[0]) == want == [41, 42, 43, 44, 66, 67, 68]
    assert [out.labels[0][i] for i in want] == [ids[i] for i in want]
    kept = [ids[i] for i in want]
    assert chatml.decode(kept) == "Paris<|im_end|>Rome<|im_end|>"
    assert kept.count(im_end) == 2 and out.truncated == 0


def test_alpaca_template_flattens_a_chat_row_and_learns_its_last_answer(embedded):
    # Prepare: under the Alpaca template the system message is the instruction and the
    # earlier turns the input, as fedlora always did
    prompt = format_prompt("Answer briefly.", "user: Capital of France?\nassistant: Paris\nuser: And of Italy?")
    p = [embedded.bos_token_id] + embedded(prompt, add_special_tokens=False)["input_ids"]
    r = embedded("Rome", add_special_tokens=False)["input_ids"] + [embedded.eos_token_id]
    # Execute
    out = tokenize_examples([CONVERSATION], embedded, max_length=512, template=AlpacaFormat(embedded))
    # Assert
    assert out.input_ids[0] == p + r
    assert out.labels[0] == [IGNORE_INDEX] * len(p) + r


@pytest.mark.parametrize("template, answers", [
    (LLAMA3_TEMPLATE, "Paris<|eot_id|>Rome<|eot_id|>"),
    (MISTRAL_TEMPLATE, "Paris</s>Rome</s>"),
])
def test_other_template_styles_mask_the_answers_and_their_end_token(template, answers):
    # Prepare: Llama-3 (BOS in the template, header tokens) and Mistral ([INST], no system)
    tok = load_tokenizer("embedded")
    tok.add_special_tokens({"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>",
                                                          "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = template
    if template is LLAMA3_TEMPLATE:
        tok.bos_token = "<|begin_of_text|>"  # as in Llama-3's own tokenizer
    turns = CONVERSATION.messages[1:] if template is MISTRAL_TEMPLATE else CONVERSATION.messages
    # Execute
    ids, labels = ChatTemplateFormat(tok).encode(Example(turns))
    # Assert: only the answers and their end-of-turn tokens; the template's own BOS, no second
    assert tok.decode([ids[i] for i in _labelled(labels)]) == answers
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_a_template_whose_start_is_no_prefix_of_the_whole_is_refused():
    tok = chatml_tokenizer()
    tok.chat_template = UNSTABLE_TEMPLATE
    with pytest.raises(TemplateError, match=r"renders the first 3 message\(s\) differently.*data.template=alpaca"):
        tokenize_examples([CONVERSATION], tok, max_length=512, template=ChatTemplateFormat(tok))


def test_generation_prompt_is_the_turns_before_the_last_answer_and_the_cue(chatml):
    fmt = ChatTemplateFormat(chatml)
    assert fmt.generation_prompt(CONVERSATION) == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert fmt.completion(CONVERSATION) == "Rome<|im_end|>"
    assert fmt.stop_ids == {chatml.convert_tokens_to_ids("<|im_end|>")}
    assert fmt.prompt("Add.", "1+1") == "<|im_start|>user\nAdd.\n\n1+1<|im_end|>\n<|im_start|>assistant\n"


def test_truncated_chat_rows_are_counted_and_keep_an_answer(chatml):
    out = tokenize_examples([CONVERSATION], chatml, max_length=24, template=ChatTemplateFormat(chatml))
    assert out.truncated == 1 and len(out.input_ids[0]) == 24
    assert _labelled(out.labels[0])


def test_auto_picks_the_chat_template_only_when_the_tokenizer_has_one(embedded, chatml):
    auto, alpaca = parse_config({}).data, parse_config({"data.template": "alpaca"}).data
    assert isinstance(make_format(auto, embedded), AlpacaFormat)  # the embedded base: today's default
    assert isinstance(make_format(auto, chatml), ChatTemplateFormat)
    assert isinstance(make_format(alpaca, chatml), AlpacaFormat)


def test_chat_template_on_a_base_without_one_says_what_to_do(embedded):
    chat = parse_config({"data.template": "chat"}).data
    with pytest.raises(TemplateError, match=r"data.template=chat.*no chat template.*set data.template=alpaca"):
        make_format(chat, embedded)


def test_default_merge_check_prompts_are_unchanged():
    from fedlora.simulations.release import merge_prompts

    assert merge_prompts(parse_config({})) == (
        format_prompt("Extract the visit as JSON.", "Maria Lopez, 54, was seen for asthma and given salbutamol."),
        format_prompt("Extract the transaction as JSON.", "Card ending 0463 - 12.50 EUR at Maple Cafe."),
        format_prompt("Say hello."))


def test_stop_ids_are_every_generation_config_eos_plus_the_tokenizer_eos_and_the_templates():
    from types import SimpleNamespace

    from fedlora.common.evaluate import stop_token_ids

    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, 5]))
    assert stop_token_ids(model, SimpleNamespace(eos_token_id=2), {9}) == [2, 5, 7, 9]
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=2))
    assert stop_token_ids(model, SimpleNamespace(eos_token_id=2)) == [2]


def test_qwen2_chat_base_tokenizes_trains_and_stops_at_im_end(qwen2_chat_base):
    # Prepare: a tiny random Qwen2 with a ChatML tokenizer; auto picks its chat template
    import torch

    from fedlora.client.train import train
    from fedlora.common.evaluate import evaluate, generate
    from fedlora.common.model import load_model
    from fedlora.common.templates import encode_prompt

    cfg = parse_config({"model.base": str(qwen2_chat_base), "train.local-steps": 150, "train.batch-size": 4,
                        "train.learning-rate": 1e-2, "train.schedule": "constant", "eval.max-new-tokens": 6})
    loaded = load_model(cfg.model, cfg.adapter)
    tok, fmt = loaded.tokenizer, make_format(cfg.data, loaded.tokenizer)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    example = Example((Message("user", "Say ok."), Message("assistant", "ok")))
    data = tokenize_examples([example] * 4, tok, max_length=64, template=fmt)
    # Execute: learn the one answer, then answer
    metrics = train(loaded.model, data, cfg.train, pad_id=tok.pad_token_id, progress=False)
    prompt = fmt.generation_prompt(example)
    answer = generate(loaded.model, tok, [prompt], max_new_tokens=6, batch_size=1, stop_ids=fmt.stop_ids)
    ids = torch.tensor([encode_prompt(tok, prompt)])
    raw = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    raw = raw[0, ids.shape[1]:].tolist()
    # Assert: the mask is "ok<|im_end|>"; unstopped, the model writes on after <|im_end|>, but
    # the answer ends there, without template tokens, and matches exactly
    assert isinstance(fmt, ChatTemplateFormat) and fmt.stop_ids == {im_end}
    assert tok.decode([t for t in data.labels[0] if t != IGNORE_INDEX]) == "ok<|im_end|>"
    assert metrics.steps == 150 and metrics.loss < metrics.first_loss
    assert im_end in raw and any(t != im_end for t in raw[raw.index(im_end):])
    assert answer == ["ok"]
    assert evaluate(loaded.model, tok, [example], cfg.eval, max_length=64, template=fmt).exact_match == 1.0
