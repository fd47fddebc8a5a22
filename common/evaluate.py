"""The one evaluation function: exact match and JSON validity by greedy generation,
response perplexity, and the forgetting probe (loss on the base's own kind of text)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch

from common.config import EvalConfig
from common.data import IGNORE_INDEX, Example, collate, tokenize_examples


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


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int,
             device: torch.device | str = "cpu") -> list[str]:
    """Greedy answers (left-padded batches, stop at EOS)."""
    model.eval()
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    outs: list[str] = []
    pad = tokenizer.pad_token_id
    for start in range(0, len(prompts), batch_size):
        chunk = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start:start + batch_size]]
        ids, mask, _ = collate(chunk, None, pad, left=True)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, use_cache=True)
        new = gen[:, ids.shape[1]:]
        outs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
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
             device: torch.device | str = "cpu") -> EvalMetrics:
    """Exact match, JSON validity and response perplexity on a holdout."""
    if not examples:
        raise ValueError("no evaluation examples")
    preds = generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens=cfg.max_new_tokens,
                     batch_size=cfg.batch_size, device=device)
    exact = sum(is_exact(p, e.response) for p, e in zip(preds, examples))
    valid = sum(_parse(p.strip())[0] for p in preds)
    tok = tokenize_examples(examples, tokenizer, max_length=max_length)
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
