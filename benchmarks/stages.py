"""Preference stages side by side: tuneforge's dpo / kto against TRL's DPOTrainer / KTOTrainer.

    python benchmarks/stages.py                      # both stages, 8 optimizer steps per arm (make bench-stages)
    python benchmarks/stages.py --stage dpo --steps 4
    python benchmarks/stages.py --quick              # 3 steps per arm (step 1 is warm-up)
    python benchmarks/stages.py --arms trl,tuneforge --set packing=false   # a key for the tuneforge arms

Every arm trains the default model (SmolLM2-135M-Instruct, fp32) with LoRA r=8, alpha=16,
dropout 0 on all linear layers but the head, lr 1e-4 cosine, no warmup, beta 0.1, in its own
fresh process (this script with --arm), one after another:
- trl: TRL's DPOTrainer (loss sigmoid) / KTOTrainer (loss kto) on a peft model, the reference
  by disabling the adapter (TRL's way with peft, what LLaMA-Factory runs),
  precompute_ref_log_probs off, TRL's defaults otherwise (gradient checkpointing on);
- tuneforge: tuneforge.workflows.train with stage: dpo / kto, its defaults otherwise (activations
  kept: faster, more memory);
- tuneforge_gc: the same with gradient_checkpointing: true, TRL's memory strategy.
dpo: dpo_en_demo, 2 pairs per step; kto: kto_en_demo, 4 examples per step; cutoff 512.
Both arms see the same token ids in the same order: tuneforge's data pipeline tokenizes
(chat template, cutoff split between prompt and reply) and orders (MicroBatchStream) them, and
TRL gets them already tokenized (prompt_ids, chosen_ids / rejected_ids, completion_ids; kto's
mismatched KL_completion_ids are tuneforge's: the reply of the record before, within cutoff).

Measured per arm over the timed steps (all but the first, with 3 or more steps):
- real tokens/s: non-padding tokens of the rows the loss scores (dpo: prompt + chosen and
  prompt + rejected of every pair; kto: prompt + reply of every example, the KL rows not counted)
  per second of training steps, and per CPU second of the process (all its threads: on a
  machine shared with other work, wall seconds stretch and CPU seconds much less);
  peak RSS: VmHWM over the training steps (throughput_arms.Recorder);
- step-1 and last-step loss, reward margin (rewards/chosen - rewards/rejected, means over the
  step), and step-1 logps/chosen: at step 1 the adapter is zero, so policy and reference agree;
  equal logps there say that both scored the same tokens the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

STAGES = {  # stage -> (dataset, examples per step: pairs for dpo)
    "dpo": ("dpo_en_demo", 2),
    "kto": ("kto_en_demo", 4),
}
RANK, LR, SEED, BETA, CUTOFF = 8, 1e-4, 42, 0.1, 512
GOAL_SPEED, GOAL_RSS, GOAL_LOSS = 2.0, 0.7, 0.02
MB = 1 << 20


# ---- one arm, in its own process -------------------------------------------------------------
def arm_options(stage: str, args) -> argparse.Namespace:
    """The options throughput_arms.run_tuneforge / tuneforge_values read, for this stage."""
    from tuneforge.config import parse_overrides

    dataset, batch = STAGES[stage]
    return argparse.Namespace(rank=RANK, lr=LR, seed=SEED, steps=args.steps, batch=batch, grad_accum=1,
                              dataset=dataset, dataset_dir=args.dataset_dir, cutoff=args.cutoff,
                              overrides=parse_overrides(args.set))


def stage_keys(stage: str) -> dict:
    keys = {"stage": stage, "pref_beta": BETA, "pref_ftx": 0.0}
    return {**keys, "pref_loss": "sigmoid"} if stage == "dpo" else keys


def ordered(stage: str, tokenizer, opts) -> list[dict]:
    """tuneforge's examples of the stage, in the order its loop takes them."""
    from throughput_arms import tuneforge_values

    from tuneforge.config import load_config
    from tuneforge.train.batches import MicroBatchStream
    from tuneforge.train.stages import get_stage

    cfg = load_config(None, tuneforge_values(opts, stage_keys(stage), "unused"))
    splits = get_stage(stage).encode(cfg.data, tokenizer, opts.seed)  # sets the chat template too
    stream = MicroBatchStream(splits.train, opts.batch, lambda examples: examples, opts.seed)
    return [ex for j in range(opts.steps) for ex in stream.get(j)]


