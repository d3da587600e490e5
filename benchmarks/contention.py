"""LoRA training speed beside another busy process (issue 21): tuneforge against the peer.

    python benchmarks/contention.py                 # make bench-contention: 2 workloads x 2 arms x 3 conditions
    python benchmarks/contention.py --quick         # the demo workload only, 3 steps, one repeat
    python benchmarks/contention.py --workloads alpaca --conditions quiet,torch --threads 2,1 \\
        --policies default,passive --repeat 2 --json out.json

The arms are benchmarks/train_throughput.py's (peer: peft + transformers.Trainer; tuneforge:
tuneforge.workflows.train), each run in its own fresh process by throughput_arms.spawn_arm, on
- demo: the demo's short examples (identity + general_demo, cutoff 256, batch 4 x accumulation 2),
- alpaca: alpaca_en_demo (cutoff 256, batch 4),
under each condition, started and ended by this script around every arm:
- quiet: nothing else started (other users of the machine still count: see the load column);
- busy: one single-threaded Python busy loop (`while True: pass`);
- torch: a second PyTorch process doing 256 x 256 matmuls with torch's default thread count.
Competitors run in their own process group, end by themselves after --bound seconds and are
killed at the end of each arm, also on Ctrl-C or an error.

Per workload, arm, condition and setting (torch threads, OMP_WAIT_POLICY), the medians over
repeats of: real tokens/s over the timed steps (all but the first), seconds per step, CPU
seconds the arm's process used per step (all its threads), the competitor's CPU share, and the
slowdown against quiet (quiet tokens/s / tokens/s). Goal (issue 21): tuneforge's slowdown <= 2.5x
beside each competitor and never worse than the peer's. Conditions are interleaved within a
repeat (quiet, busy, torch, quiet, ...), so slow drift in the machine's other load spreads over
all of them; the load average before each run is printed: above ~0.5 with quiet, others shared
the CPU and the numbers are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BUNDLED = Path(__file__).resolve().parents[1] / "tuneforge" / "resources" / "data"
WORKLOADS = {  # name -> (dataset, cutoff, batch, accumulation, its folder: None = --dataset-dir)
    "demo": ("identity,general_demo", 256, 4, 2, BUNDLED),  # `make demo`'s data, placeholders left as typed
    "alpaca": ("alpaca_en_demo", 256, 4, 1, None),
}
COMPETITORS = {
    "quiet": None,
    "busy": "import time\nend = time.time() + {bound}\nwhile time.time() < end:\n    pass\n",
    "torch": ("import time, torch\na = torch.randn(256, 256)\nend = time.time() + {bound}\n"
              "while time.time() < end:\n    a @ a\n"),
}
GOAL_SLOWDOWN = 2.5
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def start_competitor(name: str, bound: float) -> subprocess.Popen | None:
    """The competitor of condition `name`, in its own process group, with the environment a
    user's other program has (no thread settings of ours); None for quiet."""
    code = COMPETITORS[name]
    if code is None:
        return None
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
    proc = subprocess.Popen([sys.executable, "-c", code.format(bound=bound)], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2.0 if name == "torch" else 0.3)  # torch imports before it competes
    return proc


def stop_competitor(proc: subprocess.Popen | None) -> float:
    """Kill the competitor's process group; the CPU seconds it used (0 where unknown)."""
    if proc is None:
        return 0.0
    cpu = 0.0
    try:
        import psutil

        times = psutil.Process(proc.pid).cpu_times()
        cpu = times.user + times.system
    except Exception:  # gone already, or psutil missing: the share is then unknown
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    return cpu


def arm_options(workload: str, threads: int, args) -> list[str]:
    """train_throughput.py's options for one arm on `workload` (args: steps, dataset_dir, set)."""
    dataset, cutoff, batch, accum, folder = WORKLOADS[workload]
    return ["--steps", str(args.steps), "--batch", str(batch), "--grad-accum", str(accum),
            "--dataset", dataset, "--dataset-dir", str(folder or args.dataset_dir), "--cutoff", str(cutoff),
            "--threads", str(threads)] + [f"--set={s}" for s in args.set]


