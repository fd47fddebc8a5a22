"""The tenant policy: a file the tenant owns; every way a server's run config or message breaks it
is found before any work, and what leaves the node is what the policy lets out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from fedlora.client.ledger import PrivacyLedger, Spend
from fedlora.client.policy import PolicyError, TenantPolicy, default_text, load_policy, parse_policy
from fedlora.client.policy_check import message_problems, run_problems
from fedlora.client.policy_mod import DECLINE_LOG, policy_path, tenant_policy
from fedlora.common import messages as keys
from fedlora.common.config import parse_config

# The acceptance policy: local DP, epsilon <= 2 per run at the tenant's delta, sigma >= 0.8, batch >= 8, SecAgg.
POLICY = """
[privacy]
mode = "local"
delta = 1e-4
max-epsilon-per-run = 2.0
lifetime-epsilon = 6.0
min-noise-multiplier = 0.8
min-batch-size = 8
[secagg]
required = true
min-neighbours = 2
[compute]
max-rounds = 10
max-local-steps = 20
[evaluation]
max-per-run = 3
round-to = 0.05
"""
# An honest run under it: local DP at sigma 1.5 for 2 rounds x 4 steps, q = 8/96 -> epsilon well under 2.
HONEST = {"privacy.mode": "local", "privacy.target-epsilon": 0.0, "privacy.noise-multiplier": 1.5,
          "privacy.delta": 1e-5, "privacy.budget": 5.0, "secagg.enabled": True, "federation.rounds": 2,
          "train.local-steps": 4, "train.batch-size": 8}
RECORDS = 96


def _policy(tmp_path: Path, text: str = POLICY) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_default_policy_file_parses_to_the_default_policy(tmp_path):
    # Execute: the commented file `fedlora policy init` writes, read back
    policy = load_policy(_policy(tmp_path, default_text()))
    # Assert: every value is the documented default
    assert policy.privacy == TenantPolicy().privacy and policy.compute == TenantPolicy().compute
    assert policy.evaluation == TenantPolicy().evaluation and policy.bases == {}


def test_every_problem_in_a_policy_is_listed_at_once(tmp_path):
    text = '[privacy]\nmode = "loose"\ndelta = 2\nnoise = 1\n[compute]\nmax-rounds = "ten"\n[bases]\nembedded = "x"\n'
    with pytest.raises(PolicyError) as err:
        load_policy(_policy(tmp_path, text))
    message = str(err.value)
    assert str(tmp_path / "policy.toml") in message
    for what in ("privacy.noise: unknown key", "compute.max-rounds: expected int"):
        assert what in message
    # the rule problems come once the types are right
    with pytest.raises(PolicyError, match="privacy.mode: 'loose'.*\n.*privacy.delta: 2 must be in"):
        parse_policy({"privacy": {"mode": "loose", "delta": 2.0}})
    with pytest.raises(PolicyError, match="bases.embedded: 'x' is not a fingerprint"):
        parse_policy({"bases": {"embedded": "x"}})


def test_a_policy_that_is_not_toml_names_its_line(tmp_path):
    with pytest.raises(PolicyError, match=r"not valid TOML.*line 2"):
        load_policy(_policy(tmp_path, "[privacy]\nmode = \n"))


def test_honest_run_breaks_nothing(tmp_path):
    assert run_problems(load_policy(_policy(tmp_path)), parse_config(HONEST), num_records=RECORDS) == []


@pytest.mark.parametrize("change,code,says", [
    ({"privacy.mode": "none"}, "privacy-mode", "privacy.mode 'none': the tenant requires local DP"),
    ({"privacy.budget": 1e12}, "budget", "privacy.budget 1e+12 above the tenant's lifetime epsilon 6"),
    ({"privacy.delta": 0.1}, "delta", "privacy.delta 0.1 above the tenant's 0.0001"),
    ({"privacy.noise-multiplier": 1e-6}, "noise-multiplier", "noise multiplier 1e-06 below the tenant's 0.8"),
    ({"privacy.sampling": "shuffle", "privacy.allow-non-poisson": True}, "sampling", "Poisson"),
    ({"train.batch-size": 1}, "batch-size", "batch size 1 below the tenant's 8"),
    ({"train.local-steps": 21}, "local-steps", "train.local-steps 21 above the tenant's ceiling 20"),
    ({"secagg.enabled": False}, "secagg", "secagg.enabled = false"),
    ({"secagg.neighbours": 1}, "secagg-neighbours", "secagg.neighbours 1 below the tenant's 2"),
    ({"federation.rounds": 1000}, "rounds", "federation.rounds 1000 above the tenant's ceiling 10"),
    ({"privacy.noise-multiplier": 0.8, "federation.rounds": 10, "train.local-steps": 20}, "epsilon-per-run",
     "above its 2 per run"),
])
def test_each_breach_of_the_policy_is_found_with_its_code(tmp_path, change, code, says):
    # Execute
    problems = run_problems(load_policy(_policy(tmp_path)), parse_config({**HONEST, **change}), num_records=RECORDS)
    # Assert
    assert any(c == code and says in m for c, m in problems), problems


def test_a_run_planning_more_evaluations_than_the_budget_is_refused(tmp_path):
    policy = parse_policy({"compute": {"max-rounds": 2000}, "evaluation": {"max-per-run": 20},
                           "secagg": {"required": False}, "privacy": {"mode": "any"}})
    problems = run_problems(policy, parse_config({"federation.rounds": 1000}), num_records=RECORDS)
    assert problems == [("evaluations", "the run plans 1000 evaluations; the tenant answers 20 per run")]


def test_an_unlisted_base_is_refused_without_looking_for_it(tmp_path, monkeypatch):
    # Prepare: fingerprinting anything would be a probe of the tenant's file system
    import fedlora.client.policy_check as check

    monkeypatch.setattr(check, "fingerprint", lambda base: pytest.fail(f"looked at {base}"))
    policy = parse_policy({"bases": {"embedded": "sha256:" + "0" * 64}})
    # Execute / Assert: the same answer whether /etc/shadow exists or not
    for base in ("/etc/shadow", "/no/such/dir"):
        assert check.base_problems(policy, base) == [("base", "model.base is not one of the tenant's accepted bases")]


def test_a_listed_base_must_carry_its_pinned_fingerprint():
    from fedlora.client.policy_check import base_problems, fingerprint

    real = f"sha256:{fingerprint('embedded')}"
    assert base_problems(parse_policy({"bases": {"embedded": real}}), "embedded") == []
    assert base_problems(parse_policy({"bases": {"embedded": "sha256:" + "1" * 64}}), "embedded")[0][0] == \
        "base-fingerprint"


def test_messages_only_show_some_breaches(tmp_path):
    policy = load_policy(_policy(tmp_path))
    assert message_problems(policy, "train")[0][0] == "secagg"  # plain training while SecAgg is required
    assert message_problems(policy, "train.secagg_setup", neighbours=1)[0][0] == "secagg-neighbours"
    assert message_problems(policy, "train.secagg_setup", neighbours=2) == []
    assert message_problems(policy, "evaluate", evaluations=3)[0][0] == "evaluations"
    assert message_problems(policy, "evaluate", evaluations=2) == []


def test_a_policy_requiring_signed_rounds_declines_a_node_without_a_roster(tmp_path):
    # Prepare
    policy = load_policy(_policy(tmp_path, POLICY.replace("[secagg]\n", "[secagg]\nsigned = true\n")))
    # Execute / Assert: every secure stage is declined without a roster, none with one
    for stage in ("train.secagg_setup", "train.secagg_share"):
        problems = message_problems(policy, stage, neighbours=2, signed=False)
        assert [c for c, _ in problems] == ["secagg-unsigned"], problems
        assert message_problems(policy, stage, neighbours=2, signed=True) == []


# -- the mod --------------------------------------------------------------------------
def _node(tmp_path: Path, policy: Path | None, **extra) -> dict:
    data = tmp_path / "data" / "train.jsonl"
    data.parent.mkdir(exist_ok=True)
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(RECORDS)))
    node = {"data-path": str(data), "tenant-id": 5, "state-dir": str(tmp_path / "state"),
            "ledger-dir": str(tmp_path / "ledgers")}
    return {**node, **({"policy": str(policy)} if policy else {}), **extra}


def _message(kind: str, *, evaluate_first: bool = False, run: int = 1) -> Message:
    conf = {keys.ROUND: 1, keys.SEED: 0, **({keys.EVALUATE_FIRST: True} if evaluate_first else {})}
    msg = Message(RecordDict({keys.CONFIG: ConfigRecord(conf)}), message_type=kind, dst_node_id=7)
    msg.metadata.__dict__["_run_id"] = run
    return msg


class Handler:
    """A stand-in for the tenant's handlers: records that it ran, replies as told."""

    def __init__(self, reply=None, raises: Exception | None = None):
        self.calls, self.reply, self.raises = 0, reply, raises

    def __call__(self, msg: Message, context: Context) -> Message:
        self.calls += 1
        if self.raises is not None:
            raise self.raises
        return self.reply(msg) if self.reply else Message(RecordDict({keys.METRICS: MetricRecord(
            {keys.NUM_EXAMPLES: RECORDS, keys.TENANT: 5, "eval-exact-match": 0.4321, "eval-loss": 1.2345,
             "eval-seconds": 2.0})}), reply_to=msg)