def trl_rows(stage: str, examples: list[dict], cutoff: int) -> tuple[list[dict], int]:
    """tuneforge's examples in TRL's tokenized columns; and how many kto KL rows tuneforge cuts
    differently (its KtoCollator splits the cutoff between prompt and KL reply again)."""
    from tuneforge.data.encode import split_budget

    rows, differ = [], 0
    for ex in examples:
        n = ex["prompt_len"]
        if stage == "dpo":
            rows.append({"prompt_ids": ex["chosen_ids"][:n], "chosen_ids": ex["chosen_ids"][n:],
                         "rejected_ids": ex["rejected_ids"][n:]})
            continue
        keep_prompt, keep_reply = split_budget(n, len(ex["kl_reply"]), cutoff)
        differ += keep_prompt < n
        rows.append({"prompt_ids": ex["input_ids"][:n], "completion_ids": ex["input_ids"][n:],
                     "KL_completion_ids": ex["kl_reply"][:keep_reply], "label": bool(ex["kto_tag"])})
    return rows, differ


def run_trl(stage: str, opts) -> dict:
    from datasets import Dataset
    from throughput_arms import Recorder, peft_lora_all_linear, step_timer
    from torch.utils.data import SequentialSampler
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    from tuneforge.config import ModelArguments
    from tuneforge.models import load_model_and_tokenizer

    torch.manual_seed(opts.seed)
    model, tokenizer = load_model_and_tokenizer(ModelArguments(), dtype=torch.float32)
    rows, differ = trl_rows(stage, ordered(stage, tokenizer, opts), opts.cutoff)
    torch.manual_seed(opts.seed)
    model = peft_lora_all_linear(model, opts.rank)
    rec = Recorder(1)
    Config, Trainer, Collator = ((DPOConfig, DPOTrainer, DataCollatorForPreference) if stage == "dpo" else
                                 (KTOConfig, KTOTrainer, DataCollatorForUnpairedPreference))
    collator = Collator(pad_token_id=tokenizer.pad_token_id)

    def collate(features):
        batch = collator(features)
        rec.batch(batch)
        return batch

    class AsGiven(Trainer):  # tokenized by tuneforge, in its order
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    with tempfile.TemporaryDirectory() as out:
        targs = Config(output_dir=out, per_device_train_batch_size=opts.batch, gradient_accumulation_steps=1,
                       learning_rate=opts.lr, lr_scheduler_type="cosine", warmup_steps=0,
                       max_steps=opts.steps, logging_steps=1, save_strategy="no", report_to="none",
                       bf16=False, fp16=False, seed=opts.seed, beta=BETA, max_length=None,
                       precompute_ref_log_probs=False, dataloader_num_workers=0, disable_tqdm=True)
        trainer = AsGiven(model=model, args=targs, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          data_collator=collate, callbacks=[step_timer(rec)])
        rec.start()
        trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    result = rec.result([e["loss"] for e in logged])
    result.update(log=logged, kl_rows_cut_differently=differ)
    return result


def run_one_arm(args) -> None:
    import throughput_arms

    impl, stage = args.arm.split("-")
    torch.set_num_threads(args.threads)
    opts = arm_options(stage, args)
    if impl == "trl":
        out = run_trl(stage, opts)
    else:
        if impl == "tuneforge_gc":  # activation checkpointing, as TRL's default
            opts.overrides = {**opts.overrides, "gradient_checkpointing": True}
        out = throughput_arms.run_tuneforge(opts, stage_keys(stage))
    Path(args.result).write_text(json.dumps(out))


def spawn(arm: str, args) -> dict:
    """Run one arm in a fresh interpreter; its result, or {'error': ...}."""
    from throughput_arms import spawn_arm

    return spawn_arm(str(Path(__file__).resolve()), arm, [
        "--steps", str(args.steps), "--dataset-dir", args.dataset_dir, "--cutoff", str(args.cutoff),
        "--threads", str(args.threads)] + [f"--set={s}" for s in args.set], args.threads)


# ---- the report --------------------------------------------------------------------------------
def margin(entry: dict) -> float:
    if "rewards/chosen" in entry and "rewards/rejected" in entry:
        return entry["rewards/chosen"] - entry["rewards/rejected"]
    return float("nan")  # a kto step without both classes


