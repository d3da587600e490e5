"""The whole LoRA job, each tool as a whole process from launch to exit.

    python benchmarks/whole_job.py              # 12 optimizer steps per arm (make bench-job)
    python benchmarks/whole_job.py --quick      # 3 steps, a fast look
    TF_PEER_VENV=/path/to/venv python benchmarks/whole_job.py   # adds LLaMA-Factory itself

The job: the default model (SmolLM2-135M-Instruct, fp32), alpaca_en_demo (cutoff 512), LoRA r=8
alpha 16 on every linear layer but the head, lr 1e-4 cosine without warmup, batch 4 x
accumulation 2, 12 steps, the adapter saved at the end. The arms run one after another:
- peer: peft + transformers.Trainer with gradient checkpointing on, as LLaMA-Factory runs it
  (benchmarks/throughput_arms.run_peer; its examples come from tuneforge's tokenizer pipeline,
  in tuneforge's order, so that the losses compare);
- llamafactory: `llamafactory-cli train` itself, only where $TF_PEER_VENV is a venv that has it;
- tuneforge: `tuneforge train job.yaml`, the YAML holding LLaMA-Factory's keys (written below).

Per arm: wall seconds from launch to exit, split into start-up (launch to the first step's
start), training (first step's start to the last one's end), saving (to the end of the final
save) and exit (the interpreter's teardown; for LLaMA-Factory, whose save is not timed, all of
the end counts as saving); peak RSS of the whole process tree (sampled every 50 ms, and
at least the process's own VmHWM); CPU seconds (user + system of the process and its children);
the last step's loss. Each child writes its step times (time.time()) to a JSON file; nothing in
the tools' code changes. Goals (against llamafactory where it ran, else the peer): wall >= 4x
faster, peak RSS <= 0.6x, the last loss within 2 %.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANK, LR, SEED = 8, 1e-4, 42
GOAL_WALL, GOAL_RSS, GOAL_LOSS = 4.0, 0.6, 0.02
MB = 1 << 20


def job_keys(opts, output_dir: str) -> dict:
    """The job as LLaMA-Factory's YAML keys (both tuneforge and LLaMA-Factory read them)."""
    return {
        "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_rank": RANK, "lora_alpha": 2 * RANK,
        "lora_dropout": 0.0, "lora_target": "all", "dataset": opts.dataset, "dataset_dir": opts.dataset_dir,
        "cutoff_len": opts.cutoff, "per_device_train_batch_size": opts.batch,
        "gradient_accumulation_steps": opts.grad_accum, "learning_rate": LR, "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.0, "max_steps": opts.steps, "logging_steps": 1, "save_strategy": "no",
        "bf16": False, "seed": SEED, "output_dir": output_dir, "overwrite_output_dir": True,
        "report_to": "none", **opts.overrides,
    }


def write_yaml(path: Path, values: dict) -> Path:
    """JSON is YAML: one key per line, no yaml package needed in a peer's venv."""
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in values.items()) + "\n")
    return path


# ---- the children: one whole process each, writing their timeline -------------------------
def child_peer(opts) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import throughput_arms as arms

    opts.lr, opts.rank, opts.seed = LR, RANK, SEED
    r = arms.run_peer(opts)
    first, last = r["steps"][0], r["steps"][-1]
    positions = sum(s["positions"] for s in r["steps"])
    # transformers' causal LM computes the head's logits at every position, padding included
    return {"first_step": r["started_at"] + first["start"], "last_step": r["started_at"] + last["end"],
            "save_began": r.get("save_began"), "save_ended": r.get("save_ended"),
            "losses": [s["loss"] for s in r["steps"]],
            "work": {"real": sum(s["real"] for s in r["steps"]), "positions": positions, "head": positions,
                     "body_passes": 3}}  # forward, the checkpointed forward again, backward


def _trainer_step_times(times: dict) -> None:
    """Record the first optimizer step's start and the last one's end in `times`, by wrapping
    transformers' callback handler (works for any transformers.Trainer, e.g. LLaMA-Factory's)."""
    from transformers.trainer_callback import CallbackHandler

    begin, end = CallbackHandler.on_step_begin, CallbackHandler.on_step_end

    def on_step_begin(self, *a, **k):
        times.setdefault("first_step", time.time())
        return begin(self, *a, **k)

    def on_step_end(self, *a, **k):
        times["last_step"] = time.time()
        return end(self, *a, **k)

    CallbackHandler.on_step_begin, CallbackHandler.on_step_end = on_step_begin, on_step_end


