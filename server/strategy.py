"""The fedlora strategy: LoRA deltas on Flower's Message API, through one of two transports.

Each training round reads, in one place:

    configure (sample, build messages: the transport) -> Flower sends and collects ->
    collect (validate or unmask: the transport, against the LoRA rule's reference) -> bound (weights,
    norms, central clip) -> aggregate (the LoRA rule, through the aggregator) -> noise (central DP) ->
    apply (the LoRA rule, through the server optimizer) -> checkpoint, audit

Differences from Flower's stock FedAvg, each for a reason:

* clients send **deltas** (local - global), and only LoRA tensors;
* every reply is validated before it counts (finite values, exact tensor names, shapes
  and dtypes, example count in range, exact metric keys); a bad reply is dropped with
  the tenant and the reason, and the round goes on with the rest;
* where the server sees individual updates it bounds them (``fedlora.server.bounds``) and can
  aggregate robustly (``fedlora.server.aggregation``); under secure aggregation it sees only the sum;
* sampling waits for the minimum number of tenants only up to the round timeout, so a
  lost tenant never hangs a run;
* how LoRA's A and B factors are federated is a rule (``fedlora.server.lora_rules``: ab averages
  them separately, ffa federates B alone over a frozen shared A, svd factors the mean of the
  tenants' products back to rank r);
* the mean delta is applied by a server optimizer (``fedlora.server.optimizers``: sgd, which is
  FedAvg's step, fedexp, or fedavgm / fedadam / fedyogi / fedadagrad), whose moments are saved with
  each checkpoint so a resumed run continues exactly;
* each round's global adapter is checkpointed atomically and its record (metrics, bytes,
  per-tenant audit) written (``fedlora.server.records``).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import replace
from collections.abc import Iterable
from logging import ERROR, INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora.common import messages as keys
from fedlora.common.adapter import from_arrayrecord, to_arrayrecord
from fedlora.common.config import FederationConfig
from fedlora.common.encoding import encoding_for
from fedlora.common.weighting import parse_caps
from fedlora.server.aggregation import (Aggregator, Rejected, WeightedSum, check_metric_values, l2_norm,
                                        weight_rule)
from fedlora.server.bounds import UpdateBounds, audit, bounds_info, screen_out
from fedlora.server.screen import DirectionScreen, sample
from fedlora.server.central_dp import NoServerPrivacy, ServerPrivacy
from fedlora.server.identity import TenantRoster, parse_tenant_nodes
from fedlora.server.lora_rules import AB, LoraRule
from fedlora.server.optimizers import ServerOptimizer, make_server_optimizer, resume_mismatch
from fedlora.server.records import RoundRecorder
from fedlora.server.transport import (POLICY_DECLINE, Collected, PlainTransport, RoundFailed, TenantsDeclined,
                                      Transport, sender)


class NotEnoughTenants(RuntimeError):
    """Fewer tenants connected than the minimum, for longer than the round timeout."""


def sample_nodes(grid: Grid, *, fraction: float, minimum: int, timeout: float,
                 rng: random.Random, poll: float = 1.0) -> tuple[list[int], int]:
    """Sample ``max(fraction * connected, minimum)`` nodes, waiting at most ``timeout`` s
    for ``minimum`` to connect. Returns (sampled ids, connected count)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            break
        if time.monotonic() > deadline:
            raise NotEnoughTenants(f"only {len(nodes)} tenant(s) connected after {timeout:.0f}s; "
                                   f"federation.min-train-nodes is {minimum}")
        log(INFO, "Waiting for tenants: %d connected, %d needed", len(nodes), minimum)
        time.sleep(poll)
    size = min(len(nodes), max(int(round(fraction * len(nodes))), minimum))
    return sorted(rng.sample(nodes, size)), len(nodes)


