"""The one evaluation function: exact match and JSON validity by greedy generation,
response perplexity, and the forgetting probe (loss on the base's own kind of text).

Generation stops at the model's end-of-turn tokens (every EOS id of its generation config,
the tokenizer's EOS, and the prompt format's end-of-turn token, e.g. ``<|im_end|>`` or
``<|eot_id|>``); answers are compared without template tokens."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Iterable

import torch

from fedlora.common.config import EvalConfig
from fedlora.common.data import IGNORE_INDEX, Example, collate, tokenize_examples
from fedlora.common.templates import PromptFormat, encode_prompt, make_format


@dataclass(frozen=True)
class EvalMetrics:
    exact_match: float  # share of answers equal to the reference (JSON compared as objects)
    json_valid: float   # share of answers that parse as JSON
    loss: float         # mean response-token NLL under teacher forcing
    perplexity: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def _parse(text: str):
    try:
        return True, json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return False, None


def is_exact(pred: str, ref: str) -> bool:
    """Answers match when both parse to the same JSON value, or as stripped strings."""
    ok_ref, ref_obj = _parse(ref.strip())
    if ok_ref:
        ok_pred, pred_obj = _parse(pred.strip())
        return ok_pred and pred_obj == ref_obj
    return pred.strip() == ref.strip()


def stop_token_ids(model, tokenizer, extra: Iterable[int] = ()) -> list[int]:
    """Every id that ends an answer: the generation config's EOS ids (an int or a list),
    the tokenizer's EOS and ``extra`` (the prompt format's end-of-turn token)."""
    ids: set[int] = set(extra)
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else list(eos or []))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int,
             device: torch.device | str = "cpu", stop_ids: Iterable[int] = ()) -> list[str]:
    """Greedy answers to already-formatted prompts (left-padded batches), each cut at its
    first stop token (:func:`stop_token_ids`) and decoded without special tokens, stripped."""
    model.eval()
    outs: list[str] = []
    pad = tokenizer.pad_token_id
    stops = stop_token_ids(model, tokenizer, stop_ids)
    for start in range(0, len(prompts), batch_size):
        chunk = [encode_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
        ids, mask, _ = collate(chunk, None, pad, left=True)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad, eos_token_id=stops, use_cache=True)
        for row in gen[:, ids.shape[1]:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            outs.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return outs


@torch.no_grad()
def token_loss(model, input_ids: list[list[int]], labels: list[list[int]], pad_id: int, *,
               batch_size: int, device: torch.device | str = "cpu") -> float:
    """Mean NLL over the labelled tokens (summed over the set, not averaged per batch)."""
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(input_ids), batch_size):
        ids, mask, lab = collate(input_ids[s:s + batch_size], labels[s:s + batch_size], pad_id)
        ids, mask, lab = ids.to(device), mask.to(device), lab.to(device)
        logits = model(ids, attention_mask=mask).logits.float()
        shift_logits, shift_labels = logits[:, :-1], lab[:, 1:]
        nll = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                                shift_labels.reshape(-1), ignore_index=IGNORE_INDEX,
                                                reduction="sum")
        total += float(nll)
        count += int((shift_labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


def evaluate(model, tokenizer, examples: list[Example], cfg: EvalConfig, *, max_length: int,
             device: torch.device | str = "cpu", template: PromptFormat | None = None) -> EvalMetrics:
    """Exact match, JSON validity and assistant-token perplexity on a holdout, every example
    through ``template`` (default: ``data.template=auto`` for this tokenizer)."""
    if not examples:
        raise ValueError("no evaluation examples")
    template = template or make_format("auto", tokenizer)
    preds = generate(model, tokenizer, [template.generation_prompt(e) for e in examples],
                     max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, device=device,
                     stop_ids=template.stop_ids)
    exact = sum(is_exact(p, e.response) for p, e in zip(preds, examples))
    valid = sum(_parse(p.strip())[0] for p in preds)
    tok = tokenize_examples(examples, tokenizer, max_length=max_length, template=template)
    loss = token_loss(model, tok.input_ids, tok.labels, tokenizer.pad_token_id,
                      batch_size=cfg.batch_size, device=device)
    n = len(examples)
    return EvalMetrics(exact_match=exact / n, json_valid=valid / n, loss=loss,
                       perplexity=math.exp(min(loss, 50.0)), n=n)


def probe_loss(model, tokenizer, texts: list[str], *, batch_size: int, max_length: int,
               device: torch.device | str = "cpu") -> float:
    """Forgetting probe: mean token NLL on plain text of the base's own kind."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = [(bos + tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:max_length]
           for t in texts]
    return token_loss(model, ids, ids, tokenizer.pad_token_id, batch_size=batch_size, device=device)
