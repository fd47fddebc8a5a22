"""Seeded synthetic tenant data: extraction tasks per tenant, preferences, probe, corpus.

The records come from the four sub-domains of :mod:`fedlora.simulations.domains` (two
hospital-like, two bank-like); each extraction task's answer is a short JSON object with
the sub-domain's own keys in a fixed order, checkable automatically (:func:`check_answer`).

Everything is pure Python and deterministic: every function takes a seed and derives
independent ``random.Random`` streams from string seeds (stable across processes).

Train and holdout never share a record: each record's prose is assigned to a bucket by a
stable hash (:func:`_bucket`), holdout rows only come from the holdout bucket, train rows
and the pretraining corpus never do. The forgetting probe likewise comes from its own
bucket, which the pretraining corpus excludes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from fedlora.common.config import DataConfig, EvalConfig
from fedlora.simulations.domains import (CLINIC, CURRENCIES, DOMAINS, FLAG_CODES, FLAG_PHRASES, INSTRUCTIONS, LAB,
                                         LOAN_TERMS, MERCHANT_PREFIXES, MERCHANT_TYPES, PURPOSES, TASK_FIELDS,
                                         _bucket, _dumps, _facts, _name, _num, _prose, _rng, _summary, _task_answer)


# --------------------------------------------------------------------------- public API

def tenant_domain(tenant_id: int) -> str:
    """Tenant ``tenant_id``'s home sub-domain."""
    return DOMAINS[tenant_id % len(DOMAINS)]


def _record(domain: str, rng: random.Random) -> tuple[dict, str]:
    facts = _facts(domain, rng)
    return facts, _prose(domain, facts, rng)


def make_example(domain: str, rng: random.Random) -> dict:
    """One Alpaca-style extraction example ``{"instruction", "input", "output"}``."""
    facts, prose = _record(domain, rng)
    return {"instruction": rng.choice(INSTRUCTIONS[domain]), "input": prose,
            "output": _dumps(_task_answer(domain, facts))}


def check_answer(domain: str, example: dict, answer: str) -> bool:
    """True when ``answer`` parses to the same JSON object as the example's output."""
    try:
        got = json.loads(answer)
    except (json.JSONDecodeError, TypeError):
        return False
    return isinstance(got, dict) and got == json.loads(example["output"]) and tuple(got) == TASK_FIELDS[domain]


def domain_of(example: dict) -> str:
    """The sub-domain of an extraction example (from its instruction)."""
    for d, instructions in INSTRUCTIONS.items():
        if example.get("instruction") in instructions:
            return d
    raise ValueError("not an extraction example of this generator")


def _mix_counts(tenant_id: int, n: int, own_fraction: float) -> dict[str, int]:
    if not 0.0 <= own_fraction <= 1.0:
        raise ValueError(f"own_fraction must be in [0, 1], got {own_fraction}")
    home = tenant_domain(tenant_id)
    others = [d for d in DOMAINS if d != home]
    own = round(n * own_fraction)
    rest = n - own
    counts = {home: own}
    for i, d in enumerate(others):
        counts[d] = rest // len(others) + (1 if i < rest % len(others) else 0)
    return {d: counts[d] for d in DOMAINS}