class FedLoraStrategy(Strategy):
    """LoRA-delta aggregation with validation, bounds, bounded sampling, audit and recording."""

    def __init__(self, cfg: FederationConfig, aggregator: Aggregator, recorder: RoundRecorder, *,
                 transport: Transport | None = None, bounds: UpdateBounds | None = None,
                 privacy: ServerPrivacy | None = None, optimizer: ServerOptimizer | None = None,
                 rule: LoraRule | None = None, seed: int = 0, stop_on_failure: bool = False,
                 unpredictable_sampling: bool = False, screen: DirectionScreen | None = None) -> None:
        self.cfg = cfg
        self.aggregator = aggregator
        self.recorder = recorder
        self.rule = AB() if rule is None else rule  # how A and B are federated (fedlora.server.lora_rules)
        self.transport = transport if transport is not None else PlainTransport(
            max_examples=cfg.max_examples, weight_of=weight_rule(cfg.weighting, max_weight=cfg.max_weight,
                                                                 caps=parse_caps(cfg.example_caps)),
            check_shapes=self.rule.check_shapes, encoding=encoding_for(cfg))
        # The step from the mean delta; the config's (sgd: x += server-lr * mean) unless given.
        self.optimizer = make_server_optimizer(cfg) if optimizer is None else optimizer
        problems = self.rule.problems(aggregator=aggregator, optimizer_name=self.optimizer.name,
                                      reveals_individual_updates=self.transport.reveals_individual_updates)
        if self.optimizer.needs_update_norms and not self.transport.reveals_individual_updates:
            problems.append(f"federation.server-optimizer: {self.optimizer.name!r} needs each update's norm, but "
                            f"{self.transport.name} reveals only their sum; use sgd or fedavgm")
        if aggregator.needs_individual_updates and not self.transport.reveals_individual_updates:
            problems.append(f"federation.aggregator: {aggregator.name!r} needs individual updates, but "
                            f"{self.transport.name} reveals only their sum; use fedavg")
        try:
            self.roster = TenantRoster(parse_tenant_nodes(cfg.tenant_nodes))
        except ValueError as why:
            problems.append(str(why))
        if problems:
            from fedlora.common.config import ConfigError

            raise ConfigError(problems)
        self.transport.roster = self.roster
        self.privacy = NoServerPrivacy() if privacy is None else privacy  # central DP, or nothing
        # no bounds unless given; the privacy mechanism keeps only those its sensitivity allows
        self.bounds = self.privacy.bounds(bounds if bounds is not None else UpdateBounds())
        # updates pointing away from the round's consensus: dropped (or, under central DP, flagged)
        self.screen = self.privacy.screen(screen if screen is not None else DirectionScreen.from_config(cfg))
        self._audit_key = os.urandom(16)  # which coordinates the screen samples: nobody can predict them
        self._moments_file: str | None = None  # where the optimizer's moments were last saved
        # which tenants take part: from the seed, or (under DP: amplification by sampling needs a
        # draw nobody can predict, and the seed is in the published config) from the OS
        self.rng = random.SystemRandom() if unpredictable_sampling else random.Random(seed)
        self.seed = seed
        self.stop_on_failure = stop_on_failure
        self._global: dict | None = None
        self._sent: list[Message] = []  # this stage's messages, to match replies to nodes
        self._train_sent: list[Message] = []  # the round's training (or SecAgg+ upload) messages
        self._sampled = self._connected = 0
        self.round_offset = 0  # rounds done before this start (a resumed run)

    # -- resume -------------------------------------------------------------------
    def resume_state(self) -> dict:
        """Everything besides the global adapter that the next round depends on (JSON). The
        optimizer's moments are adapter-sized: the state names their safetensors file
        (``checkpoints/round_XXX/server_optimizer.safetensors``; None before the first step)."""
        if isinstance(self.rng, random.SystemRandom):
            rng = None  # nothing to resume: the next draw is as unpredictable as the first
        else:
            version, internal, gauss = self.rng.getstate()
            rng = [version, list(internal), gauss]
        return {"rng": rng, "privacy": self.privacy.state(), "audit_key": self._audit_key.hex(),
                "optimizer": {"name": self.optimizer.name, "file": self._moments_file}}

    def resume(self, rounds_done: int, state: dict, *, optimizer_arrays: dict | None = None) -> None:
        """Continue after round ``rounds_done`` of an interrupted run, from its recorded state
        and the moments read from the file it names (``fedlora.server.run`` reads them)."""
        saved = state.get("optimizer", {})
        why = resume_mismatch(saved, self.optimizer.name)
        if why is not None:
            raise ValueError(why)
        if saved.get("file") and optimizer_arrays is None:
            raise ValueError(f"the recorded state names the server optimizer's moments {saved['file']}, "
                             "but none were given")
        if state.get("rng") is not None and not isinstance(self.rng, random.SystemRandom):
            version, internal, gauss = state["rng"]
            self.rng.setstate((version, tuple(internal), gauss))
        self.privacy.restore(state.get("privacy", {}))
        if state.get("audit_key"):
            self._audit_key = bytes.fromhex(state["audit_key"])
        self.optimizer.load_state_arrays(optimizer_arrays or {})
        self._moments_file = saved.get("file")
        self.round_offset = rounds_done

    def summary(self) -> None:
        log(INFO, "\t├── Transport: %s", self.transport.summary())
        log(INFO, "\t├── LoRA rule: %s", self.rule.describe())
        log(INFO, "\t├── Aggregator: %s", self.aggregator.describe())
        log(INFO, "\t├── Server optimizer: %s", self.optimizer.describe())
        log(INFO, "\t├── Bounds: %s", self.bounds.describe() if self.transport.reveals_individual_updates
            else "none on individual updates (the server sees only the sum)")
        log(INFO, "\t├── Sampling: fraction %.2f, minimum %d", self.cfg.fraction_train, self.cfg.min_train_nodes)
        log(INFO, "\t└── Weights: %s, cap %d examples; round timeout %.0fs", self.cfg.weighting,
            self.cfg.max_weight, self.cfg.round_timeout)

    def _config(self, config: ConfigRecord, server_round: int, **extra) -> ConfigRecord:
        return ConfigRecord({**dict(config), keys.ROUND: server_round, keys.SEED: self.seed, **extra})

    def _evaluates_with_train(self, server_round: int) -> bool:
        """Whether round ``server_round``'s training messages also evaluate the adapter they
        carry, round ``server_round - 1``'s (``federation.evaluate-with-train``)."""
        return self.cfg.evaluate_with_train and self.cfg.fraction_evaluate > 0.0 and server_round > 1

    # -- training -----------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset  # Flower counts from 1 on every start
        self._global = from_arrayrecord(arrays)
        nodes, connected = sample_nodes(grid, fraction=self.cfg.fraction_train,
                                        minimum=self.cfg.min_train_nodes,
                                        timeout=self.cfg.round_timeout, rng=self.rng)
        self.recorder.start_round(server_round, sampled=nodes, connected=connected)
        self._sampled, self._connected = len(nodes), connected
        log(INFO, "Round %d: %d of %d tenants sampled", server_round, len(nodes), connected)
        extra = {keys.EVALUATE_FIRST: True} if self._evaluates_with_train(server_round) else {}
        msgs, key_bytes = self.transport.configure(server_round, nodes, arrays,
                                                   self._config(config, server_round, **extra), grid)
        self.recorder.add_bytes(down=key_bytes + arrays.count_bytes() * len(msgs))
        self._train_sent = msgs
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset  # Flower counts from 1 on every start
        assert self._global is not None
        replies = list(replies)
        if self._evaluates_with_train(server_round):
            self._evaluation_with_train(server_round - 1, replies)
        got = self.transport.collect(server_round, replies, reference=self.rule.reference(self._global))
        self._record_collected(server_round, got)
        summed, audits, info = self._aggregate(got, server_round)
        short = None
        if summed is not None and summed.count < self.cfg.min_train_nodes:  # a floor on what is summed too
            short = (f"{summed.count} valid update(s), fewer than federation.min-train-nodes = "
                     f"{self.cfg.min_train_nodes}")
            summed = None
        if summed is None:
            reason = got.failure or short or "no valid update"
            log(ERROR if got.failure else WARNING, "Round %d: %s; the global adapter stays as it was",
                server_round, reason)
            self.recorder.audit(audits, {**info, "not_aggregated": reason})
            self.recorder.end_train(None)
            if got.failure and self.stop_on_failure:
                self.recorder.end_round(self.resume_state())
                raise RoundFailed(f"round {server_round}: {got.failure}")
            if got.dropped and all(POLICY_DECLINE in why for _, why in got.dropped):
                self.recorder.end_round(self.resume_state())
                raise TenantsDeclined(f"round {server_round}: every tenant declined this run under its own policy "
                                      f"(the reasons are in the round's record); the run stops")
            return None, None
        t = time.perf_counter()
        summed = self.privacy.on_server_aggregate(summed, received=summed.count, sampled=self._sampled,
                                                  connected=self._connected)
        self.recorder.privacy(self.privacy.round_report())
        new_global = self.rule.step(self.optimizer, self._global, summed)
        info["server_seconds"] = round(info.get("server_seconds", 0.0) + time.perf_counter() - t, 6)
        info["server_optimizer"] = self.optimizer.describe()
        info.update(self.optimizer.round_info())
        self.recorder.audit(audits, info)
        self._global = new_global
        saved = self.recorder.end_train(new_global, optimizer_arrays=self.optimizer.state_arrays(),
                                        optimizer_name=self.optimizer.name)
        self._moments_file = saved or self._moments_file
        rule_metrics = self.rule.round_metrics()
        if rule_metrics:
            log(INFO, "Round %d: LoRA rule %s: %s", server_round, self.rule.name,
                ", ".join(f"{k} {v:.3g}" for k, v in rule_metrics.items()))
        return to_arrayrecord(new_global), MetricRecord({**self._train_metrics(got, summed), **rule_metrics})

    def _record_collected(self, server_round: int, got: Collected) -> None:
        self.recorder.add_bytes(down=got.bytes_down, up=got.bytes_up)
        for node, metrics in got.metrics.items():  # first: they name the tenants behind the nodes
            self.recorder.train_reply(node, metrics)
        for node, reason in got.dropped:
            log(WARNING, "Round %d: reply from node %d dropped: %s", server_round, node, reason)
            self.recorder.drop(node, reason)
        if got.report is not None:
            self.recorder.secagg(got.report)

    def _aggregate(self, got: Collected, server_round: int) -> tuple[WeightedSum | None, dict, dict]:
        """The round's sum: the transport's (secure) or bounded and aggregated here (plain)."""
        t = time.perf_counter()
        info: dict = {"aggregator": self.aggregator.describe(), "transport": self.transport.name,
                      "lora_rule": self.rule.name}
        if got.total is not None:
            return self.rule.restrict(got.total), {}, {**info, "server_seconds": round(time.perf_counter() - t, 6)}
        if not got.updates:
            return None, {}, info
        # in the order of the tenants (node ids change from run to run; tenants do not), whatever the
        # order of arrival: the same replies give the same bytes, and a resumed run the uninterrupted one's
        got = replace(got, updates=sorted(got.updates, key=lambda u: (int(u.metrics.get(keys.TENANT, 0)), u.node)))
        bounded = self.bounds.apply(got.updates)
        received = self.rule.comparable(got.updates, self._global)  # of one shape, for the screen and audit
        view = sample(received, coordinates=self.screen.coordinates, key=self._audit_key, server_round=server_round)
        outliers = self.screen.outliers(view)
        if self.screen.action == "drop":
            screen_out(bounded, outliers)
        info.update(bounds_info(self.bounds, bounded), screen=self.screen.describe(),
                    audit_coordinates=f"{view.coordinates} of {view.total}")
        for node, (action, why) in bounded.actions.items():
            if action == "dropped":
                self.recorder.drop(node, f"server bound: {why}", after_training=True)
        kept = [self.privacy.bound_update(u) for u in bounded.kept]
        for u in kept:
            self.recorder.weight(u.node, u.weight)
        if not kept:
            return None, audit(received, bounded, [], None, view=view, outliers=outliers), info
        summed, decided = self.rule.combine(self.aggregator, kept, self._global)
        if self.optimizer.needs_update_norms:  # fedexp: sum_k w_k ||delta_k||^2 / sum_k w_k
            summed = replace(summed, sq_norm_mean=sum(u.weight * l2_norm(u.delta) ** 2 for u in kept) / summed.weight)
        info.update(decided)
        excluded = {n: "left out by the aggregator" for n in decided.get("rejected", [])}
        audits = audit(received, bounded, self.rule.comparable(kept, self._global), summed.total,
                       view=view, outliers=outliers, excluded=excluded)
        info["server_seconds"] = round(time.perf_counter() - t, 6)  # the audit included: it is server work
        for node, a in audits.items():
            if a.outlier:
                log(WARNING, "Round audit: node %d flagged: %s", node, a.why)
        return summed, audits, info

    def _train_metrics(self, got: Collected, summed: WeightedSum) -> dict:
        if got.updates:
            return _weighted_metrics([(u.weight, u.metrics) for u in got.updates], exclude=(keys.TENANT,))
        names = sorted(keys.SECAGG_TRAIN_METRICS - {keys.TENANT})  # each over the tenants that sent it
        metrics = {k: float(np.mean(sent)) for k in names if (sent := [m[k] for m in got.metrics.values() if k in m])}
        metrics[keys.NUM_EXAMPLES] = int(summed.weight)  # the total weight, all the server learns
        return metrics

    # -- evaluation ---------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset  # Flower counts from 1 on every start
        if self.cfg.fraction_evaluate == 0.0:
            return []
        if self.cfg.evaluate_with_train and server_round < self.cfg.rounds:
            return []  # the next round's training messages evaluate this adapter
        nodes, _ = sample_nodes(grid, fraction=self.cfg.fraction_evaluate, minimum=1,
                                timeout=self.cfg.round_timeout, rng=self.rng)
        content = RecordDict({keys.ARRAYS: arrays, keys.CONFIG: self._config(config, server_round)})
        self._sent = [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n) for n in nodes]
        self.recorder.add_bytes(down=arrays.count_bytes() * len(self._sent))
        return self._sent

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset  # Flower counts from 1 on every start
        evaluated, dropped = _evaluations(self._sent, replies, keys.METRICS, roster=self.roster,
                                          max_examples=self.cfg.max_examples)
        for node, reason in dropped:
            log(WARNING, "Round %d: evaluation from node %d dropped: %s", server_round, node, reason)
            self.recorder.drop(node, f"evaluation: {reason}")
        for node, metrics in evaluated.items():
            self.recorder.eval_reply(node, metrics)
        self.recorder.end_round(self.resume_state())
        return _mean_evaluation(evaluated)

    def _evaluation_with_train(self, evaluated_round: int, replies: list[Message]) -> None:
        """The evaluation of round ``evaluated_round``'s adapter that this round's training
        replies carry: written into that round's record (``federation.evaluate-with-train``)."""
        evaluated, dropped = _evaluations(self._train_sent, replies, keys.EVALUATION, roster=self.roster,
                                          max_examples=self.cfg.max_examples)
        for node, reason in dropped:
            log(WARNING, "Round %d: evaluation from node %d dropped: %s", evaluated_round, node, reason)
        self.recorder.late_evaluation(evaluated_round, evaluated,
                                      [(node, f"evaluation: {reason}") for node, reason in dropped])
        mean = _mean_evaluation(evaluated)
        if mean is not None:
            log(INFO, "Round %d: evaluation (with round %d's training): %s", evaluated_round, evaluated_round + 1,
                dict(mean))


