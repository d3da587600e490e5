"""LoRA training throughput of tuneforge against peft + transformers.Trainer, side by side.

    python benchmarks/train_throughput.py                  # 12 optimizer steps per arm (make bench)
    python benchmarks/train_throughput.py --quick          # 3 steps x batch 4, under 5 minutes
    python benchmarks/train_throughput.py --arms peer,tuneforge --set packing=false --json out.json

Every arm trains the default model (SmolLM2-135M-Instruct, fp32) with LoRA r=8, alpha=16 on all
linear layers but the head, lr 1e-4 cosine, no warmup, on alpaca_en_demo (cutoff 512), batch 8 x
accumulation 1, in its own fresh process (this script with --arm), one after another:
- peer: peft + transformers.Trainer + DataCollatorForSeq2Seq(pad_to_multiple_of=8), gradient
  checkpointing on (non-reentrant), as LLaMA-Factory runs LoRA SFT by default;
- tuneforge: tuneforge.workflows.train with its defaults (bf16 pinned off, to compare with fp32);
  tuneforge-dora (use_dora), tuneforge-qlora (4-bit, compute_dtype float32),
  tuneforge-gc (gradient_checkpointing); tuneforge-bf16 where this CPU runs bf16 fast.
All arms are tokenized by tuneforge's data pipeline and see the same examples in the same order
(the peer gets them in MicroBatchStream's order), so their losses compare.

Measured per arm, over the timed steps (all but the first, when there are 3 or more):
- real tokens/s: non-padding tokens the model saw / seconds; padding = padded / all positions.
- peak RSS: VmHWM over the training steps, reset after model, adapter and data are loaded (this
  is what the ratio to the peer uses); "life" is the whole process's peak, loading included.
- losses: the last step's token-mean loss, and the mean over all steps.
- MFU: model FLOP/s / the best fp32 matmul rate measured here first (bf16 rate for the bf16 arm).
  Model FLOPs per sequence of n real tokens (gradient-checkpointing recompute not counted):
      (4 * N + 6 * r * S) * n  +  12 * L * d * n (n + 1) / 2
  N = weights of all Linear layers including the output head (embedding lookups are no matmul):
  2N forward, 2N backward to the activations, no weight gradients for frozen weights;
  S = sum of (in + out) over the adapted layers, so r * S LoRA weights, 6 FLOPs each per token;
  attention: causal QK^T and AV cost 4 d i for token i in forward, three times that with
  backward, per layer; L layers, d = heads x head_dim. The head counts at every real token,
  as is usual for MFU, even where an implementation only computes it at labelled positions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARMS = {  # arm -> config keys on top of the common ones (None: the peer)
    "peer": None,
    "tuneforge": {},
    "tuneforge-dora": {"use_dora": True},
    "tuneforge-qlora": {"quantization_bit": 4, "compute_dtype": "float32"},
    "tuneforge-gc": {"gradient_checkpointing": True},
    "tuneforge-bf16": {"bf16": True},
}
# LLaMA-Factory 0.9.5, same model, 12 steps x 8 alpaca_en_demo examples, cutoff 512, fp32
LLAMAFACTORY = {"real_tps": 56.0, "padding": 0.455, "peak_mb": 4.1e3, "run_s": 355}
RANK, LR, SEED = 8, 1e-4, 42
GOAL_SPEED, GOAL_RSS, GOAL_LOSS, GOAL_MFU, GOAL_DORA = 4.0, 0.6, 0.02, 0.8, 1.15
MB = 1 << 20


# ---- the machine's matmul rate and the model's FLOPs --------------------------------------
def matmul_rate(dtype: torch.dtype, shapes, seconds: float = 0.4) -> float:
    """Best sustained FLOP/s of (m x k) @ (k x n) over `shapes`, each timed for ~`seconds`."""
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b  # warm-up: thread pool, kernel choice
        reps, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            a @ b
            reps += 1
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - began))
    return best


def model_shape(config, rank: int) -> dict:
    """Counts the FLOP formula needs, from a transformers config (model built on 'meta')."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"linear_params": sum(m.in_features * m.out_features for m in linears),
            "lora_params": rank * sum(m.in_features + m.out_features for m in linears if m is not head),
            "layers": config.num_hidden_layers, "attn_dim": heads * head_dim}


