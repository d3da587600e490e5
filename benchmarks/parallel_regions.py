"""OpenMP parallel regions per LoRA step, and which operations open them (issue 21).

    python benchmarks/parallel_regions.py                       # demo workload, tuneforge and the peer
    python benchmarks/parallel_regions.py --workloads alpaca --arms tuneforge --top 40
    python benchmarks/parallel_regions.py --set packing=false --json out.json

Why count them: with GNU OpenMP (torch's CPU build) every parallel region ends in a barrier, and
a thread that reaches it first waits for its siblings, spinning or sleeping (OMP_WAIT_POLICY). Beside
another busy process a sibling is often descheduled, so each region can cost a scheduler time
slice; on an idle machine with passive waiting each costs a wake-up through the kernel. Fewer,
larger regions make a step cheaper in both cases, and the count, unlike a time, does not depend
on what else the machine is doing.

How: a small C shim (compiled here with the system's cc, preloaded with LD_PRELOAD) wraps libgomp's
GOMP_parallel, the entry point of every `#pragma omp parallel` in torch, MKL and oneDNN, and counts
its calls; a region opened inside another (MKL called from a parallel attention kernel) gets a team
of one thread, where nobody waits, and is counted apart as nested. Each arm (benchmarks/contention.py's workloads, benchmarks/throughput_arms.py's arms) runs
in its own process under the shim; a TorchDispatchMode reads the counter around every aten operation
and charges the regions it opened to the operation and where it came from: the first Python frame
outside torch for forward operations, the autograd node for backward ones. Printed per arm: regions
per optimizer step (all steps but the first), the nested ones apart, and the operations that open
the most. The mode slows the arm down; its times mean nothing here.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdatomic.h>

typedef void (*gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
static gomp_parallel_fn real_parallel;
static int (*in_parallel)(void);
static atomic_long regions, nested;

/* a region opened inside another (e.g. MKL called from a parallel attention kernel) runs on a
   team of one thread: no thread waits for another at its end, so it is counted apart */
void GOMP_parallel(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags) {
    if (!real_parallel) {
        real_parallel = (gomp_parallel_fn)dlsym(RTLD_NEXT, "GOMP_parallel");
        in_parallel = (int (*)(void))dlsym(RTLD_NEXT, "omp_in_parallel");
    }
    if (in_parallel && in_parallel()) atomic_fetch_add(&nested, 1);
    else atomic_fetch_add(&regions, 1);
    real_parallel(fn, data, num_threads, flags);
}

long tuneforge_parallel_regions(void) { return atomic_load(&regions); }
long tuneforge_nested_regions(void) { return atomic_load(&nested); }
"""
SHIM_ENV = "_TUNEFORGE_REGION_SHIM"


def build_shim(folder: Path) -> Path:
    """Compile SHIM_C into folder/libregions.so; raises SystemExit with one line if no C compiler works."""
    source, lib = folder / "regions.c", folder / "libregions.so"
    source.write_text(SHIM_C)
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if not cc:
            continue
        try:
            done = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(source), "-ldl"],
                                  capture_output=True, text=True)
        except FileNotFoundError:
            continue
        if done.returncode == 0:
            return lib
    raise SystemExit("parallel_regions: no C compiler (cc, gcc, clang or $CC) could build the counting shim")


