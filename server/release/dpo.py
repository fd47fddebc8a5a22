"""Central DPO refinement of the aggregated adapter, with TRL's ``DPOTrainer``.

The aggregate is loaded as a trainable PEFT adapter; TRL copies it into a frozen
``ref`` adapter, so the reference policy *is* the aggregate and never moves (checked
after training: :attr:`DPOReport.reference_drift` is the largest change of any reference
tensor and must be 0). Held-out preference metrics are computed here from sequence
log-probabilities of chosen vs rejected answers, before and after:

* preference accuracy: share of pairs where the model gives the chosen answer a higher
  log-probability than the rejected one;
* log-prob margin: mean ``log p(chosen) - log p(rejected)``;
* reward margin / reward accuracy: DPO's implicit reward
  ``beta * (log p(y) - log p_ref(y))``, chosen minus rejected (0 before, by definition).

Preference prompts are users' requests; the run's prompt format (``data.template``) turns
them into the prompt TRL trains on and into the conversations scored here, so DPO sees
the same text as training and evaluation.

DPO trains the factors the run federates: under ``federation.lora-rule = ffa`` every
``lora_A`` stays frozen at the aggregate's (the shared initial A), so the refined adapter
keeps FFA-LoRA's A; :attr:`DPOReport.trained_factors` says which, and the A factors are
checked unchanged after training.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from fedlora.common.config import Config
from fedlora.common.data import IGNORE_INDEX, Preference, collate, read_preferences, tokenize_examples
from fedlora.common.lora import is_a
from fedlora.common.templates import PromptFormat, make_format


@dataclass(frozen=True)
class PreferenceSets:
    """The central preference pairs: ``train`` for DPO, ``holdout`` to measure it."""

    train: list[Preference]
    holdout: list[Preference]


def read_preference_sets(directory: str | Path) -> PreferenceSets:
    """``train.jsonl`` and ``holdout.jsonl`` (rows ``prompt``/``chosen``/``rejected``)."""
    directory = Path(directory)
    return PreferenceSets(read_preferences(directory / "train.jsonl"),
                          read_preferences(directory / "holdout.jsonl"))


@dataclass(frozen=True)
class PreferenceScores:
    accuracy: float         # share of pairs with log p(chosen) > log p(rejected)
    logp_margin: float      # mean log p(chosen) - log p(rejected), in nats
    reward_accuracy: float  # share of pairs whose implicit reward prefers chosen (strictly)
    reward_margin: float    # mean implicit reward of chosen minus rejected
    n: int


@dataclass(frozen=True)
class DPOReport:
    before: PreferenceScores  # the aggregate (= the reference)
    after: PreferenceScores   # the refined adapter
    steps: int
    train_pairs: int
    train_loss: float
    beta: float
    learning_rate: float
    reference_drift: float    # max |ref adapter after training - aggregate|; 0 = frozen
    seconds: float
    trained_factors: str = "A and B"  # "B" under federation.lora-rule = ffa (every lora_A frozen, unchanged)

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def sequence_logps(model, tokenizer, pairs: list[Preference], *, max_length: int, batch_size: int = 16,
                   device: torch.device | str = "cpu", template: PromptFormat | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-probabilities of the chosen and of the rejected answers (incl. their
    end-of-turn token), each given its prompt, tokenized exactly as fedlora trains and
    evaluates (``template``; default ``data.template=auto`` for this tokenizer)."""
    model.eval()
    template = template or make_format("auto", tokenizer)
    out = []
    for side in ("chosen", "rejected"):
        tok = tokenize_examples([p.example(side) for p in pairs], tokenizer, max_length=max_length,
                                template=template)
        sums: list[float] = []
        for s in range(0, len(tok), batch_size):
            ids, mask, lab = collate(tok.input_ids[s:s + batch_size], tok.labels[s:s + batch_size],
                                     tokenizer.pad_token_id)
            logits = model(ids.to(device), attention_mask=mask.to(device)).logits.float()[:, :-1]
            labels = lab[:, 1:].to(device)
            keep = labels != IGNORE_INDEX
            logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            sums.extend((logp * keep).sum(dim=1).tolist())
        out.append(np.asarray(sums, dtype=np.float64))
    return out[0], out[1]


