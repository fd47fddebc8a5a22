"""Build the embedded tiny base model: corpus -> byte-level BPE tokenizer -> pretrained Llama.

    python -m fedlora.simulations.build_base            # rebuilds simulations/base_model/ (seed 0)
    python -m fedlora.simulations.build_base --help

Everything is seeded (corpus, tokenizer, weights, data order). The corpus is prose records
of the four synthetic sub-domains (see ``fedlora.simulations.synthetic.pretrain_corpus``), most
followed or preceded by a structured restatement in a non-JSON format, so the model learns
to read a record's facts back out of it; it never contains the instruction template or the
task JSON. Training runs in fp32 on CPU; the output is saved with safetensors only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

from fedlora.common.files import PICKLE_SUFFIXES, atomic_dir
from fedlora.simulations.base_tokenizer import check_tokenizer, pack, rare_answer_tokens, train_tokenizer

DEFAULT_OUT = Path(__file__).resolve().parent / "base_model"
SAMPLE_PREFIXES = ("Outpatient visit on", "Lab report for", "Card ending", "Loan application #")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fedlora.simulations.build_base", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (replaced)")
    p.add_argument("--seed", type=int, default=0, help="seed of corpus, tokenizer, weights and data order")
    p.add_argument("--docs", type=int, default=80000, help="pretraining corpus size in documents")
    p.add_argument("--eval-docs", type=int, default=400, help="held-out documents for the eval loss")
    p.add_argument("--vocab-size", type=int, default=3072, help="BPE vocabulary size (incl. special tokens)")
    p.add_argument("--hidden", type=int, default=192, help="hidden size")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--intermediate", type=int, default=512, help="MLP intermediate size")
    p.add_argument("--seq-len", type=int, default=128, help="packed training sequence length")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine to 10%%, 4%% warmup)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    p.add_argument("--eval-every", type=int, default=400, help="steps between held-out evaluations (0: none)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--ckpt-every", type=int, default=200,
                   help="steps between resumable checkpoints in the temp dir (0: none); a rerun with the "
                        "same arguments continues from the last one")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint and start over")
    return p.parse_args(argv)


# Arguments that change the result; a checkpoint is only resumed under the same ones.
_RESULT_ARGS = ("seed", "docs", "eval_docs", "vocab_size", "hidden", "layers", "heads", "intermediate", "seq_len",
                "batch_size", "steps", "lr", "weight_decay", "threads")


def checkpoint_dir(args) -> Path:
    import hashlib
    import tempfile

    key = json.dumps({k: getattr(args, k) for k in _RESULT_ARGS}, sort_keys=True)
    return Path(tempfile.gettempdir()) / f"fedlora_build_base_{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def save_checkpoint(path: Path, model, opt, *, step: int, pos: int, order, generator, losses: list[float],
                    elapsed: float) -> None:
    """Weights, AdamW moments and data position as safetensors + JSON (no pickles)."""
    import torch
    from safetensors.torch import save_file

    with atomic_dir(path) as tmp:
        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
                   if k != "lm_head.weight"}, tmp / "model.safetensors")
        moments = {}
        for i, st in opt.state_dict()["state"].items():
            for name, value in st.items():
                moments[f"{i}.{name}"] = torch.as_tensor(value).detach().clone().contiguous()
        moments["order"] = order.clone()
        moments["generator"] = generator.get_state().clone()
        save_file(moments, tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, "pos": pos, "losses": losses,
                                                    "elapsed": elapsed}))


def load_checkpoint(path: Path, model, opt, generator):
    """Restore what save_checkpoint wrote; returns (step, pos, order, losses, elapsed seconds)."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(path / "model.safetensors"), strict=False)
    model.tie_weights()
    moments = load_file(path / "optimizer.safetensors")
    order = moments.pop("order")
    generator.set_state(moments.pop("generator"))
    state: dict[int, dict] = {}
    for key, value in moments.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = value
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)
    meta = json.loads((path / "state.json").read_text())
    return meta["step"], meta["pos"], order, meta["losses"], meta["elapsed"]


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(args, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True, initializer_range=0.02,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="silu", attention_bias=False, mlp_bias=False,
    )
    return LlamaForCausalLM(config)


def evaluate(model, rows, batch_size: int) -> float:
    """Mean next-token loss over packed held-out rows."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = rows[i: i + batch_size]
            out = model(input_ids=batch, labels=batch)
            n = batch.numel() - batch.shape[0]
            total += out.loss.item() * n
            count += n
    model.train()
    return total / max(count, 1)


def _greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy continuations of token-id prompts (left-padded batches)."""
    import torch

    texts = []
    for i in range(0, len(prompts), 16):
        chunk = prompts[i: i + 16]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, row in enumerate(chunk):
            ids[j, width - len(row):] = torch.tensor(row)
            mask[j, width - len(row):] = 1
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        texts += [tokenizer.decode(g[width:], skip_special_tokens=True) for g in gen]
    return texts