def step_flops(lengths: list[int], shape: dict) -> float:
    """Model FLOPs of one training pass over sequences of these real lengths (see docstring)."""
    per_token = 4 * shape["linear_params"] + 6 * shape["lora_params"]
    attention = 12 * shape["layers"] * shape["attn_dim"]
    return float(sum(per_token * n + attention * n * (n + 1) / 2 for n in lengths))


# ---- running the arms ------------------------------------------------------------------------
def spawn(arm: str, args) -> dict:
    """Run one arm in a fresh interpreter; its result, or {'error': ...}."""
    from throughput_arms import spawn_arm

    return spawn_arm(str(Path(__file__).resolve()), arm, [
        "--steps", str(args.steps), "--batch", str(args.batch), "--grad-accum", str(args.grad_accum),
        "--dataset", args.dataset, "--dataset-dir", args.dataset_dir, "--cutoff", str(args.cutoff),
        "--threads", str(args.threads)] + [f"--set={s}" for s in args.set], args.threads)


def run_one_arm(args) -> None:
    import throughput_arms as arms  # benchmarks/ is sys.path[0] when this script runs

    from tuneforge.config import parse_overrides

    torch.set_num_threads(args.threads)
    args.overrides = parse_overrides(args.set)
    args.lr, args.rank, args.seed = LR, RANK, SEED
    out = arms.run_peer(args) if ARMS[args.arm] is None else arms.run_tuneforge(args, ARMS[args.arm])
    Path(args.result).write_text(json.dumps(out))


def check_configs(names: list[str], args, ap) -> None:
    """Bad --set keys fail now, not after the peer has run for minutes."""
    from throughput_arms import tuneforge_values

    from tuneforge.config import load_config, parse_overrides
    from tuneforge.errors import ConfigError

    args.lr, args.rank, args.seed = LR, RANK, SEED
    try:
        args.overrides = parse_overrides(args.set)
        for arm in names:
            if ARMS[arm] is not None:
                load_config(None, tuneforge_values(args, ARMS[arm], "unused"))
    except ConfigError as exc:
        ap.error(str(exc))


# ---- the report -------------------------------------------------------------------------------
def summarise(r: dict, shape: dict, rate: float) -> None:
    """Add the derived numbers to one arm's result, from its timed steps."""
    steps = r["steps"]
    timed = steps[1:] if len(steps) >= 3 else steps
    seconds = timed[-1]["end"] - (steps[0]["end"] if len(steps) >= 3 else steps[0]["start"])
    real, positions = sum(s["real"] for s in timed), sum(s["positions"] for s in timed)
    flops = sum(step_flops(s["lengths"], shape) for s in timed)
    losses = [s["loss"] for s in steps if s["loss"] is not None]
    r.update(timed_steps=len(timed), seconds=seconds, step_s=seconds / len(timed),
             real_tps=real / seconds, all_tps=positions / seconds,
             padding=1 - sum(s["real"] for s in steps) / sum(s["positions"] for s in steps),
             last_loss=losses[-1] if losses else float("nan"),
             mean_loss=sum(losses) / len(losses) if losses else float("nan"),
             model_flops=flops / seconds, mfu=flops / seconds / rate,
             real_total=sum(s["real"] for s in steps), lengths=[s["lengths"] for s in steps])


def goal(name: str, value: float, target: float, higher_is_better: bool, fmt: str) -> dict:
    met = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    line = f"{name}: {fmt.format(value)} (goal {sign} {fmt.format(target)}): {'met' if met else 'NOT met'}"
    return {"name": name, "value": value, "target": target, "met": met, "line": line}