def run_arm(arm: str, workload: str, condition: str, threads: int, policy: str, args) -> dict:
    """One arm under one condition; its timed numbers, or {'error': ...}."""
    from throughput_arms import spawn_arm

    options = arm_options(workload, threads, args)
    saved = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "_TUNEFORGE_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if os.environ.pop("_TUNEFORGE_WAIT_POLICY", None):  # tuneforge's own choice is not passed on
        os.environ.pop("OMP_WAIT_POLICY", None)
        os.environ.pop("GOMP_SPINCOUNT", None)
    if policy.startswith("spin"):  # spinN: GOMP_SPINCOUNT=N for both arms (tuneforge then sets no policy)
        os.environ["GOMP_SPINCOUNT"] = policy[4:] or "300000"
    elif policy != "default":
        os.environ["OMP_WAIT_POLICY"] = policy
    load = os.getloadavg()[0]
    proc, began = start_competitor(condition, args.bound), time.perf_counter()
    try:
        out = spawn_arm(str(Path(__file__).resolve()), arm, options, threads)
    finally:
        wall = time.perf_counter() - began
        other_cpu = stop_competitor(proc)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if "error" in out:
        return {"error": out["error"], "load": load}
    steps = out["steps"]
    timed = steps[1:] if len(steps) >= 3 else steps
    first = steps[0]["end"] if len(steps) >= 3 else steps[0]["start"]
    first_cpu = steps[0]["cpu_end"] if len(steps) >= 3 else 0.0
    seconds = timed[-1]["end"] - first
    return {"tps": sum(s["real"] for s in timed) / seconds, "step_s": seconds / len(timed),
            "cpu_step": (timed[-1]["cpu_end"] - first_cpu) / len(timed),
            "other_share": other_cpu / wall if proc else 0.0, "load": load,
            "step_times": [s["end"] - s["start"] for s in steps], "threads_used": out.get("threads_used")}


def plan(args) -> list[tuple]:
    """Every run in order: per repeat, per workload, per setting, per arm, the conditions in turn."""
    runs = []
    for rep in range(args.repeat):
        for workload in args.workloads:
            for threads in args.threads:
                for policy in args.policies:
                    for arm in args.arms:
                        conditions = args.conditions if rep % 2 == 0 else args.conditions[::-1]
                        runs += [(rep, workload, arm, c, threads, policy) for c in conditions]
    return runs


def report(results: list[dict], args) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if "error" not in r:
            groups.setdefault((r["workload"], r["threads"], r["policy"], r["arm"], r["condition"]), []).append(r)
    med = {k: {f: statistics.median(x[f] for x in v) for f in ("tps", "step_s", "cpu_step", "other_share", "load")}
           | {"n": len(v)} for k, v in groups.items()}
    print(f"\n{'workload':<8}{'thr':>4}{'policy':>9}{'arm':>11}{'condition':>10}{'tok/s':>8}{'step s':>8}"
          f"{'cpu s/step':>11}{'other cpu':>10}{'load':>6}{'n':>3}{'slowdown':>9}")
    rows = []
    for key in sorted(med, key=lambda k: (k[0], -k[1], k[2], k[3], args.conditions.index(k[4]))):
        workload, threads, policy, arm, condition = key
        m, quiet = med[key], med.get((workload, threads, policy, arm, "quiet"))
        slow = quiet["tps"] / m["tps"] if quiet else float("nan")
        rows.append({"workload": workload, "threads": threads, "policy": policy, "arm": arm,
                     "condition": condition, **m, "slowdown": slow})
        print(f"{workload:<8}{threads:>4}{policy:>9}{arm:>11}{condition:>10}{m['tps']:>8.1f}{m['step_s']:>8.2f}"
              f"{m['cpu_step']:>11.2f}{100 * m['other_share']:>9.0f}%{m['load']:>6.2f}{m['n']:>3}{slow:>8.2f}x")
    print("tok/s: real tokens over the timed steps; cpu s/step: the arm's CPU seconds per step (all threads); "
          "other cpu: the competitor's CPU use in cores; load: 1-min load average before the run; slowdown: "
          "quiet tok/s / tok/s (medians over repeats)")
    goals = []
    for row in rows:
        if row["arm"] != "tuneforge" or row["condition"] == "quiet":
            continue
        peer = next((p for p in rows if p["arm"] == "peer" and all(
            p[k] == row[k] for k in ("workload", "threads", "policy", "condition"))), None)
        met = row["slowdown"] <= GOAL_SLOWDOWN and (peer is None or row["slowdown"] <= peer["slowdown"])
        line = (f"goal {row['workload']} {row['threads']} threads {row['policy']} beside {row['condition']}: "
                f"tuneforge {row['slowdown']:.2f}x (<= {GOAL_SLOWDOWN}x"
                + (f", peer {peer['slowdown']:.2f}x" if peer else "") + f"): {'met' if met else 'NOT met'}")
        goals.append({"line": line, "met": met})
        print(line)
    return rows, goals