def _evaluations(sent: list[Message], replies: Iterable[Message], record: str, *, roster: TenantRoster,
                 max_examples: int) -> tuple[dict[int, dict], list[tuple[int, str]]]:
    """Each reply's evaluation metrics (its ``record``), checked against the protocol (keys,
    each value finite and in range, the example count at most ``max_examples``, the tenant the
    node is); and (node, reason) for each reply without a valid one."""
    evaluated, dropped = {}, []
    for node, msg in sorted(((sender(sent, m), m) for m in replies), key=lambda nm: nm[0]):  # not by arrival
        if msg.has_error():
            dropped.append((node, msg.error.reason if record == keys.METRICS else
                            f"lost with the training reply, an error: {msg.error.reason}"))
        elif record not in msg.content.metric_records:
            dropped.append((node, "reply lacks metrics" if record == keys.METRICS else
                            "the training reply carries none (the tenant's log says why)"))
        elif not (set(metrics := dict(msg.content.metric_records[record])) <= keys.EVAL_METRICS
                  and keys.REQUIRED_METRICS <= set(metrics)):
            dropped.append((node, f"metric keys {sorted(metrics)} differ from the protocol"))
        else:
            try:
                check_metric_values(metrics, max_examples=max_examples)
                roster.tenant_of(node, metrics[keys.TENANT])
            except Rejected as why:
                dropped.append((node, str(why)))
                continue
            evaluated[node] = metrics
    return evaluated, dropped


def _mean_evaluation(evaluated: dict[int, dict]) -> MetricRecord | None:
    if not evaluated:
        return None
    return MetricRecord(_weighted_metrics([(float(m[keys.NUM_EXAMPLES]), m) for m in evaluated.values()],
                                          exclude=(keys.TENANT,)))


def _weighted_metrics(items: list[tuple[float, dict]], *, exclude: tuple[str, ...]) -> dict[str, float]:
    names = sorted({k for _, m in items for k in m if k not in exclude and k != keys.NUM_EXAMPLES})
    out = {}
    for k in names:  # each metric over the tenants that sent it (a tenant's policy may withhold any)
        sent = [(w, float(m[k])) for w, m in items if k in m]
        total = sum(w for w, _ in sent)
        out[k] = sum(w * v for w, v in sent) / total if total > 0 else float(np.mean([v for _, v in sent]))
    out[keys.NUM_EXAMPLES] = int(sum(m[keys.NUM_EXAMPLES] for _, m in items))
    return out