def report(results: dict, args) -> list[dict]:
    peer = results.get("peer") if "error" not in results.get("peer", {"error": 1}) else None
    print(f"\n{'arm':<17}{'real tok/s':>11}{'all tok/s':>10}{'pad %':>7}{'step s':>8}{'start MB':>9}{'peak MB':>9}"
          f"{'life MB':>9}{'last loss':>10}{'mean loss':>10}{'MFU %':>7}{'tok/s x':>9}{'RSS x':>7}")
    for arm, r in results.items():
        if "error" in r:
            print(f"{arm:<17}FAILED: {r['error']}")
            continue
        ratio = f"{r['real_tps'] / peer['real_tps']:>9.2f}{r['peak_train'] / peer['peak_train']:>7.2f}" if peer else ""
        print(f"{arm:<17}{r['real_tps']:>11.1f}{r['all_tps']:>10.1f}{100 * r['padding']:>7.1f}{r['step_s']:>8.2f}"
              f"{r['rss_start'] / MB:>9.0f}{r['peak_train'] / MB:>9.0f}{r['peak_life'] / MB:>9.0f}{r['last_loss']:>10.4f}{r['mean_loss']:>10.4f}"
              f"{100 * r['mfu']:>7.1f}{ratio}")
    ok = {a: r for a, r in results.items() if "error" not in r}
    print(f"timed: steps 2..{args.steps} of {args.steps} (step 1 is warm-up)" if args.steps >= 3 else
          f"timed: all {args.steps} steps (no warm-up excluded below 3 steps)")
    print("start MB: RSS when training starts (model, adapter, data loaded); peak MB: VmHWM over the "
          "training steps (the ratio 'RSS x' uses it); life MB: the whole process's peak, loading "
          "included; x: against the peer in this run")
    if any(not r["peak_reset"] for r in ok.values()):
        print("NOTE: /proc/self/clear_refs refused: 'peak MB' is the whole-life peak")
    if peer:
        for arm, r in ok.items():
            if r["real_total"] != peer["real_total"] or r["lengths"] != peer["lengths"]:
                print(f"WARNING: {arm} saw other sequences than the peer ({r['real_total']} real tokens "
                      f"against {peer['real_total']}): its losses do not compare")
    lf = LLAMAFACTORY
    print(f"reference, LLaMA-Factory 0.9.5 measured apart (12 steps x 8, fp32): {lf['real_tps']:.0f} real tok/s, "
          f"{100 * lf['padding']:.1f} % padding, peak RSS {lf['peak_mb']:.0f} MB, whole run {lf['run_s']} s")

    goals = []
    lora = ok.get("tuneforge")
    if peer and lora:
        goals.append(goal("tuneforge LoRA real tokens/s vs peer", lora["real_tps"] / peer["real_tps"],
                          GOAL_SPEED, True, "{:.2f}x"))
        goals.append(goal("tuneforge LoRA peak RSS vs peer", lora["peak_train"] / peer["peak_train"],
                          GOAL_RSS, False, "{:.2f}x"))
        goals.append(goal("tuneforge LoRA last-step loss vs peer's (relative difference)",
                          abs(lora["last_loss"] / peer["last_loss"] - 1), GOAL_LOSS, False, "{:.2%}"))
    if lora:
        goals.append(goal("tuneforge LoRA MFU (fp32 matmul rate)", lora["mfu"], GOAL_MFU, True, "{:.1%}"))
    if lora and "tuneforge-dora" in ok:
        goals.append(goal("DoRA step time vs LoRA's", ok["tuneforge-dora"]["step_s"] / lora["step_s"],
                          GOAL_DORA, False, "{:.2f}x"))
    print()
    for g in goals:
        print(g["line"])
    return goals


