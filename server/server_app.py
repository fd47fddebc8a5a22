"""fedlora ServerApp: parse the config, wire the strategy, start it, write the results."""

from __future__ import annotations

import time
from logging import ERROR, INFO

from flwr.app import ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedlora.common.adapter import from_arrayrecord, to_arrayrecord
from fedlora.common.config import Config, parse_config
from fedlora.common.model import set_threads
from fedlora.common.offline import quiet_and_offline
from fedlora.server.aggregation import make_aggregator
from fedlora.server.bounds import UpdateBounds
from fedlora.server.screen import DirectionScreen
from fedlora.server.central_dp import make_server_privacy
from fedlora.server.grid import PromptGrid
from fedlora.server.lora_rules import make_lora_rule
from fedlora.server.memory import reuse_freed_memory
from fedlora.server.optimizers import make_server_optimizer
from fedlora.server.records import RoundRecorder
from fedlora.server.run import finish, prepare
from fedlora.server.strategy import FedLoraStrategy
from fedlora.server.transport import TenantsDeclined

app = ServerApp()


def make_strategy(cfg: Config, recorder: RoundRecorder, *, initial=None) -> FedLoraStrategy:
    """The one strategy, with the transport, aggregator, bounds, privacy, server optimizer and LoRA rule the
    config names (``initial``: the seeded initial adapter, where svd restarts the components it lacks)."""
    transport = None  # plain: validated individual updates
    if cfg.secagg.enabled:
        from fedlora.common.secagg import quantizer_for
        from fedlora.server.secagg import SecAggTransport

        transport = SecAggTransport(cfg.secagg, quantizer_for(cfg.secagg, cfg.federation), seed=cfg.train.seed)
    return FedLoraStrategy(cfg.federation, make_aggregator(cfg.federation), recorder, transport=transport,
                           bounds=UpdateBounds.from_config(cfg.federation),
                           screen=DirectionScreen.from_config(cfg.federation), privacy=make_server_privacy(cfg.privacy),
                           optimizer=make_server_optimizer(cfg.federation),
                           rule=make_lora_rule(cfg, initial=initial), seed=cfg.train.seed,
                           stop_on_failure=cfg.secagg.enabled and cfg.secagg.on_failure == "stop",
                           unpredictable_sampling=cfg.privacy.mode != "none")


@app.main()
def main(grid: Grid, context: Context) -> None:
    quiet_and_offline()
    cfg = parse_config(context.run_config)
    set_threads(cfg.train.threads)  # the server builds and checkpoints adapters on its own CPU
    reuse_freed_memory()  # each round's adapter-sized arrays reuse the last round's pages
    t0 = time.perf_counter()
    run = prepare(cfg, run_id=context.run_id)
    log(INFO, "fedlora: run %s writes to %s", context.run_id, run.run_dir)
    strategy = make_strategy(cfg, run.recorder, initial=run.initial)
    start = run.initial if run.start is None else run.start
    if run.rounds_done:  # a resumed run: continue after its last complete round
        strategy.resume(run.rounds_done, run.server_state or {}, optimizer_arrays=run.optimizer_arrays)
    if run.rounds_done >= cfg.federation.rounds:
        finish(run, start, seconds=0.0)
        return
    try:
        result = strategy.start(
            grid=PromptGrid(grid),
            initial_arrays=to_arrayrecord(start),
            num_rounds=cfg.federation.rounds - run.rounds_done,
            timeout=cfg.federation.round_timeout,
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
        )
    except TenantsDeclined as why:  # nothing later would differ: the run ends here, as failed
        log(ERROR, "fedlora: %s", why)
        finish(run, start, seconds=time.perf_counter() - t0, stopped=str(why))
        return
    final = from_arrayrecord(result.arrays) if result.arrays is not None and len(result.arrays) else start
    finish(run, final, seconds=time.perf_counter() - t0)