def _ctx(node: dict, run_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(),
                   run_config=parse_config(run_config).to_flat())


def test_breach_is_declined_before_any_work_and_the_node_logs_the_whole_request(tmp_path):
    # Prepare
    node, handler = _node(tmp_path, _policy(tmp_path)), Handler()
    ledger = PrivacyLedger.for_data(tmp_path / "ledgers", Path(node["data-path"]))
    # Execute: a run whose config switches DP off
    reply = tenant_policy(_message("train.secagg_upload"), _ctx(node, {**HONEST, "privacy.mode": "none"}), handler)
    # Assert: declined with the reason; the handler never ran; nothing charged; the request is in the node's log
    assert reply.has_error() and reply.error.code == keys.POLICY_DECLINED
    assert reply.error.reason == "policy: tenant 5: privacy.mode 'none': the tenant requires local DP [privacy-mode]"
    assert handler.calls == 0 and ledger.entries() == []
    logged = [json.loads(line) for line in (tmp_path / "state" / DECLINE_LOG).read_text().splitlines()]
    assert logged[0]["code"] == "privacy-mode" and logged[0]["run_config"]["privacy.mode"] == "none"


def test_node_without_a_policy_passes_messages_through_unchanged(tmp_path):
    handler = Handler()
    reply = tenant_policy(_message("evaluate"), _ctx(_node(tmp_path, None), {"privacy.mode": "none"}), handler)
    assert handler.calls == 1 and dict(reply.content.metric_records[keys.METRICS])["eval-exact-match"] == 0.4321


