"""The synthetic tenant data and the embedded base model (fast: no training)."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from fedlora.common.data import format_prompt
from fedlora.simulations import domains
from fedlora.simulations import synthetic as syn

BASE_DIR = Path(syn.__file__).resolve().parent / "base_model"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_domains_and_tenant_mapping():
    assert syn.DOMAINS == ("clinic", "lab", "payments", "loans")
    assert [syn.tenant_domain(i) for i in range(6)] == ["clinic", "lab", "payments", "loans", "clinic", "lab"]
    assert set(domains.SCHEMAS) == set(syn.DOMAINS) == set(syn.TASK_FIELDS)
    # every sub-domain has its own keys, and the task asks for a subset of a record's facts
    all_keys = [k for keys in syn.TASK_FIELDS.values() for k in keys]
    assert len(all_keys) == len(set(all_keys))
    assert all(set(syn.TASK_FIELDS[d]) <= set(domains.SCHEMAS[d]) for d in syn.DOMAINS)


def test_write_tenants_is_deterministic(tmp_path):
    kw = dict(num_tenants=4, train_size=24, holdout_size=8, preference_size=16, seed=3)
    s1 = syn.write_tenants(tmp_path / "a", **kw)
    syn.write_tenants(tmp_path / "b", **kw)
    syn.write_tenants(tmp_path / "c", **{**kw, "seed": 4})
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c
    expected = {f"tenant_{i:03d}/{s}.jsonl" for i in range(4) for s in ("train", "holdout")}
    expected |= {"preferences/train.jsonl", "preferences/holdout.jsonl", "probe.jsonl"}
    assert set(a) == expected
    assert [t["domain"] for t in s1["tenants"]] == list(syn.DOMAINS)
    assert s1["tenants"][0]["train_rows"] == 24 and s1["tenants"][0]["holdout_rows"] == 8
    for name, data in a.items():
        lines = data.decode("utf-8").splitlines()
        assert lines and all(isinstance(json.loads(line), dict) for line in lines), name


def test_make_example_is_deterministic_in_rng():
    for d in syn.DOMAINS:
        assert syn.make_example(d, random.Random(7)) == syn.make_example(d, random.Random(7))
    with pytest.raises(ValueError):
        syn.make_example("bakery", random.Random(0))


@pytest.mark.parametrize("tenant", range(4))
def test_non_iid_mix(tenant):
    rows = syn.tenant_split(tenant, split="train", n=200, own_fraction=0.85, seed=0)
    counts = Counter(syn.domain_of(r) for r in rows)
    home = syn.tenant_domain(tenant)
    assert counts[home] == 170
    assert sorted(counts[d] for d in syn.DOMAINS if d != home) == [10, 10, 10]
    rows = syn.tenant_split(tenant, split="holdout", n=48, own_fraction=0.85, seed=0)
    counts = Counter(syn.domain_of(r) for r in rows)
    assert counts[home] == round(48 * 0.85)
    assert sum(counts.values()) == 48
    assert all(syn.domain_of(r) == home
               for r in syn.tenant_split(tenant, split="train", n=20, own_fraction=1.0, seed=0))
    # rows are shuffled, not grouped by domain
    doms = [syn.domain_of(r) for r in syn.tenant_split(tenant, split="train", n=200, own_fraction=0.5, seed=0)]
    assert doms[:100].count(home) < 100


def _check_row(row: dict) -> None:
    """The answer is valid JSON with the domain's keys and is derivable from the input."""
    assert set(row) == {"instruction", "input", "output"}
    assert all(isinstance(v, str) and v for v in row.values())
    domain = syn.domain_of(row)
    out = json.loads(row["output"])
    assert tuple(out) == syn.TASK_FIELDS[domain]
    assert row["output"] == json.dumps(out, separators=(", ", ": "))
    assert syn.check_answer(domain, row, row["output"])
    text = row["input"]
    assert "### " not in text and "{" not in text
    if domain == "clinic":
        assert out["diagnosis"] in text and out["drug"] in text
        assert out["drug"] in syn.CLINIC[out["diagnosis"]][1]
    elif domain == "lab":
        assert out["test"] in text and syn.LAB[out["test"]][0] in text
        assert any(p in text for p in syn.FLAG_PHRASES[out["flag"]]) or out["flag"].upper() in text \
            or f"[{syn.FLAG_CODES[out['flag']]}]" in text
    elif domain == "payments":
        assert out["currency"] in text or syn.CURRENCIES[out["currency"]][0] in text
        assert any(syn.MERCHANT_TYPES[m] == out["category"] for m in syn.MERCHANT_TYPES if m in text)
    elif domain == "loans":
        assert any(p in text for p in syn.PURPOSES[out["purpose"]])
        months, years = out["term_months"], out["term_months"] // 12
        assert (f"{months} months" in text or (months % 12 == 0 and (
            f"{years} year" in text or f"{domains._NUMBER_WORDS[years]} year" in text)))


def test_rows_are_valid_and_checkable():
    for tenant in range(4):
        for split in ("train", "holdout"):
            for row in syn.tenant_split(tenant, split=split, n=60, own_fraction=0.85, seed=1):
                _check_row(row)
    rng = random.Random(11)
    for i in range(400):
        _check_row(syn.make_example(syn.DOMAINS[i % 4], rng))