def tenant_split(tenant_id: int, *, split: str, n: int, own_fraction: float, seed: int) -> list[dict]:
    """Tenant ``tenant_id``'s ``split`` ("train" or "holdout") of ``n`` extraction rows.

    ``round(n * own_fraction)`` rows come from the tenant's home domain, the rest are
    spread evenly over the other three. Deterministic in (tenant_id, split, n,
    own_fraction, seed). Holdout records come only from the holdout hash bucket and train
    records never do, so no holdout input is ever a train input (of any tenant or seed).
    """
    if split not in ("train", "holdout"):
        raise ValueError(f"split must be 'train' or 'holdout', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    counts = _mix_counts(tenant_id, n, own_fraction)
    slots = [d for d in DOMAINS for _ in range(counts[d])]
    rng = _rng("tenant", seed, tenant_id, split)
    rng.shuffle(slots)
    want = "holdout" if split == "holdout" else "train"
    rows, seen = [], set()
    for domain in slots:
        while True:
            ex = make_example(domain, rng)
            if _bucket(ex["input"]) == want and ex["input"] not in seen:
                break
        seen.add(ex["input"])
        rows.append(ex)
    return rows


# Half the rejected answers hold one wrong value, chosen where a tuned model errs (see
# _near_miss); the rest are a missing field, invalid JSON or prose.
_REJECT_KINDS = ("wrong_value", "missing_field", "wrong_value", "invalid_json", "wrong_value", "prose")


def _near_miss(domain: str, key: str, facts: dict, prose: str, rng: random.Random):
    """A wrong value a model that half-read the record would give, or None: the term in
    years left unconverted or off by a year, the neighbouring term, another drug for the
    same diagnosis, another flag."""
    value = facts[key]
    if key == "term_months":
        if value % 12 == 0 and "year" in prose:
            years = value // 12
            options = [years] + [t for t in ((years - 1) * 12, (years + 1) * 12) if t in LOAN_TERMS]
        else:
            i = LOAN_TERMS.index(value)
            options = [LOAN_TERMS[j] for j in (i - 1, i + 1) if 0 <= j < len(LOAN_TERMS)]
        return rng.choice(options)
    if key == "drug":
        others = [d for d in CLINIC[facts["diagnosis"]][1] if d != value]
        return rng.choice(others) if others else None
    if key == "flag":
        return rng.choice([f for f in FLAG_CODES if f != value])
    return None


def _other_value(domain: str, key: str, value, rng: random.Random):
    """A plausible but wrong value for ``key``."""
    pools = {
        "name": None, "patient": None, "applicant": None,
        "diagnosis": sorted(CLINIC), "drug": sorted({d for _, ds in CLINIC.values() for d in ds}),
        "test": sorted(LAB), "flag": ("low", "normal", "high"),
        "currency": sorted(CURRENCIES), "category": sorted(set(MERCHANT_TYPES.values())),
        "merchant": None, "purpose": sorted(PURPOSES), "term_months": LOAN_TERMS,
    }
    for _ in range(100):
        if key in ("name", "patient", "applicant"):
            cand = _name(rng)
        elif key == "merchant":
            cand = f"{rng.choice(MERCHANT_PREFIXES)} {value.split()[-1]}"
        elif key == "age":
            cand = value + rng.choice((-11, -3, -1, 1, 2, 10))
        elif key == "loan_amount":
            cand = value + rng.choice((-1, 1, 2, 10)) * 500
        elif key == "amount":
            cand = round(value + rng.choice((-1, 1)) * rng.choice((0.09, 1.0, 10.0)), 2)
        elif key == "value":
            cand = round(value * rng.choice((0.5, 1.5, 2.0)), 2) if isinstance(value, float) else value + rng.randint(1, 20)
        else:
            cand = rng.choice(pools[key])
        if cand != value and (not isinstance(cand, (int, float)) or cand > 0):
            return cand
    raise RuntimeError(f"could not find a wrong value for {key}")


def _rejected(domain: str, facts: dict, prose: str, kind: str, rng: random.Random) -> str:
    answer = _task_answer(domain, facts)
    keys = list(answer)
    if kind == "wrong_value":
        key = rng.choice(keys)
        bad = dict(answer)
        near = _near_miss(domain, key, facts, prose, rng)
        bad[key] = near if near is not None else _other_value(domain, key, answer[key], rng)
        return _dumps(bad)
    if kind == "missing_field":
        drop = rng.choice(keys)
        return _dumps({k: v for k, v in answer.items() if k != drop})
    if kind == "invalid_json":
        text = _dumps(answer)
        how = rng.randrange(3)
        if how == 0:
            return text[:-1]                                    # unclosed object
        if how == 1:
            return text.replace('"', "'")                       # single quotes
        return "{" + ", ".join(f"{k}: {v}" for k, v in answer.items()) + "}"  # unquoted keys/values
    if kind == "prose":
        return _summary(domain, facts, rng) if rng.random() < 0.5 else prose
    raise ValueError(kind)


def _distractor(domain: str, facts: dict, rng: random.Random) -> tuple[str, str, object]:
    """A sentence naming a second, wrong value of one task field, the field and that value:
    the hard cases a central review team collects (a converted amount in another currency,
    a grace period next to the term, an earlier visit's drug, a previous result's flag)."""
    if domain == "payments":
        other = rng.choice([c for c in CURRENCIES if c != facts["currency"]])
        word, code = CURRENCIES[other]
        approx = _num(round(facts["amount"] * rng.choice((0.86, 0.92, 1.08, 1.17)), 2))
        text = rng.choice((f" Approximately {approx} {code} at today's rate.",
                           f" The bank shows an estimate of {approx} {word}."))
        return text, "currency", other
    if domain == "loans":
        other = rng.choice([t for t in LOAN_TERMS if t != facts["term_months"]])
        text = rng.choice((f" A grace period of {other} months was discussed.",
                           f" An earlier application asked for {other} months."))
        return text, "term_months", other
    if domain == "clinic":
        drugs = sorted({d for _, ds in CLINIC.values() for d in ds} - set(CLINIC[facts["diagnosis"]][1]))
        other = rng.choice(drugs)
        return f" Previously on {other}, now stopped.", "drug", other
    other = rng.choice([f for f in FLAG_CODES if f != facts["flag"]])
    return f" The previous {facts['test']} result was {rng.choice(FLAG_PHRASES[other])}.", "flag", other


def preference_pairs(*, n: int, seed: int, split: str) -> list[dict]:
    """``n`` preference rows ``{"prompt", "input", "chosen", "rejected"}`` over all four domains.

    ``prompt`` is the task instruction and ``input`` the record, as in an Alpaca row (the
    run's prompt format templates them when DPO uses them), ``chosen`` the correct JSON.
    Half the pairs are hard cases the tenants' data never shows: the record names a second value of one field
    (:func:`_distractor`) and ``rejected`` takes it. In the other half ``rejected`` is a
    plausible wrong answer (a wrong value in one field, preferring a near miss; a missing
    field; invalid JSON; prose instead of JSON), cycling through those kinds. "train" and "holdout" come
    from disjoint hash buckets of the records.
    """
    if split not in ("train", "holdout"):
        raise ValueError(f"split must be 'train' or 'holdout', got {split!r}")
    rng = _rng("preferences", seed, split)
    rows, seen = [], set()
    for i in range(n):
        domain = DOMAINS[i % len(DOMAINS)]
        while True:
            facts, prose = _record(domain, rng)
            if _bucket(prose) == split and prose not in seen:
                break
        seen.add(prose)
        instruction = rng.choice(INSTRUCTIONS[domain])
        answer = _task_answer(domain, facts)
        if i % 2:
            # a hard case: the record names a second value of one field; rejected takes it
            text, key, other = _distractor(domain, facts, rng)
            prose, rejected = prose + text, _dumps({**answer, key: other})
        else:
            kind = _REJECT_KINDS[(i // 2) % len(_REJECT_KINDS)]
            rejected = _rejected(domain, facts, prose, kind, rng)
        rows.append({"prompt": instruction, "input": prose, "chosen": _dumps(answer), "rejected": rejected})
    rng.shuffle(rows)
    return rows


def _document(rng: random.Random, *, bucket: str) -> str:
    """One pretraining-style document (prose records, some with a structured restatement)."""

    def record(domain: str) -> tuple[dict, str]:
        while True:
            facts, prose = _record(domain, rng)
            if _bucket(prose) == bucket:
                return facts, prose

    domain = rng.choice(DOMAINS)
    r = rng.random()
    facts, prose = record(domain)
    if r < 0.10:                                   # a bare record
        return prose
    if r < 0.65:                                   # record, then a restatement (copy forward)
        return prose + "\n" + _summary(domain, facts, rng)
    if r < 0.75:                                   # restatement, then the record (copy back)
        return _summary(domain, facts, rng) + "\n" + prose
    if r < 0.85:                                   # two records, the second one restated
        facts2, prose2 = record(domain)
        return prose + "\n" + prose2 + "\n" + _summary(domain, facts2, rng)
    for _ in range(20):                            # the same record in another surface form
        again = _prose(domain, facts, rng)
        if _bucket(again) == bucket:
            return prose + "\n" + again
    return prose + "\n" + _summary(domain, facts, rng)


def pretrain_corpus(*, n: int, seed: int) -> list[str]:
    """``n`` prose documents to pretrain the base: records of all four domains in all
    surface forms, often followed or preceded by a structured restatement in a non-JSON
    format (so the model learns to copy entities). Never contains the instruction template,
    the task JSON, or any holdout/probe record."""
    rng = _rng("pretrain", seed)
    return [_document(rng, bucket="train") for _ in range(n)]


def probe_texts(*, n: int, seed: int) -> list[str]:
    """``n`` forgetting-probe texts: documents of the pretraining kind (same generators,
    different stream) built from records the pretraining corpus never contains."""
    rng = _rng("probe", seed)
    return [_document(rng, bucket="probe") for _ in range(n)]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


_DATA, _EVAL = DataConfig(), EvalConfig()  # the run config's defaults, defined once there


def write_tenants(out_dir, *, num_tenants: int = 4, train_size: int = _DATA.train_size,
                  holdout_size: int = _DATA.holdout_size, own_fraction: float = _DATA.own_fraction,
                  preference_size: int = _DATA.preference_size, seed: int = _DATA.seed,
                  probe_size: int = _EVAL.probe_size) -> dict:
    """Write every tenant's train/holdout JSONL, the central preferences and the probe.

    Layout: ``tenant_{i:03d}/{train,holdout}.jsonl``, ``preferences/{train,holdout}.jsonl``,
    ``probe.jsonl`` (rows ``{"text": ...}``). Returns a summary of what was written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tenants = []
    for t in range(num_tenants):
        tdir = out / f"tenant_{t:03d}"
        entry = {"tenant_id": t, "domain": tenant_domain(t)}
        for split, size in (("train", train_size), ("holdout", holdout_size)):
            rows = tenant_split(t, split=split, n=size, own_fraction=own_fraction, seed=seed)
            _write_jsonl(tdir / f"{split}.jsonl", rows)
            entry[split] = str(tdir / f"{split}.jsonl")
            entry[f"{split}_rows"] = len(rows)
            entry[f"{split}_mix"] = _mix_counts(t, size, own_fraction)
        tenants.append(entry)
    prefs = {}
    pref_holdout = max(1, preference_size // 2) if preference_size else 0
    for split, size in (("train", preference_size), ("holdout", pref_holdout)):
        path = out / "preferences" / f"{split}.jsonl"
        _write_jsonl(path, preference_pairs(n=size, seed=seed, split=split))
        prefs[split] = str(path)
        prefs[f"{split}_rows"] = size
    probe_path = out / "probe.jsonl"
    _write_jsonl(probe_path, [{"text": t} for t in probe_texts(n=probe_size, seed=seed)])
    return {"out_dir": str(out), "seed": seed, "num_tenants": num_tenants, "own_fraction": own_fraction,
            "domains": list(DOMAINS), "tenants": tenants, "preferences": prefs,
            "probe": {"path": str(probe_path), "rows": probe_size}}


def tenant_files(partition_id: int, data: DataConfig) -> tuple[Path, Path]:
    """(train, holdout) of simulated tenant ``partition_id`` when ``data.dir`` is empty (a bare ``flwr run``;
    the ClientApp finds this function through the ``fedlora.tenant_data`` entry point): the files
    ``fedlora simulate`` writes for that tenant with the same ``data.*`` values, kept in
    ``<fedlora home>/synthetic/<key>/tenant_XXX/`` (the key digests those values and the
    generator's source, so nothing stale is read). A simulation thus has one tenant per SuperNode.
    The first ClientApp that needs a tenant writes it beside the final name and renames it into
    place; a concurrent writer (another run) writes the same bytes and keeps the winner's. Like a
    real node, a synthetic tenant keeps its state (privacy ledger) beside its files across runs.
    """
    import hashlib
    import json

    from fedlora.common.data import tenant_paths
    from fedlora.common.files import atomic_dir, fedlora_home
    from fedlora.simulations import domains

    digest = hashlib.sha256()
    for source in (Path(__file__), Path(domains.__file__)):
        digest.update(source.read_bytes())
    digest.update(json.dumps([data.train_size, data.holdout_size, data.own_fraction, data.seed]).encode())
    train, holdout = tenant_paths(fedlora_home() / "synthetic" / digest.hexdigest()[:16], partition_id)
    if train.parent.is_dir():
        return train, holdout
    try:
        with atomic_dir(train.parent, overwrite=False) as tmp:
            for path, size in ((train, data.train_size), (holdout, data.holdout_size)):
                rows = tenant_split(partition_id, split=path.stem, n=size, own_fraction=data.own_fraction,
                                    seed=data.seed)
                (tmp / path.name).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    except OSError:  # another writer renamed the same tenant into place first
        if not train.parent.is_dir():
            raise
    return train, holdout