def child_llamafactory(opts) -> dict:
    times: dict = {}
    _trainer_step_times(times)
    from llamafactory.cli import main

    sys.argv = ["llamafactory-cli", "train", opts.config]
    main()
    return times


def child_tuneforge(opts) -> dict:
    """`tuneforge train <config>` as the console script runs it, with the loop's train_step
    wrapped for its times (the loop's module is imported a little earlier than the CLI would)."""
    from tuneforge import cli, workflows
    from tuneforge.train import loop

    times: dict = {}
    work = times["work"] = {"real": 0, "positions": 0, "head": 0, "body_passes": 2}  # forward, backward
    step, save = loop.TrainingRun.train_step, workflows._save_outputs

    def counted(loss):
        def run(model, part):  # each forward the loop runs (a micro-batch, or each of its parts)
            work["positions"] += part["input_ids"].numel()
            work["head"] += int((part["labels"] != -100).sum())  # the fused loss's head: labelled rows only
            return loss(model, part)
        return run

    def train_step(self):
        times.setdefault("first_step", time.time())
        if not getattr(self.objective, "_counted", False):
            object.__setattr__(self.objective, "loss", counted(self.objective.loss))
            object.__setattr__(self.objective, "_counted", True)
        try:
            result = step(self)
            work["real"] += result[2]
            return result
        finally:
            times["last_step"] = time.time()

    def save_outputs(*a, **k):
        times["save_began"] = time.time()
        try:
            return save(*a, **k)
        finally:
            times["save_ended"] = time.time()

    loop.TrainingRun.train_step, workflows._save_outputs = train_step, save_outputs
    code = cli.main(["train", opts.config])
    if code:
        raise SystemExit(code)
    return times


def read_losses(output_dir: Path) -> list[float]:
    """The per-step losses of trainer_log.jsonl (tuneforge and LLaMA-Factory write the same lines)."""
    path = output_dir / "trainer_log.jsonl"
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e["loss"] for e in lines if "loss" in e]


# ---- the driver: launch, sample the tree's memory, wait -----------------------------------
def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_pids(pid: int) -> list[int]:
    """`pid` and every descendant, from /proc/<pid>/task/*/children."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return pids


def tree_rss(pid: int) -> int:
    """Resident bytes of the process tree under `pid` now."""
    return sum(_rss(p) for p in tree_pids(pid))


def run_process(cmd: list[str], env: dict, log_path: Path, interval: float = 0.05) -> dict:
    """Run `cmd` to its end: launch and exit times (time.time()), exit code, peak RSS of the tree
    (sampled; at least the process's own ru_maxrss), CPU seconds of it and its waited children."""
    launched = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        peak = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(interval)
    ended = time.time()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"launched": launched, "ended": ended, "code": proc.returncode,
            "peak_rss": max(peak, usage.ru_maxrss * 1024), "cpu_s": usage.ru_utime + usage.ru_stime}