def test_check_answer_rejects_wrong_answers():
    ex = syn.make_example("payments", random.Random(2))
    good = json.loads(ex["output"])
    assert syn.check_answer("payments", ex, ex["output"])
    assert not syn.check_answer("payments", ex, ex["output"][:-1])
    assert not syn.check_answer("payments", ex, json.dumps({**good, "currency": "XYZ"}))
    assert not syn.check_answer("payments", ex, json.dumps({"category": good["category"], "currency": good["currency"]}))
    assert not syn.check_answer("payments", ex, "The payment went to a shop.")


def test_holdout_disjoint_from_train():
    train_inputs = set()
    for tenant in range(4):
        train_inputs |= {r["input"] for r in syn.tenant_split(tenant, split="train", n=256, own_fraction=0.85,
                                                              seed=0)}
    for tenant in range(4):
        hold = syn.tenant_split(tenant, split="holdout", n=48, own_fraction=0.85, seed=0)
        inputs = [r["input"] for r in hold]
        assert len(set(inputs)) == len(inputs)
        assert not set(inputs) & train_inputs
    # the split is by a fixed hash of the record, so it holds across seeds too
    other = syn.tenant_split(0, split="holdout", n=48, own_fraction=0.85, seed=5)
    assert not {r["input"] for r in other} & train_inputs
    # holdout records never appear in the pretraining corpus
    corpus = "\n".join(syn.pretrain_corpus(n=600, seed=0))
    assert not any(r["input"] in corpus for r in hold + other)


def test_preference_pairs_well_formed():
    train = syn.preference_pairs(n=64, seed=0, split="train")
    hold = syn.preference_pairs(n=24, seed=0, split="holdout")
    assert len(train) == 64 and len(hold) == 24
    assert train == syn.preference_pairs(n=64, seed=0, split="train")
    kinds = Counter()
    for row in train + hold:
        assert set(row) == {"prompt", "input", "chosen", "rejected"}
        example = {"instruction": row["prompt"], "input": row["input"], "output": row["chosen"]}
        _check_row(example)
        assert row["rejected"] != row["chosen"]
        try:
            rej = json.loads(row["rejected"])
        except json.JSONDecodeError:
            kinds["invalid_or_prose"] += 1
            continue
        assert rej != json.loads(row["chosen"])
        kinds["missing" if len(rej) < len(syn.TASK_FIELDS[syn.domain_of(example)]) else "wrong_value"] += 1
    assert kinds["invalid_or_prose"] and kinds["missing"] and kinds["wrong_value"]
    assert not {r["input"] for r in train} & {r["input"] for r in hold}
    assert Counter(syn.domain_of({"instruction": r["prompt"]}) for r in train) == \
        {d: 16 for d in syn.DOMAINS}


def test_corpus_and_probe():
    corpus = syn.pretrain_corpus(n=400, seed=0)
    assert corpus == syn.pretrain_corpus(n=400, seed=0)
    text = "\n".join(corpus)
    assert "###" not in text and "Instruction" not in text and '{"' not in text  # no template, no task JSON
    for d, keys in domains.SCHEMAS.items():  # some copy-friendly restatements are there
        assert any(keys[0] in doc for doc in corpus)
    probe = syn.probe_texts(n=50, seed=0)
    assert len(probe) == 50 and probe == syn.probe_texts(n=50, seed=0)
    assert all(p and "###" not in p and '{"' not in p for p in probe)
    assert not set(probe) & set(syn.pretrain_corpus(n=2000, seed=0))


@pytest.fixture(scope="module")
def base():
    assert (BASE_DIR / "model.safetensors").is_file(), "the embedded base model is part of the package"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(BASE_DIR)
    model = AutoModelForCausalLM.from_pretrained(BASE_DIR)
    return tok, model


def test_base_model_files():
    assert (BASE_DIR / "model.safetensors").is_file(), "run python -m fedlora.simulations.build_base"
    names = {p.name for p in BASE_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl", ".pickle")) for n in names)
    assert sum(p.stat().st_size for p in BASE_DIR.iterdir()) <= 20 * 1024 * 1024


def test_base_model_loads(base):
    tok, model = base
    n = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= n <= 5_000_000
    assert model.config.model_type == "llama"
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert model.config.bos_token_id == tok.bos_token_id
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    assert tok.model_max_length == 256 and 2000 <= len(tok) <= 4096
    assert model.config.vocab_size == len(tok)


def test_tokenizer_round_trip_and_lengths(base):
    tok, _ = base
    rng = random.Random(3)
    for i in range(40):
        ex = syn.make_example(syn.DOMAINS[i % 4], rng)
        prompt = format_prompt(ex["instruction"], ex["input"])
        for text in (prompt, ex["output"]):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids
            assert tok.decode(ids) == text
        n_out = len(tok(ex["output"], add_special_tokens=False)["input_ids"])
        n_all = len(tok(prompt, add_special_tokens=False)["input_ids"]) + n_out + 2
        assert n_out <= 36 and n_all <= 128


def test_base_model_forward(base):
    import torch

    tok, model = base
    ids = tok("Card ending 1234 was charged 12.34 EUR at Harbor Cafe on May 3.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 3.0  # the base knows its domains' prose
