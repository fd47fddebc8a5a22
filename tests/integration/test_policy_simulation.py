"""A tenant's policy through ``fedlora simulate`` (``simulation.tenant-policy``).

* A run whose every tenant declines (the policy requires local DP, the run config asks for
  none) exits non-zero and publishes nothing.
* What leaves the node: one tenant's training data holds a conversation its chat template
  refuses, with a patient's name in the template's error. Every reply the server received is
  in the run's round records (train metrics, evaluation metrics, drop reasons): none carries the
  data text, a traceback or a per-example loss, and the failed tenant's drop reason is the
  public one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import simulate_cmd

pytestmark = pytest.mark.slow
SECRET = "Marguerite Okonkwo-Vasquez"
# renders like a plain chat template, but refuses a turn that names the patient, quoting it
TEMPLATE = ("{% for m in messages %}{% if 'Okonkwo' in m['content'] %}"
            "{{ raise_exception('cannot render the turn: ' + m['content']) }}{% endif %}"
            "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SMALL = ["--set", "simulation.tenants=2", "--set", "federation.rounds=1", "--set", "train.local-steps=2",
         "--set", "data.holdout-size=4", "--set", "eval.probe-size=2", "--set", "eval.max-new-tokens=4",
         "--set", "run.baselines=false", "--set", "dpo.enabled=false", "--set", "publish.enabled=false"]


def _simulate(run_dir: Path, policy: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(simulate_cmd("--run-dir", str(run_dir), "--set", f"simulation.tenant-policy={policy}",
                                       *SMALL, *args), capture_output=True, text=True, timeout=600)


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "metrics").glob("round_*.json"))]


def test_a_run_every_tenant_declines_exits_non_zero_and_publishes_nothing(tmp_path):
    # Prepare: the tenants require local DP
    policy = tmp_path / "policy.toml"
    policy.write_text('[privacy]\nmode = "local"\n')

    # Execute: the run config asks for none, and for publishing
    proc = _simulate(tmp_path / "run", policy, "--set", "privacy.mode=none", "--set", "publish.enabled=true")

    # Assert
    assert proc.returncode != 0, proc.stdout[-2000:]
    dropped = [d for r in _rounds(tmp_path / "run") for d in r["dropped"]]
    assert len(dropped) == 2, dropped
    assert all("declined by the tenant" in d["reason"] and "[privacy-mode]" in d["reason"] for d in dropped)
    run_dir = tmp_path / "run"
    assert (run_dir / "FEDERATION_FAILED").is_file() and not (run_dir / "FEDERATION_DONE").exists()
    for absent in ("dpo", "merged", "registry", "release.json"):
        assert not (run_dir / absent).exists(), absent
    assert "## Nothing published" in (run_dir / "report.md").read_text()


@pytest.fixture(scope="module")
def template_error_run(tmp_path_factory):
    from fedlora.simulations.base_model import __path__ as embedded
    from fedlora.simulations.synthetic import write_tenants

    root = tmp_path_factory.mktemp("policy-sim")
    base = root / "base"
    shutil.copytree(list(embedded)[0], base, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    tok = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**tok, "chat_template": TEMPLATE}))
    data = root / "data"
    write_tenants(data, num_tenants=2, train_size=16, holdout_size=4, preference_size=2, probe_size=2)
    train = data / "tenant_001" / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    rows[3]["input"] = f"The albumin level for {SECRET} was measured at 31 g/L on May 2."
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    policy = root / "policy.toml"
    policy.write_text('[privacy]\nmode = "any"\n[secagg]\nrequired = false\n[reply]\nerrors = "code"\n'
                      '[evaluation]\nround-to = 0.25\n')
    run_dir = root / "run"
    proc = _simulate(run_dir, policy, "--set", f"model.base={base}", "--set", "data.template=chat",
                     "--set", f"data.dir={data}", "--set", "federation.min-train-nodes=1",
                     "--set", "federation.evaluate-with-train=true")
    return run_dir, proc, base, train


def test_no_reply_carries_data_text_a_traceback_or_a_per_example_loss(template_error_run):
    # Prepare
    from transformers import AutoTokenizer

    from fedlora.common.data import read_examples, tokenize_examples
    from fedlora.common.templates import TemplateError

    run_dir, proc, base, train = template_error_run
    received = "\n".join(p.read_text() for p in sorted((run_dir / "metrics").glob("round_*.json")))
    # what tenant 1 hit: the template's error quotes the patient (so a verbatim reply would leak it)
    with pytest.raises(TemplateError, match=SECRET):
        tokenize_examples(read_examples(train), AutoTokenizer.from_pretrained(base), max_length=256)

    # Execute
    rounds = _rounds(run_dir)

    # Assert: the server's records of every reply hold none of it
    assert rounds, proc.stdout[-3000:] + proc.stderr[-3000:]
    for leak in (SECRET, "Okonkwo", "Traceback", "TemplateError", "albumin", "train.jsonl", "first-loss"):
        assert leak not in received, leak
    train_drop, eval_drop = [d for r in rounds for d in r["dropped"]]
    assert train_drop["reason"].startswith("client error: tenant-error: the tenant could not handle this train")
    assert eval_drop["reason"].startswith("evaluation: tenant-error: the tenant could not handle this evaluate")


def test_the_tenant_that_could_train_replies_under_the_policy(template_error_run):
    # Prepare
    run_dir = template_error_run[0]

    # Execute
    rounds = _rounds(run_dir)

    # Assert: tenant 0's training and evaluation came through, evaluation coarsened to the policy's 0.25
    train = {t: m for r in rounds for t, m in r["train"].items()}
    evals = [m for r in rounds for m in r["eval"].values()]
    assert list(train) == ["0"], rounds
    assert set(train["0"]) <= {"num-examples", "tenant-id", "train-steps", "train-seconds", "dp-epsilon", "weight"}
    assert evals, rounds
    for m in evals:
        for k, v in m.items():
            if k not in ("num-examples", "tenant-id"):
                assert v * 4 == round(v * 4), (k, v)