def summary_line(results: dict, goals: list[dict], elapsed: float, args) -> str:
    lora, peer = results.get("tuneforge", {}), results.get("peer", {})
    parts = []
    if "real_tps" in lora and "real_tps" in peer:
        parts.append(f"tuneforge LoRA {lora['real_tps']:.0f} real tok/s vs peer {peer['real_tps']:.0f} "
                     f"({lora['real_tps'] / peer['real_tps']:.2f}x)")
    missed = [g["name"].replace("tuneforge LoRA ", "") + " " + g["line"].split(": ")[1].split(" (")[0]
              for g in goals if not g["met"]]
    parts.append(f"goals met {sum(g['met'] for g in goals)}/{len(goals)}"
                 + (f" (not met: {', '.join(missed)})" if missed else ""))
    failed = [a for a, r in results.items() if "error" in r]
    if failed:
        parts.append(f"FAILED arms: {', '.join(failed)}")
    parts.append(f"{args.steps} steps x {args.batch * args.grad_accum} examples per arm, {elapsed:.0f} s")
    return "summary: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per arm")
    ap.add_argument("--batch", type=int, help="per-device batch size (default 8; 4 with --quick)")
    ap.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    ap.add_argument("--dataset", default="alpaca_en_demo")
    ap.add_argument("--dataset-dir", help="folder with dataset_info.json (default: $TUNEFORGE_SHARED_DATA "
                    "or ../shared/data next to the repository)")
    ap.add_argument("--cutoff", type=int, default=512, help="cutoff_len")
    ap.add_argument("--arms", help=f"comma-separated, of {', '.join(ARMS)} (default: all; "
                    "tuneforge-bf16 only where bf16 is fast)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="tuneforge config key for every tuneforge arm, e.g. --set packing=false")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    ap.add_argument("--quick", action="store_true",
                    help="3 steps x batch 4 per arm (half the full run's batch): under 5 minutes")
    ap.add_argument("--json", help="write every number to this file")
    ap.add_argument("--arm", choices=list(ARMS), help=argparse.SUPPRESS)  # internal: one arm
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.arm:
        return run_one_arm(args)
    if args.quick:  # 3 steps, so one is still left out as warm-up; batch 4 to fit in 5 minutes
        args.steps = min(args.steps, 3)
    args.batch = args.batch or (4 if args.quick else 8)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    args.dataset_dir = args.dataset_dir or os.environ.get("TUNEFORGE_SHARED_DATA", str(shared))
    from transformers import AutoConfig

    from tuneforge.models import bf16_is_fast, default_model_dir

    fast_bf16 = bf16_is_fast("cpu")
    names = args.arms.split(",") if args.arms else [a for a in ARMS if a != "tuneforge-bf16" or fast_bf16]
    names = [a.strip() for a in names if a.strip()]
    unknown = [a for a in names if a not in ARMS]
    if unknown:
        ap.error(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    check_configs(names, args, ap)
    if not (Path(args.dataset_dir) / "dataset_info.json").is_file():
        ap.error(f"--dataset-dir {args.dataset_dir} has no dataset_info.json; pass a folder that has {args.dataset}")

    began, load_before = time.perf_counter(), os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    config = AutoConfig.from_pretrained(str(default_model_dir()))
    shape = model_shape(config, rank=RANK)
    tokens, hidden, inter = 2048, config.hidden_size, config.intermediate_size
    shapes = [(tokens, hidden, inter), (tokens, inter, hidden), (tokens, hidden, hidden),
              (tokens // 4, hidden, config.vocab_size)]
    dtypes = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if fast_bf16 else {})}
    rates = {k: matmul_rate(dtype, shapes) for k, dtype in dtypes.items()}
    print(f"default model {default_model_dir().name}, torch {torch.__version__}, {args.threads} threads; "
          f"matmul rate (best of {len(shapes)} model shapes, measured again at the end): "
          + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in rates.items()))
    print(f"model FLOPs per real token: 4 x {shape['linear_params'] / 1e6:.1f} M linear weights + "
          f"6 x {shape['lora_params'] / 1e6:.2f} M LoRA weights + attention 12 x {shape['layers']} x "
          f"{shape['attn_dim']} x position")
    print(f"arms: {', '.join(names)}; {args.steps} steps x batch {args.batch} x accumulation {args.grad_accum}, "
          f"{args.dataset} (cutoff {args.cutoff}), fp32, each in its own process"
          + (f"; tuneforge arms also: {', '.join(args.set)}" if args.set else ""))

    results = {arm: spawn(arm, args) for arm in names}
    # the best rate seen: other work on the CPU at either time only lowers a measurement
    for k, dtype in dtypes.items():
        rates[k] = max(rates[k], again := matmul_rate(dtype, shapes))
        print(f"matmul rate {k} at the end: {again / 1e9:.1f} GFLOP/s; MFU uses {rates[k] / 1e9:.1f}")
    for arm, r in results.items():
        if "error" not in r:
            bf16 = "bf16" in rates and ARMS[arm] and ARMS[arm].get("bf16")  # else it trains in fp32
            summarise(r, shape, rates["bf16" if bf16 else "fp32"])
    goals = report(results, args)
    elapsed = time.perf_counter() - began
    line = summary_line(results, goals, elapsed, args)
    print(f"elapsed {elapsed:.0f} s; load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at "
          f"the end (above 0.5 other work shared the CPU: tok/s and MFU are then lower than this machine gives)")
    print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"rates": rates, "shape": shape, "arms": results,
                                               "goals": goals, "summary": line, "elapsed_s": elapsed,
                                               "options": {k: v for k, v in vars(args).items()}}, indent=1))


if __name__ == "__main__":
    main()