def run_one_arm(argv: list[str]) -> None:
    """Internal (`--arm ARM ...`): one arm of train_throughput.py, started as its program starts:
    tuneforge arms import tuneforge first (as `tuneforge train` does, so its OpenMP settings
    apply), the peer imports torch first (as a transformers script does)."""
    if argv[argv.index("--arm") + 1].startswith("tuneforge"):
        import tuneforge  # noqa: F401
    import train_throughput

    train_throughput.main(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--arm" in argv:
        return run_one_arm(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="demo,alpaca", help=f"comma-separated of {', '.join(WORKLOADS)}")
    ap.add_argument("--arms", default="tuneforge,peer", help="comma-separated of tuneforge, peer")
    ap.add_argument("--conditions", default="quiet,busy,torch", help=f"comma-separated of {', '.join(COMPETITORS)}")
    ap.add_argument("--threads", default=str(len(os.sched_getaffinity(0))),
                    help="comma-separated torch thread counts for the arms (default: the cores this process may use)")
    ap.add_argument("--policies", default="default", help="comma-separated OMP_WAIT_POLICY values for both arms: "
                    "default (unset: each program's own; tuneforge sets a short spin itself), passive, active, spin "
                    "(GOMP_SPINCOUNT=300000: GNU OpenMP's default, also for tuneforge), spinN (GOMP_SPINCOUNT=N)")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is not timed)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each condition (interleaved)")
    ap.add_argument("--bound", type=float, default=1800, help="a competitor ends by itself after this many seconds")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="tuneforge config key")
    ap.add_argument("--dataset-dir", help="folder with dataset_info.json (default: $TUNEFORGE_SHARED_DATA "
                    "or ../shared/data next to the repository)")
    ap.add_argument("--quick", action="store_true", help="the demo workload, 3 steps, one repeat")
    ap.add_argument("--json", help="write every run and the table to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.workloads, args.steps, args.repeat = "demo", 3, 1
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    args.workloads, args.arms, args.conditions = split(args.workloads), split(args.arms), split(args.conditions)
    args.threads, args.policies = [int(t) for t in split(args.threads)], split(args.policies)
    for name, chosen, known in (("workloads", args.workloads, WORKLOADS), ("conditions", args.conditions, COMPETITORS),
                                ("arms", args.arms, ("tuneforge", "peer"))):
        if not chosen or any(c not in known for c in chosen):
            ap.error(f"--{name} {','.join(chosen)}: choose from {', '.join(known)}")
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    args.dataset_dir = args.dataset_dir or os.environ.get("TUNEFORGE_SHARED_DATA", str(shared))
    if not (Path(args.dataset_dir) / "dataset_info.json").is_file():
        ap.error(f"--dataset-dir {args.dataset_dir} has no dataset_info.json")

    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} cpus, affinity {len(os.sched_getaffinity(0))}, "
          f"OpenMP: {'GNU libgomp' if 'gomp' in Path('/proc/self/maps').read_text() else 'see parallel_info'}; "
          f"{args.steps} steps per run, {args.repeat} repeats", flush=True)
    results, began = [], time.perf_counter()
    for rep, workload, arm, condition, threads, policy in plan(args):
        print(f"[{time.perf_counter() - began:5.0f} s] {workload} {arm} {condition} threads {threads} "
              f"policy {policy} (load {os.getloadavg()[0]:.2f})", flush=True)
        r = run_arm(arm, workload, condition, threads, policy, args)
        r.update(rep=rep, workload=workload, arm=arm, condition=condition, threads=threads, policy=policy)
        if "error" not in r:
            print(f"    {r['tps']:.1f} tok/s, {r['step_s']:.2f} s/step, {r['cpu_step']:.2f} cpu s/step, "
                  f"steps {' '.join(f'{t:.1f}' for t in r['step_times'])}", flush=True)
        results.append(r)
    rows, goals = report(results, args)
    print(f"elapsed {time.perf_counter() - began:.0f} s; goals met {sum(g['met'] for g in goals)}/{len(goals)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "table": rows, "goals": goals}, indent=1))


if __name__ == "__main__":
    main()