def test_deployment_node_never_takes_its_policy_from_the_run_config(tmp_path):
    # Prepare: the server names a lax policy of its own in the run config
    lax = _policy(tmp_path, '[privacy]\nmode = "any"\n')
    context = _ctx(_node(tmp_path, None), {"simulation.tenant-policy": str(lax)})
    # Execute / Assert: a deployment node (data-path) has no policy unless its own node config names one
    assert policy_path(context) is None
    sim = Context(run_id=1, node_id=7, node_config={"partition-id": 1}, state=RecordDict(),
                  run_config={"simulation.tenant-policy": f"a.toml,{lax}"})
    assert policy_path(sim) == str(lax)


def test_evaluations_are_counted_in_the_ledger_and_the_budget_holds(tmp_path):
    # Prepare: a budget of 3 evaluations per run
    node, handler = _node(tmp_path, _policy(tmp_path)), Handler()
    context = _ctx(node, HONEST)
    # Execute: five evaluations of run 1, then one of run 2
    replies = [tenant_policy(_message("evaluate"), context, handler) for _ in range(5)]
    other = tenant_policy(_message("evaluate", run=2), context, handler)
    # Assert: three answered (each recorded), two declined with the reason; run 2 has its own budget
    assert [r.has_error() for r in replies] == [False, False, False, True, True]
    assert "[evaluations]" in replies[3].error.reason and handler.calls == 4 and not other.has_error()
    ledger = PrivacyLedger.for_data(tmp_path / "ledgers", Path(node["data-path"]))
    assert ledger.evaluations(run="1") == 3 and ledger.evaluations(run="2") == 1


def test_the_lifetime_evaluation_budget_holds_across_runs(tmp_path):
    # Prepare: 3 per run, 4 in all
    text = POLICY.replace("[evaluation]\n", "[evaluation]\nmax-lifetime = 4\n")
    node, handler = _node(tmp_path, _policy(tmp_path, text)), Handler()
    context = _ctx(node, HONEST)
    # Execute: a server that splits its questions over three runs, two each
    replies = [tenant_policy(_message("evaluate", run=r), context, handler) for r in (1, 1, 2, 2, 3, 3)]
    # Assert: four answered, then every run is refused with the lifetime code
    assert [r.has_error() for r in replies] == [False, False, False, False, True, True]
    assert "[evaluations-lifetime]" in replies[4].error.reason and handler.calls == 4
    assert PrivacyLedger.for_data(tmp_path / "ledgers", Path(node["data-path"])).evaluations() == 4


