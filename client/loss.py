"""The training loss, with the output layer applied only where a token is supervised.

A causal LM's forward computes logits for every position: batch x length x vocabulary
floats, and as many again for their gradient. With a real instruct model that dominates a
step (16 x 83 positions x 49,152 words x 4 bytes = 261 MB for SmolLM2-135M) although only
the response tokens carry a loss. :class:`OutputHead` swaps the model's (frozen) output
layer for an identity while training, so the forward returns the last hidden states, and
applies the output layer to the positions whose next token is labelled and to nothing else.
The loss is the same function of the weights; only the unused logits are never made.

Where that would change the model, the full logits stay: an output layer that trains (an
adapter on ``lm_head``), one that is not a plain linear map, or a model that rescales or
soft-caps its logits after the output layer (Gemma-2, Cohere, Granite configs say so).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
# Config fields of architectures that transform logits after the output layer.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@dataclass
class TokenLogits:
    """Logits at the supervised positions of one micro-batch, flattened."""

    logits: torch.Tensor   # (N, vocab), float32: one row per labelled next token
    targets: torch.Tensor  # (N,) the labelled token ids
    rows: torch.Tensor     # (N,) which example of the batch each row belongs to
    batch_size: int

    def mean_loss(self) -> torch.Tensor:
        """Mean NLL over every labelled token of the batch (the usual causal-LM loss)."""
        return F.cross_entropy(self.logits, self.targets, reduction="mean")

    def per_example_loss(self) -> torch.Tensor:
        """Each example's mean NLL over its own labelled tokens, shape (batch,) (DP-SGD's loss)."""
        tok = F.cross_entropy(self.logits, self.targets, reduction="none")
        total = torch.zeros(self.batch_size, dtype=tok.dtype, device=tok.device).index_add(0, self.rows, tok)
        count = torch.zeros(self.batch_size, dtype=tok.dtype, device=tok.device).index_add(
            0, self.rows, torch.ones_like(tok))
        return total / count.clamp(min=1)


def _causal_lm(model) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class OutputHead:
    """Context manager: inside it the model returns hidden states and :meth:`token_logits` makes
    the logits of supervised positions only; outside it the model is unchanged."""

    def __init__(self, model) -> None:
        self._lm = _causal_lm(model)
        head = self._lm.get_output_embeddings() if hasattr(self._lm, "get_output_embeddings") else None
        config = getattr(self._lm, "config", None)
        transforms = [k for k in _LOGIT_TRANSFORMS if getattr(config, k, None) not in (None, 1, 1.0)]
        self.head: nn.Linear | None = head if (
            type(head) is nn.Linear and not any(p.requires_grad for p in head.parameters()) and not transforms
        ) else None
        self._name = next((n for n, m in self._lm.named_modules() if m is head), None) if self.head else None

    @property
    def response_only(self) -> bool:
        """True when the output layer runs only at supervised positions."""
        return self._name is not None

    def _swap(self, module: nn.Module) -> None:
        parent_name, _, attr = self._name.rpartition(".")
        setattr(self._lm.get_submodule(parent_name) if parent_name else self._lm, attr, module)

    def __enter__(self) -> "OutputHead":
        if self.response_only:
            self._swap(nn.Identity())
        return self

    def __exit__(self, *exc) -> None:
        if self.response_only:
            self._swap(self.head)

    def token_logits(self, out: torch.Tensor, labels: torch.Tensor) -> TokenLogits:
        """``out`` is what the model returned as logits: hidden states inside the context (when
        response-only), full logits otherwise. Position t predicts token t + 1."""
        shifted = labels[:, 1:]
        keep = shifted != IGNORE_INDEX
        rows = keep.nonzero()[:, 0]
        picked = out[:, :-1][keep]
        if self.response_only:
            picked = F.linear(picked, self.head.weight, self.head.bias)
        return TokenLogits(logits=picked.float(), targets=shifted[keep], rows=rows, batch_size=labels.shape[0])
