"""The embedded base model's tokenizer: byte-level BPE trained on the pretraining corpus plus
the prompt scaffolding, its round-trip check, and the packing of documents into rows
(:mod:`fedlora.simulations.build_base` trains the model on them).
"""

from __future__ import annotations

import random

from fedlora.common.data import format_prompt

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", "<unk>")  # ids 0, 1, 2, 3


def scaffold_texts() -> list[str]:
    """The prompt scaffolding (template + task instructions), given to the tokenizer only.

    The base model never trains on these; they only get compact token ids (instead of a
    spray of single characters) so fine-tuning examples stay short.
    """
    from fedlora.simulations import synthetic

    texts = []
    for instructions in synthetic.INSTRUCTIONS.values():
        for instruction in instructions:
            texts.append(format_prompt(instruction, "\u2026"))
    return texts * 20


def train_tokenizer(corpus: list[str], vocab_size: int):
    """Byte-level BPE on the corpus (+ prompt scaffolding), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = corpus + scaffold_texts()
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=256, padding_side="right",
                                   clean_up_tokenization_spaces=False)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert fast.convert_tokens_to_ids(t) == i, (t, fast.convert_tokens_to_ids(t))
    return fast


def check_tokenizer(tokenizer) -> dict:
    """Round trip task prompts/answers and report their token lengths."""
    from fedlora.simulations import synthetic

    rng = random.Random("tokenizer-check")
    lengths, out_lengths = [], []
    for i in range(400):
        ex = synthetic.make_example(synthetic.DOMAINS[i % 4], rng)
        prompt = format_prompt(ex["instruction"], ex["input"])
        for text in (prompt, ex["output"]):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            back = tokenizer.decode(ids)
            if back != text:
                raise AssertionError(f"tokenizer round trip failed: {text!r} -> {back!r}")
        p = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        o = len(tokenizer(ex["output"], add_special_tokens=False)["input_ids"])
        lengths.append(1 + p + o + 1)
        out_lengths.append(o + 1)
    return {"example_tokens_mean": sum(lengths) / len(lengths), "example_tokens_max": max(lengths),
            "output_tokens_mean": sum(out_lengths) / len(out_lengths), "output_tokens_max": max(out_lengths)}


def pack(tokenizer, docs: list[str], seq_len: int):
    """<s> doc </s> streams concatenated and cut into rows of seq_len tokens."""
    import torch

    stream: list[int] = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        stream.extend([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id])
    rows = len(stream) // seq_len
    return torch.tensor(stream[: rows * seq_len], dtype=torch.long).view(rows, seq_len), len(stream)


def rare_answer_tokens(tokenizer, corpus: list[str], min_count: int = 20) -> list[str]:
    """Tokens of task answers that the corpus barely trains (their embeddings stay near init)."""
    from collections import Counter

    from fedlora.simulations import synthetic

    counts: Counter = Counter()
    for ids in tokenizer(corpus, add_special_tokens=False)["input_ids"]:
        counts.update(ids)
    rng = random.Random("answer-tokens")
    rare = set()
    for i in range(400):
        ex = synthetic.make_example(synthetic.DOMAINS[i % 4], rng)
        for t in tokenizer(ex["output"], add_special_tokens=False)["input_ids"]:
            if counts[t] < min_count:
                rare.add(tokenizer.convert_ids_to_tokens(t))
    return sorted(rare)