def test_evaluation_metrics_leave_rounded_and_only_those_the_policy_names(tmp_path):
    reply = tenant_policy(_message("evaluate"), _ctx(_node(tmp_path, _policy(tmp_path)), HONEST), Handler())
    metrics = dict(reply.content.metric_records[keys.METRICS])
    # 0.4321 and 1.2345 on a 0.05 grid; eval-seconds is not in the default list
    assert metrics == pytest.approx({keys.NUM_EXAMPLES: RECORDS, keys.TENANT: 5, "eval-exact-match": 0.45,
                                     "eval-loss": 1.25})


def test_training_reply_carries_no_per_example_loss(tmp_path):
    # Prepare: a handler replying with every training metric
    every = {k: 1.0 for k in keys.TRAIN_METRICS} | {keys.NUM_EXAMPLES: RECORDS, keys.TENANT: 5}
    handler = Handler(reply=lambda m: Message(RecordDict({keys.METRICS: MetricRecord(every)}), reply_to=m))
    # Execute
    reply = tenant_policy(_message("train.secagg_upload"), _ctx(_node(tmp_path, _policy(tmp_path)), HONEST), handler)
    # Assert: the default list, no loss of any kind
    assert set(reply.content.metric_records[keys.METRICS]) == {keys.NUM_EXAMPLES, keys.TENANT, "train-steps",
                                                               "train-seconds", "dp-epsilon"}


SECRET = "Patient Jane Roe, MRN 0042, was given"


@pytest.mark.parametrize("handler", [
    Handler(raises=ValueError(f"template error in row: {SECRET}")),
    Handler(reply=lambda m: Message(Error(code=0, reason=f"Traceback (most recent call last): {SECRET}"),
                                    reply_to=m)),
    Handler(reply=lambda m: Message(Error(code=keys.DECLINED, reason=f"budget ({SECRET})"), reply_to=m)),
])
def test_errors_leave_as_a_code_and_a_public_message(tmp_path, handler, caplog):
    # Execute
    reply = tenant_policy(_message("evaluate"), _ctx(_node(tmp_path, _policy(tmp_path)), HONEST), handler)
    # Assert: no data, no traceback in what the server gets; the details are in the node's log
    assert reply.has_error() and SECRET not in reply.error.reason and "Traceback" not in reply.error.reason
    assert reply.error.reason.endswith("]") or "operator has the details" in reply.error.reason
    assert SECRET in caplog.text


def test_unreadable_policy_fails_closed(tmp_path):
    handler = Handler()
    reply = tenant_policy(_message("evaluate"), _ctx(_node(tmp_path, _policy(tmp_path, "[privacy\n")), HONEST),
                          handler)
    assert reply.error.code == keys.POLICY_DECLINED and "[policy-unreadable]" in reply.error.reason
    assert handler.calls == 0


def test_evaluation_riding_on_training_is_dropped_once_the_budget_is_spent(tmp_path):
    # Prepare: the run's 3 evaluations already answered
    node = _node(tmp_path, _policy(tmp_path))
    ledger = PrivacyLedger.for_data(tmp_path / "ledgers", Path(node["data-path"]))
    for _ in range(3):
        ledger.record_evaluation(run="1")
    seen = []
    handler = Handler(reply=lambda m: (seen.append(dict(m.content.config_records[keys.CONFIG])), Message(
        RecordDict({keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 1, keys.TENANT: 5})}), reply_to=m))[1])
    # Execute
    reply = tenant_policy(_message("train.secagg_upload", evaluate_first=True), _ctx(node, HONEST), handler)
    # Assert: the training went ahead without its evaluation
    assert not reply.has_error() and seen[0][keys.EVALUATE_FIRST] is False
    assert ledger.evaluations(run="1") == 3


def test_ledger_budget_uses_the_tenants_delta_and_caps_each_run(tmp_path):
    # Prepare: a spend in run 1 at the tenant's delta
    from fedlora.client.ledger import BudgetExhausted, epsilon_of

    ledger = PrivacyLedger(tmp_path)
    ledger.record(Spend(1.0, 0.1, 20), delta=1e-4, run="1")
    one = epsilon_of([Spend(1.0, 0.1, 20)], delta=1e-4)
    # Execute / Assert: run 1 cannot spend the same again under a per-run cap of 1.01x one round; run 2 (one round) can
    with pytest.raises(BudgetExhausted, match="for this run"):
        ledger.check(Spend(1.0, 0.1, 20), delta=1e-4, budget=100, run="1", run_budget=1.01 * one)
    ledger.check(Spend(1.0, 0.1, 20), delta=1e-4, budget=100, run="2", run_budget=1.01 * one)
