"""Bounded load on `tuneforge api` with real HTTP clients, including clients that give up.

    python benchmarks/api_load.py                          # default model, 1000 requests, 16 at a time
    python benchmarks/api_load.py --tiny --requests 200    # a tiny random Llama (seconds)

The server runs in its own process (the engine `tuneforge api` builds: the base model and two
random LoRA adapters, served as base/alpha/beta; one extra route, /bench/stats, reports the
batcher's counters). `--concurrency` client threads send the requests of a fixed random plan, each
over its own connection:

- whole / stream: a normal request (base or an adapter, n 1 or 2, greedy or seeded sampling,
  sometimes a stop string, max_tokens 8-48), checked: 200, n choices, a finish reason each,
  completion tokens within max_tokens, a stream that ends with [DONE] and no error event;
- leave-stream / leave-whole: no max_tokens (the answer may run to the end of the context); the
  client reads a few chunks of the stream, or waits a moment for a whole answer, and disconnects;
- bad: a malformed request (seed 2**64, an image part, temperature 5, ...), which must get a 400
  while the requests batched beside it are served.

Printed: failures (with the first few), server RSS before the load (after a warm-up), at its
peak and after it, and whether any generation outlived its client: the requests the server
still holds once every client is done (must be 0 within a couple of seconds), requests stopped
against clients that left, the longest stop-to-leave lag, and the server's CPU use once idle.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTIONS = ["Who are you?", "Name three colours of the rainbow.", "What is 12 plus 30?",
             "Write one sentence about the sea.", "Give me a tip for learning to cook.",
             "What is the capital of France?", "Explain what a cat is to a child.",
             "Suggest a name for a small boat."]
BAD = [({"seed": 2**64}, "seed"), ({"temperature": 5}, "temperature"), ({"n": 100}, "n"),
       ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content[0]"),
       ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        "messages[0].content[0].text"),
       ({"max_tokens": -1}, "max_tokens"), ({"stop": 7}, "stop")]
KINDS = {"whole": 0.35, "stream": 0.35, "leave-stream": 0.1, "leave-whole": 0.1, "bad": 0.1}


# ---- the models and the server process --------------------------------------------------------
def make_models(root: Path, tiny: bool) -> tuple[str, list[str]]:
    """(base model path, two random adapter paths) under root."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.adapters import LoraConfig, add_adapter, save_adapter
    from tuneforge.models import default_model_dir

    base = default_model_dir()
    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(base)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=512, tie_word_embeddings=True,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        base = root / "tiny"
        LlamaForCausalLM(config).save_pretrained(base)
        tokenizer.save_pretrained(base)
    adapters = []
    for i, name in enumerate(("alpha", "beta")):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        add_adapter(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if tiny else 0.01))
        save_adapter(model, root / name)
        adapters.append(str(root / name))
        del model
    return str(base), adapters


def serve_main(args) -> None:
    """The server process: the engine `tuneforge api` builds, plus /bench/stats."""
    import psutil

    from tuneforge.api.server import make_server
    from tuneforge.config import load_config
    from tuneforge.infer.engine import Engine

    parent = os.getppid()

    def orphaned() -> None:  # the load driver died: do not linger
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=orphaned, daemon=True).start()
    cfg = load_config(None, {"model_name_or_path": args.model, "adapter_name_or_path": args.adapters,
                             "infer_dtype": "float32"})
    engine = Engine.from_config(cfg)
    engine.base_name = "base"
    if args.context:
        engine.context = args.context
    server = make_server(engine, "127.0.0.1", args.port, drain_timeout=5, log_level="warning")
    me = psutil.Process()

    @server.config.app.get("/bench/stats")
    def stats() -> dict:
        return {**engine.batcher.stats(), "rss_mb": me.memory_info().rss / 2**20,
                "context": engine.context}

    server.run()


