"""benchmarks/api_load.py, small: 120 requests, 16 at a time, over real HTTP to a `tuneforge api`
engine in its own process on a tiny model (base + two adapters, streamed and whole answers, n 1-2,
malformed requests, clients that disconnect mid-answer). The context is a million tokens and the
clients that leave send no max_tokens, so a generation that outlived its client would still be
running when the load is over."""

from __future__ import annotations

import importlib.util
import signal
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "api_load.py"


def _bench():
    spec = importlib.util.spec_from_file_location("api_load", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bounded_load_has_no_failures_and_leaves_nothing_running(tmp_path):
    bench = _bench()
    model, adapters = bench.make_models(tmp_path, tiny=True)
    server = bench.Server(model, adapters, context=1_000_000, threads=1)
    try:
        report = bench.run_load(server, bench.make_plan(120, seed=1), concurrency=16, timeout=30,
                                fail_fast=True)
    finally:
        code, log = server.stop()
    print(report)
    assert report["failures"] == 0, report["first_failures"]
    assert report["kinds"]["bad"] > 0 and report["generations_of_clients_that_left"] > 0
    assert report["live_after_settle"] == 0          # no generation outlived its client
    assert report["stopped_as_their_client_left"] > 0
    assert report["batch_state_released"]            # no KV cache held once idle
    assert report["rss_mb"]["after"] < report["rss_mb"]["before"] + 150
    assert code in (0, -signal.SIGTERM) and "Traceback" not in log, log
