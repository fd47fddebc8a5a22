"""The one local training function: tenants' clients, local-only and pooled baselines all use it.

``train(model, data, cfg)`` knows nothing about Flower. It runs ``cfg.local_steps``
optimizer steps of AdamW over shuffled micro-batches (gradient accumulation, warm-up and
a decaying schedule), seeded and deterministic on CPU, with a progress bar, and returns
plain metrics.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from fedlora.client.loss import OutputHead
from fedlora.client.privacy import ClientPrivacy, NoPrivacy
from fedlora.client.prox import NoProximal
from fedlora.common.config import TrainConfig
from fedlora.common.data import Tokenized, collate


@dataclass(frozen=True)
class TrainMetrics:
    loss: float        # mean training loss over the last quarter of the steps
    first_loss: float  # loss of the first step
    steps: int         # optimizer steps taken
    examples: int      # examples seen (with repeats)
    tokens: int        # tokens seen (with repeats, padding excluded)
    seconds: float

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


class _Rows(Dataset):
    def __init__(self, data: Tokenized) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.data.input_ids[i], self.data.labels[i]


def make_loader(data: Tokenized, batch_size: int, pad_id: int, seed: int) -> DataLoader:
    """Shuffled micro-batches, reproducible for a given seed."""
    gen = torch.Generator().manual_seed(seed)

    def _collate(rows):
        ids, mask, labels = collate([r[0] for r in rows], [r[1] for r in rows], pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return DataLoader(_Rows(data), batch_size=min(batch_size, len(data)), shuffle=True,
                      generator=gen, collate_fn=_collate, drop_last=False)


def _forever(loader: DataLoader):
    while True:
        yield from loader


def make_schedule(optimizer, cfg: TrainConfig, steps: int, *, start: int = 0):
    """``cfg.schedule`` over ``steps`` optimizer steps, advanced to step ``start``.

    A federated tenant trains one window of its whole budget per round: the schedule spans
    ``rounds x local_steps`` and round r starts at ``(r - 1) x local_steps``, so warm-up
    happens once and the rate decays over the run, exactly as for the local-only and pooled
    baselines, whose single window is their whole budget."""
    from transformers import get_scheduler

    if not 0 <= start <= steps:
        raise ValueError(f"schedule start {start} outside 0..{steps}")
    schedule = get_scheduler(cfg.schedule, optimizer, num_warmup_steps=int(cfg.warmup_ratio * steps),
                             num_training_steps=steps)
    if start:
        from torch.optim.lr_scheduler import LambdaLR

        schedule = LambdaLR(optimizer, [lambda step, f=f: f(step + start) for f in schedule.lr_lambdas])
    return schedule


@contextmanager
def checkpointing(model, enabled: bool):
    """Gradient checkpointing for the block: activations are recomputed in the backward pass.
    Reentrant, because Opacus' per-sample hooks and ghost clipping break under the
    non-reentrant variant; the inputs then need ``requires_grad`` for the adapter's
    gradients to flow through the recomputed segments."""
    if not enabled:
        yield
        return
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    lm.enable_input_require_grads()
    try:
        yield
    finally:
        lm.activation_checkpointing_disable()
        lm.disable_input_require_grads()


def autocast(device: torch.device | str):
    """bf16 autocast on CUDA (fp32 master weights and adapter); nothing on CPU, where bf16
    matmuls are several times slower than fp32 on common hardware."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def train(model, data: Tokenized, cfg: TrainConfig, *, pad_id: int, device: torch.device | str = "cpu",
          steps: int | None = None, seed: int | None = None, progress: bool = True,
          desc: str = "train", privacy: ClientPrivacy | None = None,
          schedule_window: tuple[int, int] | None = None, proximal: NoProximal | None = None,
          after_step: Callable[[], None] | None = None) -> TrainMetrics:
    """Train the trainable (adapter) parameters of ``model`` in place.

    ``steps`` overrides ``cfg.local_steps`` (the pooled baseline takes the summed budget);
    ``seed`` overrides ``cfg.seed`` (clients fold in their tenant id and the round).
    ``schedule_window=(start, total)`` runs steps ``start .. start + steps`` of a schedule
    spanning ``total`` steps (a federated round's share of the tenant's budget; default: the
    schedule spans exactly these ``steps``).
    ``privacy`` wraps model, optimizer and batches and chooses the loss (default
    :class:`fedlora.client.privacy.NoPrivacy`); the loop is the same with or without DP-SGD.
    ``proximal`` pulls the adapter toward where it started after every step (FedProx,
    :class:`fedlora.client.prox.Proximal`; default :class:`fedlora.client.prox.NoProximal`, nothing).
    ``after_step()`` runs after every step, last (``fedlora.client.lora_rules``: a lower-rank
    tenant's unused components held at zero).
    """
    from tqdm.auto import tqdm

    if len(data) == 0:
        raise ValueError("no training examples")
    steps = cfg.local_steps if steps is None else steps
    seed = cfg.seed if seed is None else seed
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; attach an adapter first")
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    start, total = (0, steps) if schedule_window is None else schedule_window
    if start + steps > total:
        raise ValueError(f"schedule window {start}+{steps} steps exceeds its span of {total}")
    schedule = make_schedule(optimizer, cfg, total, start=start)
    privacy = NoPrivacy() if privacy is None else privacy
    proximal = NoProximal() if proximal is None else proximal
    proximal.start(params)  # before any step: the parameters hold the round's global adapter
    head = OutputHead(model)  # the output layer only where a token is supervised (fedlora.client.loss)
    with checkpointing(model, cfg.gradient_checkpointing), head:
        model, optimizer, loader = privacy.prepare(model, optimizer,
                                                   make_loader(data, cfg.batch_size, pad_id, seed))
        batches = _forever(loader)
        model.train()
        losses: list[float] = []
        examples = tokens = 0
        start = time.perf_counter()
        bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, unit="step")
        for _ in bar:
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for _micro in range(cfg.grad_accum):
                batch = {k: v.to(device) for k, v in next(batches).items()}
                with autocast(device):
                    out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
                    if batch["input_ids"].shape[0] == 0:  # Poisson drew no example: a noise-only DP step
                        loss = out.logits.sum() * 0.0
                    else:
                        loss = privacy.loss(head.token_logits(out.logits, batch["labels"]))
                (loss / cfg.grad_accum).backward()
                step_loss += loss.item() / cfg.grad_accum
                examples += batch["input_ids"].shape[0]
                tokens += int(batch["attention_mask"].sum())
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"training loss became {step_loss}; lower train.learning-rate")
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            proximal.after_step(optimizer.param_groups[0]["lr"])  # this step's rate, before the schedule moves
            if after_step is not None:
                after_step()
            schedule.step()
            losses.append(step_loss)
            bar.set_postfix(loss=f"{step_loss:.3f}")
        model.eval()
        privacy.after_train()
    tail = losses[-max(1, len(losses) // 4):]
    return TrainMetrics(loss=sum(tail) / len(tail), first_loss=losses[0], steps=steps,
                        examples=examples, tokens=tokens, seconds=time.perf_counter() - start)