def summarise(r: dict) -> None:
    steps = r["steps"]
    timed = steps[1:] if len(steps) >= 3 else steps
    seconds = timed[-1]["end"] - (steps[0]["end"] if len(steps) >= 3 else steps[0]["start"])
    cpu = timed[-1]["cpu_end"] - (steps[0]["cpu_end"] if len(steps) >= 3 else 0.0)
    log = r["log"]
    r.update(real_tps=sum(s["real"] for s in timed) / seconds, step_s=seconds / len(timed),
             cpu_tps=sum(s["real"] for s in timed) / cpu,
             first_loss=log[0]["loss"], last_loss=log[-1]["loss"], first_margin=margin(log[0]),
             last_margin=margin(log[-1]), first_logps=log[0].get("logps/chosen", float("nan")),
             lengths=[s["lengths"] for s in steps], real_total=sum(s["real"] for s in steps))


def goal(name: str, value: float, target: float, higher_is_better: bool, fmt: str) -> dict:
    met = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    line = f"{name}: {fmt.format(value)} (goal {sign} {fmt.format(target)}): {'met' if met else 'NOT met'}"
    return {"name": name, "value": value, "target": target, "met": met, "line": line}


TUNEFORGE_ARMS = {"tuneforge": "tuneforge", "tuneforge_gc": "tuneforge with gradient checkpointing"}