class Server:
    def __init__(self, model: str, adapters: list[str], context: int | None = None, threads: int | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        cmd = [sys.executable, __file__, "--serve", "--port", str(self.port), "--model", model,
               "--adapters", ",".join(adapters)] + (["--context", str(context)] if context else [])
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while True:
            try:
                self.stats()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start:\n" + self.proc.stdout.read())
                time.sleep(0.3)
        import psutil

        self.process = psutil.Process(self.proc.pid)

    def stats(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", "/bench/stats")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def rss_mb(self) -> float:
        return self.process.memory_info().rss / 2**20

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode, self.proc.stdout.read()


# ---- the clients --------------------------------------------------------------------------------
def make_plan(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    kinds, weights = zip(*KINDS.items())
    plan = []
    for i in range(count):
        kind = rng.choices(kinds, weights)[0]
        body = {"model": rng.choice(["base", "alpha", "beta"]),
                "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}]}
        if rng.random() < 0.5:
            body["temperature"] = 0
        else:
            body.update(temperature=0.8, top_p=0.9, seed=rng.randrange(2**31))
        spec = {"id": i, "kind": kind, "body": body}
        if kind in ("whole", "stream"):
            body["max_tokens"] = rng.randrange(8, 49)
            body["n"] = 2 if rng.random() < 0.2 else 1
            if rng.random() < 0.2:
                body["stop"] = [rng.choice(["\n", ".", " the"])]
            if kind == "stream":
                body["stream"] = True
                if rng.random() < 0.5:
                    body["stream_options"] = {"include_usage": True}
        elif kind == "leave-stream":
            body.update(stream=True, n=rng.choice([1, 1, 2]))
            spec["read"] = rng.randrange(1, 6)  # content chunks read before leaving
        elif kind == "leave-whole":
            body["n"] = rng.choice([1, 1, 2])
            spec["wait"] = rng.uniform(0.1, 1.0)  # seconds before leaving
        else:
            extra, spec["param"] = rng.choice(BAD)
            body.update(extra)
        plan.append(spec)
    return plan


def run_one(port: int, spec: dict, timeout: float = 600) -> str | None:
    """Send one request as its spec says; None when all is as it should be, else what was wrong."""
    body = spec["body"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        kind = spec["kind"]
        if kind == "leave-whole":
            time.sleep(spec["wait"])
            return None  # closed below without reading
        response = conn.getresponse()
        if kind == "bad":
            error = json.loads(response.read()).get("error", {})
            return None if response.status == 400 and error.get("param") == spec["param"] else \
                f"bad request answered {response.status} {error}"
        if response.status != 200:
            return f"{kind}: status {response.status} {response.read()[:200]!r}"
        if kind == "whole":
            return _check_whole(json.loads(response.read()), body)
        if kind == "leave-stream":
            seen = 0
            while seen < spec["read"]:
                line = response.readline()
                if not line:
                    return "leave-stream: the stream ended early"
                seen += line.startswith(b'data: {') and b'"content":"' in line and b'"content":""' not in line
            response.close()
            return None
        return _check_stream(response.read().decode(), body)
    except Exception as exc:  # noqa: BLE001 - every client error is a failure to report
        return f"{spec['kind']}: {type(exc).__name__}: {exc}"
    finally:
        conn.close()


def _check_whole(answer: dict, body: dict) -> str | None:
    choices = answer.get("choices", [])
    if len(choices) != body["n"] or any(c.get("finish_reason") not in ("stop", "length") for c in choices):
        return f"whole: choices {choices}"
    if answer["usage"]["completion_tokens"] > body["n"] * body["max_tokens"]:
        return f"whole: usage {answer['usage']} over max_tokens {body['max_tokens']}"
    return None


def _check_stream(text: str, body: dict) -> str | None:
    events = [e[6:] for e in text.split("\n\n") if e.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return f"stream: no [DONE] at the end: {text[-300:]!r}"
    chunks = [json.loads(e) for e in events[:-1]]
    if any("error" in c for c in chunks):
        return f"stream: error event {[c for c in chunks if 'error' in c][0]}"
    finished = sorted(ch["index"] for c in chunks for ch in c["choices"] if ch.get("finish_reason"))
    if finished != list(range(body["n"])):
        return f"stream: finish chunks for {finished}"
    return None


def run_load(server: Server, plan: list[dict], concurrency: int, timeout: float = 600,
             fail_fast: bool = False) -> dict:
    """Drive `plan` through `concurrency` client threads; returns the numbers printed by main.
    timeout: seconds a client waits on the server; fail_fast: after the first failure the
    requests not yet sent are skipped (and count as failures)."""
    for spec in make_plan(8, seed=99):  # warm-up: every kind once or so
        run_one(server.port, spec)
    _settle(server)
    before = server.rss_mb()
    peak = [before]
    running = threading.Event()
    running.set()

    def watch() -> None:
        while running.is_set():
            peak[0] = max(peak[0], server.rss_mb())
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()
    start_stats = server.stats()
    t0 = time.monotonic()
    failed = threading.Event()

    def client(spec: dict) -> str | None:
        if fail_fast and failed.is_set():
            return "skipped after an earlier failure"
        problem = run_one(server.port, spec, timeout)
        if problem:
            failed.set()
        return problem

    with ThreadPoolExecutor(concurrency) as pool:
        problems = list(pool.map(client, plan))
    wall = time.monotonic() - t0
    running.clear()
    # every client is done: what the server still generates now outlived its client
    live_now = server.stats()["live"]
    settled = _settle(server, limit=5.0)
    cpu = server.process.cpu_percent(interval=None)
    time.sleep(2.0)
    cpu = server.process.cpu_percent(interval=None)
    end_stats = server.stats()
    time.sleep(1.0)
    failures = [(spec["id"], spec["kind"], p) for spec, p in zip(plan, problems) if p]
    left = sum(spec["kind"].startswith("leave") * spec["body"].get("n", 1) for spec in plan)
    return {
        "requests": len(plan), "concurrency": concurrency, "wall_s": round(wall, 1),
        "failures": len(failures), "first_failures": failures[:5],
        "kinds": {k: sum(s["kind"] == k for s in plan) for k in KINDS},
        "rss_mb": {"before": round(before), "peak": round(max(peak[0], server.rss_mb())),
                   "after": round(server.rss_mb())},
        "live_when_clients_done": live_now, "live_after_settle": settled,
        "generations_of_clients_that_left": left,
        "stopped_as_their_client_left": _delta(start_stats, end_stats, "client"),
        "stopped_by_a_stop_string": _delta(start_stats, end_stats, "stop"),
        "finished_generations": end_stats["finished"] - start_stats["finished"],
        "stop_lag_max_s": end_stats["stop_lag_max_s"], "idle_cpu_percent": cpu,
        "largest_batch": end_stats["largest_batch"], "batch_state_released": not end_stats["cache"],
    }


def _delta(start: dict, end: dict, reason: str) -> int:
    return end["stopped_by"].get(reason, 0) - start["stopped_by"].get(reason, 0)


def _settle(server: Server, limit: float = 30.0) -> int:
    """Wait (up to `limit` s) until the server holds no request; returns how many it still holds."""
    deadline = time.monotonic() + limit
    while (live := server.stats()["live"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return live


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of the default model")
    parser.add_argument("--context", type=int, help="serve with this context instead of the model's")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--adapters", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve_main(args)
    with tempfile.TemporaryDirectory() as tmp:
        model, adapters = make_models(Path(tmp), args.tiny)
        server = Server(model, adapters, args.context, args.threads)
        try:
            report = run_load(server, make_plan(args.requests, args.seed), args.concurrency)
        finally:
            code, log = server.stop()
        report["server_exit_code"] = code
        report["server_tracebacks"] = log.count("Traceback")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