def run_arm(arm: str, opts, tmp: Path) -> dict:
    out = tmp / f"{arm}-out"
    result = tmp / f"{arm}-result.json"
    python = sys.executable
    if arm == "llamafactory":
        python = str(Path(os.environ["TF_PEER_VENV"]) / "bin" / "python")
    config = tmp / f"{arm}.yaml"
    keys = job_keys(opts, str(out))
    if arm == "llamafactory":  # LLaMA-Factory names the model and its template
        keys = {"model_name_or_path": opts.model_dir, "template": "smollm2", **keys,
                "overwrite_cache": True}
    write_yaml(config, keys)
    cmd = [python, str(Path(__file__).resolve()), "--child", arm, "--config", str(config), "--result", str(result),
           "--steps", str(opts.steps), "--batch", str(opts.batch), "--grad-accum", str(opts.grad_accum),
           "--dataset", opts.dataset, "--dataset-dir", opts.dataset_dir, "--cutoff", str(opts.cutoff),
           "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(opts.threads), "PYTHONPATH": str(ROOT)}
    proc = run_process(cmd, env, tmp / f"{arm}.log")
    if proc["code"] != 0 or not result.is_file():
        tail = (tmp / f"{arm}.log").read_text().strip().splitlines() or ["no output"]
        print(f"  {arm}: FAILED (exit {proc['code']}): {tail[-1]}", flush=True)
        return {"arm": arm, "error": tail[-1], **proc}
    times = json.loads(result.read_text())
    losses = times.get("losses") or read_losses(out)
    r = {"arm": arm, **proc, **times, "losses": losses, "last_loss": losses[-1] if losses else None,
         "wall_s": proc["ended"] - proc["launched"], "startup_s": times["first_step"] - proc["launched"],
         "train_s": times["last_step"] - times["first_step"]}
    saved = times.get("save_ended")  # LLaMA-Factory's save is not timed: all of the end counts as saving
    r["save_s"] = (saved or proc["ended"]) - times["last_step"]
    r["exit_s"] = proc["ended"] - saved if saved else None
    print(f"  {arm}: done in {r['wall_s']:.0f} s", flush=True)
    return r


# ---- the report ----------------------------------------------------------------------------
def table(results: list[dict]) -> str:
    rows = ["| arm | wall s | start-up s | training s | saving s | exit s | peak RSS MB | CPU s | last loss |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['arm']} | failed: {r['error']} | | | | | | | |")
            continue
        loss = "-" if r["last_loss"] is None else f"{r['last_loss']:.4f}"
        leave = "-" if r["exit_s"] is None else f"{r['exit_s']:.1f}"
        rows.append(f"| {r['arm']} | {r['wall_s']:.1f} | {r['startup_s']:.1f} | {r['train_s']:.1f} | "
                    f"{r['save_s']:.1f} | {leave} | {r['peak_rss'] / MB:,.0f} | {r['cpu_s']:.1f} | {loss} |")
    return "\n".join(rows)


def matmul_work(model_dir: str, work: dict) -> float:
    """Multiply-adds (MAC) of the job's linear layers over training, forward and backward: each
    position through the decoder's linear layers `body_passes` times (the frozen weights need the
    input's gradient only, one matmul like the forward's; gradient checkpointing runs the forward
    twice), and through the output head twice (forward, input gradient) at `head` positions.
    Attention scores and LoRA's rank-8 matmuls are left out (a few %). From the model's
    config.json: hidden_size, intermediate_size, layers, heads, key/value heads, vocabulary."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    h, layers = c["hidden_size"], c["num_hidden_layers"]
    heads = c["num_attention_heads"]
    dim = c.get("head_dim") or h // heads
    kv = c.get("num_key_value_heads", heads) * dim
    per_layer = h * heads * dim * 2 + h * kv * 2 + 3 * h * c["intermediate_size"]  # q, o; k, v; gate, up, down
    return (work["positions"] * layers * per_layer * work["body_passes"]
            + work["head"] * h * c["vocab_size"] * 2)


def work_line(results: list[dict], model_dir: str) -> str | None:
    """What equal matmul speed would give: the peer's matmul work over tuneforge's (the training
    time's ratio if both computed their multiply-adds equally fast)."""
    by = {r["arm"]: r for r in results if "error" not in r and r.get("work")}
    if "peer" not in by or "tuneforge" not in by:
        return None
    peer, tf = (by[a]["work"] for a in ("peer", "tuneforge"))
    a, b = matmul_work(model_dir, peer), matmul_work(model_dir, tf)
    return (f"matmul work over training (linear layers, forward + backward): peer {a / 1e12:.2f} TMAC "
            f"({peer['positions']:,} positions for {peer['real']:,} real tokens, {peer['body_passes']} passes), "
            f"tuneforge {b / 1e12:.2f} TMAC ({tf['positions']:,} positions, {tf['head']:,} through the head, "
            f"{tf['body_passes']} passes): {a / b:.2f}x, the training time's ratio at equal matmul speed; "
            f"measured {by['peer']['train_s'] / by['tuneforge']['train_s']:.2f}x")


def goal_lines(results: list[dict]) -> list[str]:
    """The three goals (wall, peak RSS, loss), tuneforge against llamafactory where it ran, else the peer."""
    by = {r["arm"]: r for r in results if "error" not in r}
    ref = by.get("llamafactory") or by.get("peer")
    tf = by.get("tuneforge")
    if ref is None or tf is None:
        return ["goals: not judged (an arm failed or was not run)"]
    speed = ref["wall_s"] / tf["wall_s"]
    rss = tf["peak_rss"] / ref["peak_rss"]
    lines = [f"goal wall >= {GOAL_WALL:.0f}x {ref['arm']}: {speed:.2f}x -> {'met' if speed >= GOAL_WALL else 'not met'}",
             f"goal peak RSS <= {GOAL_RSS}x {ref['arm']}: {rss:.2f}x -> {'met' if rss <= GOAL_RSS else 'not met'}"]
    if ref["last_loss"] is None or tf["last_loss"] is None:
        lines.append("goal same loss within 2 %: not judged (no loss logged)")
    else:
        gap = abs(tf["last_loss"] - ref["last_loss"]) / abs(ref["last_loss"])
        lines.append(f"goal same last loss within {GOAL_LOSS:.0%}: {gap:.2%} apart -> "
                     f"{'met' if gap <= GOAL_LOSS else 'not met'}")
    return lines


def default_dataset_dir() -> str:
    return os.environ.get("TUNEFORGE_SHARED_DATA") or str(ROOT.parent / "shared" / "data")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per arm (3 with --quick)")
    ap.add_argument("--batch", type=int, default=4, help="per-device batch size")
    ap.add_argument("--grad-accum", type=int, default=2, help="gradient accumulation steps")
    ap.add_argument("--dataset", default="alpaca_en_demo", help="dataset name in --dataset-dir (alpaca_en_demo)")
    ap.add_argument("--dataset-dir", default=default_dataset_dir(),
                    help="folder with dataset_info.json (default: $TUNEFORGE_SHARED_DATA or ../shared/data)")
    ap.add_argument("--cutoff", type=int, default=512, help="cutoff_len")
    ap.add_argument("--arms", default="peer,llamafactory,tuneforge",
                    help="comma-separated (llamafactory only runs where TF_PEER_VENV is set)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config key for the tuneforge and llamafactory YAMLs, e.g. --set bf16=true")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="OMP_NUM_THREADS")
    ap.add_argument("--quick", action="store_true", help="3 steps per arm: a fast look")
    ap.add_argument("--json", help="write every number to this file")
    ap.add_argument("--child", choices=("peer", "llamafactory", "tuneforge"), help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--output-dir", help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    opts.overrides = dict(item.split("=", 1) for item in opts.set)
    opts.overrides = {k: json.loads(v) if v[:1] in "0123456789-[{" or v in ("true", "false", "null") else v
                      for k, v in opts.overrides.items()}
    if opts.child:
        child = {"peer": child_peer, "llamafactory": child_llamafactory, "tuneforge": child_tuneforge}[opts.child]
        Path(opts.result).write_text(json.dumps(child(opts)))
        return
    if opts.quick and "--steps" not in (argv or sys.argv):
        opts.steps = 3
    arms = [a.strip() for a in opts.arms.split(",") if a.strip()]
    if "llamafactory" in arms and not os.environ.get("TF_PEER_VENV"):
        arms.remove("llamafactory")
        print("llamafactory: not run (set TF_PEER_VENV to a venv with LLaMA-Factory installed)")
    if "llamafactory" in arms:
        sys.path.insert(0, str(ROOT))
        from tuneforge.models import default_model_dir
        opts.model_dir = str(default_model_dir())
    print(f"whole job: {opts.steps} steps x batch {opts.batch} x accumulation {opts.grad_accum}, cutoff "
          f"{opts.cutoff}, {opts.dataset}; arms: {', '.join(arms)}; load {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_arm(arm, opts, Path(tmp)) for arm in arms]
    print(table(results))
    for line in goal_lines(results):
        print(line)
    sys.path.insert(0, str(ROOT))
    from tuneforge.models import default_model_dir

    line = work_line(results, str(default_model_dir()))
    if line:
        print(line)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
