"""Merge an adapter into an fp32 base and save a plain Hugging Face model (safetensors).

Merging into a 4-bit base would re-quantize the merged weights and move the logits, so
the base is always loaded in fp32 on the CPU (for a QLoRA run: the full-precision
weights the 4-bit ones were quantized from). The saved model is then re-opened with
``AutoModelForCausalLM.from_pretrained`` and its logits are compared with base + adapter
(unmerged) on sample prompts; the largest absolute difference is recorded and a merge
beyond the tolerance is refused.

The tolerance is relative to the logits' scale: ``rtol x max(1, max |logit|)``. Both sides
are fp32 computations of the same function in a different order (``x W + s (x A) B`` against
``x (W + s B A)``, then rounded to fp32 weights), so their difference grows with the logits'
magnitude and with depth and width, not with anything the merge did wrong: on a real 135M
model an honest adapter differed by 7.8e-5 at max |logit| 39.8 (2e-6 relative), the same
adapter with B x4 by 1.03e-4 (2.6e-6), so a fixed 1e-4 refused a correct merge. A wrong
merge (a module missed, a wrong scale) moves the logits by the adapter's own effect, orders
of magnitude above 1e-4 relative for any adapter that learned something.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fedlora.common.config import ModelConfig
from fedlora.common.files import atomic_dir, file_digest, pickle_suffix

DEFAULT_RTOL = 1e-4  # of max(1, max |logit|); see the module docstring
MERGE_FILE = "fedlora-merge.json"  # the merge report, kept beside the merged weights


class MergeMismatch(RuntimeError):
    """The merged model's logits differ from base + adapter by more than the tolerance."""


@dataclass(frozen=True)
class MergeReport:
    max_abs_diff: float      # max |logits(merged) - logits(base + adapter)| over the sample prompts
    tolerance: float         # the absolute bound applied: rtol x logit_scale
    rtol: float
    logit_scale: float       # max(1, max |logit of base + adapter|) over the sample prompts
    prompts: int             # sample prompts compared
    trained_precision: str   # precision of the base the adapter was trained on
    adapter_sha256: str      # the merged adapter's weights file
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def prompt_logits(model, tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    """Logits of each prompt (BOS + prompt, unpadded), in fp32."""
    model.eval()
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        ids = torch.tensor([bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)
        out.append(model(ids).logits.float()[0].cpu())
    return out


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def check_base(adapter_dir: Path, mcfg: ModelConfig) -> None:
    """Refuse to merge into a base other than the one the adapter's fedlora.json records."""
    from fedlora.common.adapter import METADATA_FILE
    from fedlora.common.model import require_base

    meta = adapter_dir / METADATA_FILE
    recorded = json.loads(meta.read_text()).get("base_sha256") if meta.is_file() else None
    require_base(mcfg.base, recorded, what=str(adapter_dir))


def merge(adapter_dir: str | Path, out_dir: str | Path, mcfg: ModelConfig, *, prompts: list[str],
          rtol: float = DEFAULT_RTOL) -> MergeReport:
    """Merge ``adapter_dir`` into the fp32 base of ``mcfg`` and save model + tokenizer
    to ``out_dir`` (atomically; safetensors only)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedlora.common.model import load_base, load_tokenizer

    if not prompts:
        raise ValueError("merge needs at least one sample prompt to check the merged logits")
    start = time.perf_counter()
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    check_base(adapter_dir, mcfg)
    fp32_cpu = dataclasses.replace(mcfg, precision="fp32", device="cpu")
    tokenizer = load_tokenizer(mcfg.base)
    model = PeftModel.from_pretrained(load_base(fp32_cpu, for_training=False), str(adapter_dir))
    expected = prompt_logits(model, tokenizer, prompts)
    scale = max(1.0, max(float(x.abs().max()) for x in expected))
    tolerance = rtol * scale
    merged = model.merge_and_unload()
    merged.config.use_cache = True

    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        pickles = [p.name for p in tmp.iterdir() if pickle_suffix(p.name)]
        if pickles:
            raise RuntimeError(f"saving the merged model wrote pickle files {pickles}; refusing to keep them")
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32)
        diff = max_abs_diff(prompt_logits(reloaded, tokenizer, prompts), expected)
        if diff > tolerance:
            raise MergeMismatch(f"merged logits differ from base + adapter by {diff:.3g} > {tolerance:.3g} "
                                f"({rtol:g} of the logits' scale {scale:.3g}); the merged model was not saved")
        report = MergeReport(max_abs_diff=diff, tolerance=tolerance, rtol=rtol, logit_scale=scale,
                             prompts=len(prompts),
                             trained_precision=mcfg.precision,
                             adapter_sha256=file_digest(adapter_dir / "adapter_model.safetensors")[0],
                             seconds=time.perf_counter() - start)
        (tmp / MERGE_FILE).write_text(json.dumps(report.as_dict(), indent=2, sort_keys=True) + "\n")
    return report


def read_report(merged_dir: str | Path) -> dict | None:
    """The merge report saved beside a merged model, or None."""
    path = Path(merged_dir) / MERGE_FILE
    return json.loads(path.read_text()) if path.is_file() else None