def slot_accuracy(model, tokenizer, n: int = 48, seed: int = 0) -> float:
    """How often the base reads a task field back out of an unseen record (greedy).

    The prompt is the record, a new line and a ``Summary - `` restatement filled in up to
    one of the task's fields (``...; drug:``); the field's value must follow. This is the
    skill the extraction tasks build on, measured without the task's template or JSON.
    """
    from fedlora.simulations import domains, synthetic

    rng = random.Random(f"slot-eval|{seed}")
    prompts, golds = [], []
    for i in range(n):
        domain = synthetic.DOMAINS[i % len(synthetic.DOMAINS)]
        while True:
            facts, prose = synthetic._record(domain, rng)
            if domains._bucket(prose) == "probe":
                break
        answer = domains._answer(domain, facts)
        keys = list(answer)
        vals = [v if isinstance(v, str) else json.dumps(v) for v in answer.values()]
        for field in synthetic.TASK_FIELDS[domain]:
            j = keys.index(field)
            head = "; ".join(f"{k}: {v}" for k, v in zip(keys[:j], vals[:j]))
            text = f"{prose}\nSummary - {head}{'; ' if head else ''}{field}:"
            prompts.append([tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"])
            golds.append(vals[j])
    model.eval()
    outs = _greedy(model, tokenizer, prompts, 8)
    model.train()
    hits = 0
    for out, gold in zip(outs, golds):
        out = out.strip()
        hits += out.startswith(gold) and (len(out) == len(gold) or not out[len(gold)].isalnum())
    return hits / len(golds)


def samples(model, tokenizer, max_new_tokens: int = 72) -> list[str]:
    model.eval()
    prompts = [tokenizer(p)["input_ids"] for p in SAMPLE_PREFIXES]
    outs = []
    for prompt, prefix in zip(prompts, SAMPLE_PREFIXES):  # one by one: no padding in the samples
        outs.append(prefix + _greedy(model, tokenizer, [prompt], max_new_tokens)[0])
    return outs


def write_card(out: Path, args, info: dict) -> None:
    flags = "".join(f" --{k.replace('_', '-')} {v}" for k, v in info["non_default_args"].items())
    cmd = "python -m fedlora.simulations.build_base" + (f" --seed {args.seed}" if args.seed else "") + flags
    sample_md = "\n".join(f"    {s!r}" for s in info["samples"])
    text = f"""# fedlora embedded tiny base model

A tiny Llama pretrained from scratch on synthetic prose so that fedlora's simulations and
tests run offline on a CPU. It writes fluent records of the four synthetic sub-domains
(outpatient visit notes, lab reports, card transactions, loan applications) and can read
their facts back out in plain-text restatements, but it has never seen the
`### Instruction` prompt template or the tasks' JSON answers: untuned it scores ~0 exact
match on the extraction tasks, so LoRA has real headroom.

| | |
|---|---|
| architecture | `LlamaForCausalLM`: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, MLP {args.intermediate}, RoPE, RMSNorm, tied embeddings, max positions 256 |
| parameters | {info['params']:,} |
| weights | fp32, `model.safetensors` ({info['weights_mb']:.1f} MB) |
| tokenizer | byte-level BPE (GPT-2 pre-tokenization), vocab {info['vocab']}, trained on the corpus plus the prompt scaffolding (template and task instructions, tokenizer only); specials `<s>`=0 (bos, prepended by default), `</s>`=1 (eos), `<pad>`=2, `<unk>`=3; `model_max_length` 256 |
| corpus | `fedlora.simulations.synthetic.pretrain_corpus(n={args.docs}, seed={args.seed})`: {info['corpus_tokens']:,} tokens; prose records in all surface forms, ~75% with a plain-text restatement (`Summary - key: value; ...`, `{{key=value;...}}`, quoted or `a \\| b` lines), some with two records or the same record twice; no holdout or probe records |
| training | {args.steps} steps x {args.batch_size} x {args.seq_len} packed tokens ({info['train_tokens']:,} tokens, {info['epochs']:.2f} epochs), AdamW lr {args.lr} (4% warmup, cosine to 10%), wd {args.weight_decay} (not on embeddings/norms), grad clip 1.0, fp32 CPU, {args.threads} thread(s), {info['minutes']:.1f} min |
| final loss | train {info['final_train_loss']:.4f} (mean of last 50 steps), held-out {info['final_eval_loss']:.4f} (probe-bucket documents) |
| slot read-out | {info['slot_accuracy']:.0%} of task fields restated correctly from unseen records (`build_base.slot_accuracy`) |
| seed | {args.seed} |

Rebuild (deterministic for a given seed and thread count):

    {cmd}

Greedy samples:

{sample_md}
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from tqdm import tqdm

    from fedlora.simulations import synthetic

    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    t0 = time.time()

    corpus = synthetic.pretrain_corpus(n=args.docs, seed=args.seed)
    eval_docs = synthetic.probe_texts(n=args.eval_docs, seed=args.seed + 10_000)
    tokenizer = train_tokenizer(corpus, args.vocab_size)
    tok_info = check_tokenizer(tokenizer)
    print(f"tokenizer: vocab {len(tokenizer)}; task examples {tok_info['example_tokens_mean']:.1f} tokens "
          f"(max {tok_info['example_tokens_max']}), answers {tok_info['output_tokens_mean']:.1f} "
          f"(max {tok_info['output_tokens_max']})")
    rare = rare_answer_tokens(tokenizer, corpus)
    if rare:
        print(f"warning: answer tokens rare in the corpus: {rare}")

    rows, n_tokens = pack(tokenizer, corpus, args.seq_len)
    eval_rows, _ = pack(tokenizer, eval_docs, args.seq_len)
    print(f"corpus: {len(corpus)} docs, {n_tokens:,} tokens, {len(rows)} rows of {args.seq_len}; "
          f"eval {len(eval_rows)} rows")

    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters")

    def decays(name: str, p) -> bool:
        return p.ndim >= 2 and "embed" not in name

    params = list(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for n, p in params if decays(n, p)], "weight_decay": args.weight_decay},
                             {"params": [p for n, p in params if not decays(n, p)], "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    warmup = max(1, int(0.04 * args.steps))

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        prog = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))

    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(rows), generator=g)
    pos, start, elapsed = 0, 0, 0.0
    losses: list[float] = []
    ckpt = checkpoint_dir(args)
    if ckpt.exists() and not args.no_resume:
        start, pos, order, losses, elapsed = load_checkpoint(ckpt, model, opt, g)
        print(f"resuming from the checkpoint at step {start} ({ckpt})")
    model.train()
    t_train = time.time()
    bar = tqdm(range(start, args.steps), desc="pretrain", unit="step", dynamic_ncols=True, mininterval=2.0,
               initial=start, total=args.steps)
    for step in bar:
        if pos + args.batch_size > len(order):  # next epoch
            order, pos = torch.randperm(len(rows), generator=g), 0
        batch = rows[order[pos: pos + args.batch_size]]
        pos += args.batch_size
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tps = (step + 1 - start) * args.batch_size * args.seq_len / (time.time() - t_train)
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", tok_s=f"{tps:,.0f}", refresh=False)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            tqdm.write(f"step {step + 1}: train {sum(losses[-50:]) / len(losses[-50:]):.4f}, "
                       f"held-out {evaluate(model, eval_rows, 64):.4f}, "
                       f"slot read-out {slot_accuracy(model, tokenizer):.2f}")
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0 and step + 1 < args.steps:
            save_checkpoint(ckpt, model, opt, step=step + 1, pos=pos, order=order, generator=g, losses=losses,
                            elapsed=elapsed + time.time() - t_train)
    bar.close()
    session_s = time.time() - t_train
    train_s = elapsed + session_s
    final_train = sum(losses[-50:]) / len(losses[-50:])
    final_eval = evaluate(model, eval_rows, 64)
    slots = slot_accuracy(model, tokenizer)

    out = args.out
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        stray = [p.name for p in tmp.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if stray:
            raise RuntimeError(f"unexpected non-safetensors files {stray}")
    weights_mb = (out / "model.safetensors").stat().st_size / 1e6

    if ckpt.exists():
        shutil.rmtree(ckpt)
    texts = samples(model, tokenizer)
    defaults = vars(parse_args([]))
    non_default = {k: v for k, v in vars(args).items()
                   if k in _RESULT_ARGS and k != "seed" and v != defaults[k]}
    info = {"params": n_params, "weights_mb": weights_mb, "vocab": len(tokenizer), "corpus_tokens": n_tokens,
            "train_tokens": args.steps * args.batch_size * args.seq_len,
            "epochs": args.steps * args.batch_size / len(rows),
            "minutes": train_s / 60,
            "final_train_loss": final_train, "final_eval_loss": final_eval, "slot_accuracy": slots,
            "samples": texts, "non_default_args": non_default}
    write_card(out, args, info)

    print(f"final loss: train {final_train:.4f}, held-out {final_eval:.4f}; slot read-out {slots:.2f}")
    print(f"throughput: {(args.steps - start) * args.batch_size * args.seq_len / session_s:,.0f} tokens/s; "
          f"pretraining took {info['minutes']:.1f} min{f' (resumed at step {start})' if start else ''}, "
          f"total {(time.time() - t0) / 60:.1f} min")
    print(f"saved {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB)")
    for s in texts:
        print("sample:", json.dumps(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