def score(chosen: np.ndarray, rejected: np.ndarray, ref_chosen: np.ndarray, ref_rejected: np.ndarray, *,
          beta: float) -> PreferenceScores:
    """Preference metrics from policy and reference log-probabilities."""
    rewards = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return PreferenceScores(accuracy=float(np.mean(chosen > rejected)),
                            logp_margin=float(np.mean(chosen - rejected)),
                            reward_accuracy=float(np.mean(rewards > 0)),
                            reward_margin=float(np.mean(rewards)), n=int(len(chosen)))


def dpo_rows(pairs: list[Preference], template: PromptFormat) -> list[dict[str, str]]:
    """TRL's rows: the templated prompt and each answer as the model writes it after it."""
    return [{"prompt": template.generation_prompt(p.request()),
             "chosen": template.completion(p.example("chosen")),
             "rejected": template.completion(p.example("rejected"))} for p in pairs]


def _dataset(pairs: list[Preference], template: PromptFormat):
    from datasets import Dataset

    return Dataset.from_list(dpo_rows(pairs, template))


def _trainer_args(cfg: Config, output_dir: Path, device: torch.device):
    from trl import DPOConfig

    # TRL's defaults (bf16, gradient checkpointing, lr 1e-6, max_length 1024, reports to
    # every installed tracker, checkpoints) are wrong for a small CPU stage: set them all.
    return DPOConfig(
        output_dir=str(output_dir), use_cpu=device.type == "cpu", bf16=False, fp16=False,
        gradient_checkpointing=False, learning_rate=cfg.dpo.learning_rate, beta=cfg.dpo.beta,
        max_length=cfg.dpo.max_length, per_device_train_batch_size=cfg.dpo.batch_size,
        loss_type=["sigmoid", "sft"] if cfg.dpo.sft_weight > 0 else ["sigmoid"],
        loss_weights=[1.0, cfg.dpo.sft_weight] if cfg.dpo.sft_weight > 0 else None,
        max_steps=cfg.dpo.steps, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=cfg.train.max_grad_norm, seed=cfg.train.seed, data_seed=cfg.train.seed,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, log_level="error", remove_unused_columns=False)


def _quiet_libraries() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def _reference_drift(model, aggregate: Mapping[str, np.ndarray]) -> float:
    from peft import get_peft_model_state_dict

    ref = get_peft_model_state_dict(model, adapter_name="ref")
    if set(ref) != set(aggregate):
        raise RuntimeError("TRL's reference adapter does not mirror the aggregate's tensors; "
                           "the DPO reference would not be the aggregate")
    return max(float(np.max(np.abs(ref[k].detach().float().cpu().numpy() - aggregate[k]))) for k in aggregate)


def _check_reference(drift: float, aggregate: Mapping[str, np.ndarray]) -> None:
    """DPO's loss is relative to the reference: one that moved during training is not the
    aggregate's, and the refinement's figures mean nothing. Allowed: bf16 rounding of the
    copy (TRL casts trainable LoRA weights on a 4-bit base to bf16), 2^-8 of the largest value."""
    peak = max((float(np.max(np.abs(v))) for v in aggregate.values() if v.size), default=0.0)
    if drift > peak * 2.0**-8:
        raise RuntimeError(f"the DPO reference adapter moved by up to {drift:.3g} during training (the aggregate's "
                           f"largest value is {peak:.3g}); it must stay the frozen aggregate")


def _freeze_a(model) -> None:
    """``ffa``: turn off ``requires_grad`` on every ``lora_A`` (before TRL builds its
    optimizer, and before it casts trainable LoRA weights of a 4-bit base to bf16, which
    would round A)."""
    frozen = [p for n, p in model.named_parameters() if is_a(n) and p.requires_grad]
    if not frozen:
        raise RuntimeError("federation.lora-rule = ffa, but the adapter has no trainable lora_A tensor to freeze")
    for p in frozen:
        p.requires_grad_(False)