def report(results: dict, stages: list[str]) -> list[dict]:
    print(f"\n{'arm':<19}{'real tok/s':>11}{'tok/cpu-s':>10}{'step s':>8}{'peak MB':>9}{'life MB':>9}{'loss 1':>9}"
          f"{'loss last':>10}{'margin 1':>10}{'margin last':>12}{'logps/ch 1':>11}{'tok/s x':>9}{'cpu x':>7}{'RSS x':>7}")
    goals, notes = [], []
    for stage in stages:
        trl = results.get(f"trl-{stage}", {})
        trl_ok = bool(trl) and "error" not in trl
        for impl in ("trl", *TUNEFORGE_ARMS):
            arm = f"{impl}-{stage}"
            r = results.get(arm, {})
            if not r:  # --arms: not run
                continue
            if "error" in r:
                print(f"{arm:<19}FAILED: {r['error']}")
                continue
            ratio = (f"{r['real_tps'] / trl['real_tps']:>9.2f}{r['cpu_tps'] / trl['cpu_tps']:>7.2f}"
                     f"{r['peak_train'] / trl['peak_train']:>7.2f}") if trl_ok and impl != "trl" else ""
            print(f"{arm:<19}{r['real_tps']:>11.1f}{r['cpu_tps']:>10.1f}{r['step_s']:>8.2f}{r['peak_train'] / MB:>9.0f}"
                  f"{r['peak_life'] / MB:>9.0f}{r['first_loss']:>9.4f}{r['last_loss']:>10.4f}{r['first_margin']:>10.4f}"
                  f"{r['last_margin']:>12.4f}{r['first_logps']:>11.2f}{ratio}")
        if trl_ok and trl.get("kl_rows_cut_differently"):
            notes.append(f"{stage}: {trl['kl_rows_cut_differently']} KL rows cut differently (prompt too long)")
        for impl, label in TUNEFORGE_ARMS.items():
            tf = results.get(f"{impl}-{stage}", {})
            if not trl_ok or not tf or "error" in tf:
                continue
            if tf["lengths"] != trl["lengths"]:
                notes.append(f"WARNING: {stage}: {impl} saw other sequences ({tf['real_total']} real tokens against "
                             f"{trl['real_total']}): losses do not compare")
            step1 = abs(tf["first_logps"] / trl["first_logps"] - 1) if trl["first_logps"] else float("nan")
            notes.append(f"{stage}: {impl}: step 1 loss {tf['first_loss']:.4f} vs {trl['first_loss']:.4f}, "
                         f"logps/chosen {tf['first_logps']:.3f} vs {trl['first_logps']:.3f} (relative difference "
                         f"{step1:.2e})")
            goals.append(goal(f"{stage}: {label}: real tokens/s vs TRL", tf["real_tps"] / trl["real_tps"],
                              GOAL_SPEED, True, "{:.2f}x"))
            goals.append(goal(f"{stage}: {label}: tokens per CPU second vs TRL", tf["cpu_tps"] / trl["cpu_tps"],
                              GOAL_SPEED, True, "{:.2f}x"))
            goals.append(goal(f"{stage}: {label}: peak RSS vs TRL", tf["peak_train"] / trl["peak_train"],
                              GOAL_RSS, False, "{:.2f}x"))
            goals.append(goal(f"{stage}: {label}: last-step loss vs TRL's (relative difference)",
                              abs(tf["last_loss"] / trl["last_loss"] - 1), GOAL_LOSS, False, "{:.2%}"))
    print("tok/cpu-s: real tokens per CPU second of the process (all threads; less distorted by other work "
          "than tok/s); peak MB: VmHWM over the training steps (the ratio 'RSS x' uses it); life MB: the whole "
          "process's peak, loading included; x: against TRL in this run; margin: rewards/chosen "
          "- rewards/rejected (means over the step); tuneforge_gc: tuneforge with gradient_checkpointing: true")
    for line in notes:
        print(line)
    print()
    for g in goals:
        print(g["line"])
    return goals


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=("dpo", "kto", "both"), default="both",
                    help="dpo on dpo_en_demo, kto on kto_en_demo, or both (default)")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per arm (default 8)")
    ap.add_argument("--quick", action="store_true", help="3 steps per arm (step 1 is warm-up)")
    ap.add_argument("--cutoff", type=int, default=CUTOFF, help="cutoff_len")
    ap.add_argument("--dataset-dir", help="folder with dataset_info.json (default: $TUNEFORGE_SHARED_DATA "
                    "or ../shared/data next to the repository)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="tuneforge config key for the tuneforge arms, e.g. --set gradient_checkpointing=true")
    ap.add_argument("--arms", default="trl,tuneforge,tuneforge_gc",
                    help="comma-separated arms to run: trl, tuneforge (its defaults), tuneforge_gc (with "
                    "gradient_checkpointing: true, as TRL's default); ratios need trl")
    ap.add_argument("--json", help="write every number to this file")
    ap.add_argument("--arm", help=argparse.SUPPRESS)  # internal: one arm, e.g. trl-dpo
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    args.dataset_dir = args.dataset_dir or os.environ.get("TUNEFORGE_SHARED_DATA", str(shared))
    if args.arm:
        return run_one_arm(args)
    if args.quick:
        args.steps = min(args.steps, 3)
    if args.steps < 1:
        ap.error("--steps must be 1 or more")
    if not (Path(args.dataset_dir) / "dataset_info.json").is_file():
        ap.error(f"--dataset-dir {args.dataset_dir} has no dataset_info.json; pass LLaMA-Factory's data/ folder")
    from tuneforge.models import default_model_dir

    stages = ["dpo", "kto"] if args.stage == "both" else [args.stage]
    began, load_before = time.perf_counter(), os.getloadavg()[0]
    print(f"default model {default_model_dir().name}, torch {torch.__version__}, {args.threads} threads; "
          f"{args.steps} steps per arm, LoRA r={RANK} all linear, lr {LR}, beta {BETA}, cutoff {args.cutoff}, fp32; "
          + ", ".join(f"{s}: {STAGES[s][0]}, {STAGES[s][1]} {'pairs' if s == 'dpo' else 'examples'} per step"
                      for s in stages) + (f"; tuneforge arms also: {', '.join(args.set)}" if args.set else ""))
    impls = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(impls) - {"trl", *TUNEFORGE_ARMS})
    if unknown or not impls:
        ap.error(f"--arms: unknown arm(s) {', '.join(unknown) or '(none given)'}; use trl, tuneforge, tuneforge_gc")
    results = {arm: spawn(arm, args) for stage in stages for arm in (f"{impl}-{stage}" for impl in impls)}
    for r in results.values():
        if "error" not in r:
            summarise(r)
    print(f"timed: steps 2..{args.steps} of {args.steps} (step 1 is warm-up)" if args.steps >= 3 else
          f"timed: all {args.steps} steps (no warm-up excluded below 3 steps)")
    goals = report(results, stages)
    elapsed = time.perf_counter() - began
    print(f"elapsed {elapsed:.0f} s; load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
          "end (above 0.5 other work shared the CPU: tok/s are then lower than this machine gives)")
    met = sum(g["met"] for g in goals)
    print(f"summary: goals met {met}/{len(goals)}"
          + "".join(f"; {g['name']} {g['line'].split(': ')[-2]}" for g in goals if not g["met"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"arms": results, "goals": goals, "elapsed_s": elapsed,
                                               "options": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
