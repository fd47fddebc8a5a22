"""fedlora ServerApp: parse the config, start the strategy, write the results."""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.adapter import from_arrayrecord, to_arrayrecord
from common.config import parse_config
from server.aggregation import make_aggregator
from server.central_dp import make_server_privacy
from server.grid import PromptGrid
from server.run import finish, prepare
from server.secagg import make_strategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_config(context.run_config)
    start = time.perf_counter()
    run = prepare(cfg)
    strategy = make_strategy(
        cfg.federation,
        make_aggregator(cfg.federation.aggregator, server_lr=cfg.federation.server_lr),
        run.recorder,
        seed=cfg.train.seed,
        secagg=cfg.secagg,
        privacy=make_server_privacy(cfg.privacy),
    )
    result = strategy.start(
        grid=PromptGrid(grid),
        initial_arrays=to_arrayrecord(run.initial),
        num_rounds=cfg.federation.rounds,
        timeout=cfg.federation.round_timeout,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
    )
    final = from_arrayrecord(result.arrays) if result.arrays is not None and len(result.arrays) else run.initial
    finish(run, final, seconds=time.perf_counter() - start)