# ---- the child: one arm under the shim ---------------------------------------------------------
class RegionCounter:
    """Reads the shim's counters and charges them to aten operations (a TorchDispatchMode)."""

    def __init__(self, lib: str):
        self.lib = ctypes.CDLL(lib)  # the preloaded copy: same counters
        self.lib.tuneforge_parallel_regions.restype = ctypes.c_long
        self.lib.tuneforge_nested_regions.restype = ctypes.c_long
        self.by_op: dict[tuple[str, str], list[int]] = {}  # (op, site) -> [calls, regions, nested regions]
        self.marks: list[tuple[int, int]] = []  # (regions, nested) at training start and each step's end
        self.mode = None

    def counts(self) -> tuple[int, int]:
        return self.lib.tuneforge_parallel_regions(), self.lib.tuneforge_nested_regions()

    def start(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Charge(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                before = counter.counts()
                out = func(*args, **(kwargs or {}))
                after = counter.counts()
                entry = counter.by_op.setdefault((str(func.overloadpacket), site()), [0, 0, 0])
                entry[0] += 1
                entry[1] += after[0] - before[0]
                entry[2] += after[1] - before[1]
                return out

        self.marks.append(self.counts())
        self.mode = Charge()
        self.mode.__enter__()

    def step(self) -> None:
        self.marks.append(self.counts())

    def result(self) -> dict:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
        per_step = [b[0] - a[0] for a, b in zip(self.marks, self.marks[1:])]
        nested = [b[1] - a[1] for a, b in zip(self.marks, self.marks[1:])]
        ops = sorted(([op, where, *v] for (op, where), v in self.by_op.items()), key=lambda r: -r[3])
        return {"regions_per_step": per_step, "nested_per_step": nested, "ops": ops}


def site() -> str:
    """Where the running aten operation comes from: its autograd node in backward, else the first
    Python frame outside torch (file relative to its package, line)."""
    import torch

    node = torch._C._current_autograd_node()
    if node is not None:
        return f"backward {node.name()}"
    frame = sys._getframe(2)
    torch_dir = os.path.dirname(torch.__file__)
    while frame is not None and (frame.f_code.co_filename.startswith(torch_dir)
                                 or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    if frame is None:
        return "?"
    name = frame.f_code.co_filename
    for package in ("tuneforge", "transformers", "peft", "benchmarks"):
        marker = f"{os.sep}{package}{os.sep}"
        if marker in name:
            name = package + os.sep + name.split(marker, 1)[1]
            break
    return f"{name}:{frame.f_lineno}"


def run_child(argv: list[str]) -> None:
    """`--arm ARM ...`: train_throughput.py's arm, with the counter hooked into its step recorder."""
    if argv[argv.index("--arm") + 1].startswith("tuneforge"):
        import tuneforge  # noqa: F401  (its OpenMP settings, as `tuneforge train` starts)
    import throughput_arms
    import train_throughput

    counter = RegionCounter(os.environ[SHIM_ENV])
    start, step, result = (throughput_arms.Recorder.start, throughput_arms.Recorder.step,
                           throughput_arms.Recorder.result)

    def counted_start(self):
        start(self)
        counter.start()

    def counted_step(self, began, ended):
        counter.step()
        step(self, began, ended)

    def counted_result(self, losses):
        return {**result(self, losses), "regions": counter.result()}

    throughput_arms.Recorder.start, throughput_arms.Recorder.step = counted_start, counted_step
    throughput_arms.Recorder.result = counted_result
    train_throughput.main(argv)


# ---- the parent ----------------------------------------------------------------------------------
def run_arm(arm: str, workload: str, args, shim: Path) -> dict:
    from contention import arm_options
    from throughput_arms import spawn_arm

    # tuneforge's count fixed (num_threads): else it lowers it while other processes are busy
    fixed = argparse.Namespace(**{**vars(args), "set": [f"num_threads={args.threads}", *args.set]})
    options = arm_options(workload, args.threads, fixed)
    saved = {k: os.environ.get(k) for k in ("LD_PRELOAD", SHIM_ENV)}
    os.environ["LD_PRELOAD"] = " ".join(filter(None, [str(shim), saved["LD_PRELOAD"]]))
    os.environ[SHIM_ENV] = str(shim)
    try:
        return spawn_arm(str(Path(__file__).resolve()), arm, options, args.threads)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def report(workload: str, arm: str, out: dict, top: int) -> dict:
    regions = out["regions"]
    steps = out["steps"]
    per_step, nested = regions["regions_per_step"], regions["nested_per_step"]
    timed = slice(1, None) if len(per_step) >= 2 else slice(None)
    n = len(per_step[timed])
    mean = sum(per_step[timed]) / n
    tokens = sum(s["real"] for s in steps[timed]) / n
    print(f"\n{workload} {arm}: {mean:,.0f} parallel regions per optimizer step "
          f"({mean / tokens:.1f} per real token; nested, on one thread: {sum(nested[timed]) / n:,.0f}); "
          f"steps: {' '.join(f'{r:,}' for r in per_step)}")
    total_steps = len(per_step)
    charged = sum(r[3] for r in regions["ops"]) / total_steps
    print(f"  charged to aten operations: {charged:,.0f} per step (all steps); the rest ran outside them")
    print(f"  {'regions/step':>12} {'calls/step':>10} {'nested/step':>11}  operation  (from)")
    for op, where, calls, count, inner in regions["ops"][:top]:
        print(f"  {count / total_steps:>12,.0f} {calls / total_steps:>10,.0f} {inner / total_steps:>11,.0f}  "
              f"{op}  ({where})")
    return {"workload": workload, "arm": arm, "regions_per_step": mean, "per_token": mean / tokens,
            "ops": regions["ops"], "steps": per_step}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--arm" in argv:
        return run_child(argv)
    from contention import WORKLOADS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="demo", help=f"comma-separated of {', '.join(WORKLOADS)}")
    ap.add_argument("--arms", default="tuneforge,peer", help="comma-separated of train_throughput.py's arms")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per arm (the first is not counted)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    ap.add_argument("--top", type=int, default=25, help="operations to list per arm")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="tuneforge config key")
    ap.add_argument("--dataset-dir", help="folder with dataset_info.json for alpaca (default: "
                    "$TUNEFORGE_SHARED_DATA or ../shared/data next to the repository)")
    ap.add_argument("--json", help="write the counts to this file")
    args = ap.parse_args(argv)
    split = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in split if w not in WORKLOADS]
    if unknown or not split:
        ap.error(f"--workloads: choose from {', '.join(WORKLOADS)}")
    if args.threads < 2:
        ap.error("--threads: at least 2 (with one thread OpenMP opens no parallel regions worth counting)")
    if args.steps < 1:
        ap.error("--steps: at least 1 (2 or more: the first step, with its warm-up, is not counted)")
    from train_throughput import ARMS

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or any(a not in ARMS for a in arms):
        ap.error(f"--arms: choose from {', '.join(ARMS)}")
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    args.dataset_dir = args.dataset_dir or os.environ.get("TUNEFORGE_SHARED_DATA", str(shared))

    rows, failed = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        shim = build_shim(Path(tmp))
        for workload in split:
            for arm in arms:
                print(f"{workload} {arm}: {args.steps} steps under the counting shim", flush=True)
                out = run_arm(arm, workload, args, shim)
                if "error" in out:  # spawn_arm printed its line
                    failed += 1
                    continue
                if "regions" not in out or not any(out["regions"]["regions_per_step"]):
                    print(f"  {arm}: the shim counted nothing (is torch's OpenMP GNU libgomp?)")
                    failed += 1
                    continue
                rows.append(report(workload, arm, out, args.top))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if failed:
        raise SystemExit(f"parallel_regions: {failed} of {len(split) * len(arms)} arms failed (lines above)")


if __name__ == "__main__":
    main()