def _check_a_unchanged(state: Mapping[str, np.ndarray], aggregate: Mapping[str, np.ndarray]) -> None:
    moved = [k for k in aggregate if is_a(k) and not np.array_equal(state[k], aggregate[k])]
    if moved:
        raise RuntimeError(f"federation.lora-rule = ffa, but DPO changed {len(moved)} lora_A tensor(s) "
                           f"(first: {moved[0]}); A must stay the shared initial A")


def refine(adapter_dir: str | Path, preferences: PreferenceSets, cfg: Config, *,
           output_dir: str | Path) -> tuple["dict[str, np.ndarray]", DPOReport]:
    """DPO on ``preferences.train`` starting from (and referenced to) the adapter in
    ``adapter_dir``; returns the refined adapter state and before/after metrics on
    ``preferences.holdout``. ``output_dir`` receives TRL's (empty) working directory."""
    from peft import PeftModel
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOTrainer

    from fedlora.common.adapter import get_state, load_adapter_file
    from fedlora.common.model import load_base, load_tokenizer, pick_device

    if not preferences.train or not preferences.holdout:
        raise ValueError("DPO needs preference pairs in both train and holdout; check the preference files")
    _quiet_libraries()
    start = time.perf_counter()
    device = pick_device(cfg.model)
    tokenizer = load_tokenizer(cfg.model.base)
    template = make_format(cfg.data, tokenizer)
    aggregate = load_adapter_file(adapter_dir)
    model = PeftModel.from_pretrained(load_base(cfg.model, for_training=True), str(adapter_dir), is_trainable=True)
    frozen_a = cfg.federation.lora_rule == "ffa"
    if frozen_a:  # before DPOTrainer (its "ref" copy of the adapter is frozen whatever the rule)
        _freeze_a(model)
    measure = dict(max_length=cfg.dpo.max_length, device=device, template=template)
    ref_c, ref_r = sequence_logps(model, tokenizer, preferences.holdout, **measure)
    before = score(ref_c, ref_r, ref_c, ref_r, beta=cfg.dpo.beta)

    with warnings.catch_warnings():  # transformers renamed gradient_checkpointing; TRL still uses the old names
        warnings.simplefilter("ignore", FutureWarning)
        trainer = DPOTrainer(model=model, args=_trainer_args(cfg, Path(output_dir), device),
                             train_dataset=_dataset(preferences.train, template), processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)  # keep TRL's per-run metrics dump off the console
        for p in model.parameters():  # TRL casts LoRA weights on a 4-bit base to bf16: slow and lossy on CPU
            if p.requires_grad and p.dtype != torch.float32 and device.type == "cpu":
                p.data = p.data.float()
        result = trainer.train()
    model.set_adapter("default")
    pol_c, pol_r = sequence_logps(model, tokenizer, preferences.holdout, **measure)
    after = score(pol_c, pol_r, ref_c, ref_r, beta=cfg.dpo.beta)
    drift = _reference_drift(model, aggregate)
    _check_reference(drift, aggregate)
    state = get_state(model)
    if frozen_a:
        _check_a_unchanged(state, aggregate)
    report = DPOReport(before=before, after=after, steps=int(result.global_step),
                       train_pairs=len(preferences.train), train_loss=float(result.training_loss),
                       beta=cfg.dpo.beta, learning_rate=cfg.dpo.learning_rate, reference_drift=drift,
                       seconds=time.perf_counter() - start, trained_factors="B" if frozen_a else "A and B")
    return state, report


def write_report(path: str | Path, report: DPOReport, **extra) -> Path:
    """``dpo.json``: the report plus anything the caller measured (tenant holdouts)."""
    from fedlora.common.files import write_json_atomic

    write_json_atomic(path, {**report.as_dict(), **extra})
    return Path(path)
