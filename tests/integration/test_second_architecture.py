"""A second architecture end to end: a tiny random Qwen2 base with a ChatML chat template
(tests/conftest.py) through the whole ``fedlora simulate`` pipeline: chat-template masks in
the tenants' training, generation that stops at ``<|im_end|>``, DPO, the fp32 merge check,
a signed version in the registry, and plain PEFT / transformers loading of what it published."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.integration.conftest import simulate_cmd

pytestmark = pytest.mark.slow

# Qwen2's linear layers besides the output head (its attention and MLP projections).
QWEN2_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

TRAIN_SIZE, BATCH, STEPS = 64, 16, 8  # 8 steps x 16 rows = exactly 2 passes over a tenant's 64 rows
SMALL = ["simulation.tenants=2", "federation.rounds=2", f"train.local-steps={STEPS}", f"train.batch-size={BATCH}",
         f"data.train-size={TRAIN_SIZE}", "data.holdout-size=8", "eval.probe-size=4", "eval.max-new-tokens=16",
         "run.baselines=false", "dpo.enabled=true", "dpo.steps=2", "dpo.batch-size=4", "data.preference-size=8",
         "publish.enabled=true", "train.threads=1"]

# A fresh process: the published adapter on the base with plain PEFT, the merged model with
# plain transformers; prints both class names, max |logit difference| and max |logit|.
PLAIN_LOAD = (
    "import sys, torch\n"
    "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
    "from peft import PeftModel\n"
    "base, version, prompt = sys.argv[1:4]\n"
    "tok = AutoTokenizer.from_pretrained(version + '/merged')\n"
    "peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), version + '/adapter')\n"
    "merged = AutoModelForCausalLM.from_pretrained(version + '/merged')\n"
    "ids = tok(prompt, return_tensors='pt').input_ids\n"
    "with torch.no_grad():\n"
    "    a, b = peft(ids).logits, merged(ids).logits\n"
    "print(type(peft).__name__, type(merged).__name__, float((a - b).abs().max()), float(a.abs().max()))\n"
)


def test_qwen2_chat_base_goes_through_the_whole_pipeline(qwen2_chat_base, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedlora.common.config import parse_config
    from fedlora.common.data import IGNORE_INDEX, read_examples, tenant_paths, tokenize_examples
    from fedlora.common.evaluate import generate, stop_token_ids
    from fedlora.common.model import base_name, load_tokenizer
    from fedlora.common.records import read_rounds
    from fedlora.common.templates import encode_prompt, make_format

    # Prepare: the fixture's Qwen2 directory as model.base, sizes that finish in minutes
    run_dir = tmp_path / "run"
    settings = [f"model.base={qwen2_chat_base}", *SMALL]
    cmd = simulate_cmd("--run-dir", str(run_dir), *[arg for s in settings for arg in ("--set", s)])

    # Execute
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)

    # Assert: the run completed every stage
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cfg = parse_config(json.loads((run_dir / "config.json").read_text()))
    tok = load_tokenizer(str(qwen2_chat_base))
    fmt = make_format(cfg.data, tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")

    # Assert: the run's adapter names its base portably and targets Qwen2's own linear layers
    peft_cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert peft_cfg["base_model_name_or_path"] == base_name(str(qwen2_chat_base)) == qwen2_chat_base.name
    base = AutoModelForCausalLM.from_pretrained(str(qwen2_chat_base))
    assert type(base).__name__ == "Qwen2ForCausalLM"
    linear = {n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert {n.rsplit(".", 1)[-1] for n in linear} == QWEN2_LINEAR
    assert {t.rsplit(".", 1)[-1] for t in peft_cfg["target_modules"]} == QWEN2_LINEAR
    assert all(any(n == t or n.endswith("." + t) for n in linear) for t in peft_cfg["target_modules"])

    # Assert: the tenants trained on chat-template tokens. data.template=auto picks the chat
    # template; a row's labels are its answer and <|im_end|>, nothing else; each round, a
    # tenant saw exactly 2 passes of its rows' chat-template tokens (and not the Alpaca ones)
    assert cfg.data.template == "auto" and fmt.name == "chat" and fmt.stop_ids == {im_end}
    rounds = read_rounds(run_dir)
    assert [r.round for r in rounds] == [1, 2] and all(r.aggregated for r in rounds)
    passes = STEPS * BATCH // TRAIN_SIZE
    for t in (0, 1):
        rows = read_examples(tenant_paths(cfg.data.dir, t)[0], fmt=cfg.data.format)
        chat = tokenize_examples(rows, tok, max_length=cfg.data.max_length, template=fmt)
        alpaca = tokenize_examples(rows, tok, max_length=cfg.data.max_length, template=make_format("alpaca", tok))
        ids, labels = chat.input_ids[0], chat.labels[0]
        assert tok.decode([x for x in labels if x != IGNORE_INDEX]) == rows[0].response + "<|im_end|>"
        masked = tok.decode([x for x, lab in zip(ids, labels) if lab == IGNORE_INDEX])
        assert masked == tok.bos_token + fmt.generation_prompt(rows[0]) + "\n"  # BOS, user turn, cue; "\n" after
        assert len(rows) == TRAIN_SIZE and chat.truncated == 0 and chat.tokens != alpaca.tokens
        for r in rounds:
            m = r.train[str(t)]
            assert m["train-steps"] == STEPS and m["truncated"] == 0
            assert m["train-tokens"] == passes * chat.tokens, (t, r.round, m["train-tokens"], chat.tokens)
            assert set(r.eval[str(t)]) >= {"eval-exact-match", "eval-loss"}

    # Assert: merge passed its check, v1 was published, signed and verifies (against a copy of the base)
    release = json.loads((run_dir / "release.json").read_text())
    merge_report = json.loads((run_dir / "merged" / "fedlora-merge.json").read_text())
    assert merge_report["max_abs_diff"] <= merge_report["tolerance"] and merge_report["prompts"] >= 1
    assert release["merge"] == merge_report
    version = run_dir / "registry" / cfg.publish.name / "v1"
    assert release["publish"]["version"] == "v1" and release["publish"]["verified"] is True
    assert (version / "manifest.sig").is_file() and (version / "merged" / "config.json").is_file()
    published_cfg = json.loads((version / "adapter" / "adapter_config.json").read_text())
    published_meta = json.loads((version / "adapter" / "fedlora.json").read_text())
    assert published_cfg["base_model_name_or_path"] == published_meta["base_model"] == qwen2_chat_base.name
    moved = shutil.copytree(qwen2_chat_base, tmp_path / "elsewhere" / "base")
    verify = subprocess.run([sys.executable, "-m", "fedlora.simulations.cli", "verify", str(version), "--public-key",
                             str(run_dir / "keys" / "fedlora-signing.pub"), "--base", str(moved)],
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "verified:" in verify.stdout and "has the recorded fingerprint" in verify.stdout

    # Assert: generation with the published adapter stops at <|im_end|>: unstopped, greedy
    # decoding writes <|im_end|> and goes on; the answer is what precedes it, without template tokens
    model = PeftModel.from_pretrained(base, str(version / "adapter"))
    model.eval()
    holdout = read_examples(tenant_paths(cfg.data.dir, 0)[1], fmt=cfg.data.format)
    prompts = [fmt.generation_prompt(e) for e in holdout]
    answers = generate(model, tok, prompts, max_new_tokens=48, batch_size=1, stop_ids=fmt.stop_ids)
    stops = stop_token_ids(model, tok, fmt.stop_ids)
    assert im_end in stops
    stopped = 0
    for prompt, answer in zip(prompts, answers):
        ids = torch.tensor([encode_prompt(tok, prompt)])
        with torch.no_grad():
            raw = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=48,
                                 do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
        raw = raw[0, ids.shape[1]:].tolist()
        assert "<|im_end|>" not in answer and "<|im_start|>" not in answer
        cut = next((i for i, x in enumerate(raw) if x in stops), len(raw))
        assert answer == tok.decode(raw[:cut], skip_special_tokens=True).strip()
        stopped += cut < len(raw) - 1 and raw[cut] == im_end
    assert stopped >= 1, "no holdout answer reached <|im_end|> in 48 greedy tokens"

    # Assert: in a fresh process, plain PEFT (adapter on the moved base) and plain transformers
    # (merged model) load the version and agree on a prompt's logits within 1e-4 relative
    out = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(moved), str(version), prompts[0]],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    peft_name, merged_name, diff, scale = out.stdout.split()
    assert (peft_name, merged_name) == ("PeftModelForCausalLM", "Qwen2ForCausalLM")
    assert float(diff) <= 1e-4 * float(scale)
