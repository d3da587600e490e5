"""Every registered adapter method trained the same way, side by side, in one markdown table.

    python benchmarks/methods.py                          # every method (make bench-methods)
    python benchmarks/methods.py --methods lora,ia3,bottleneck --steps 8
    python benchmarks/methods.py --methods lora:lora_dora,lora:lora_distributed   # LoRA variants

Each method (tuneforge.adapter_methods.METHODS: methods that land later appear by themselves)
and each LoRA variant example (examples/lora_*.yaml with finetuning_type: lora, e.g. DoRA, PiSSA,
per-layer ranks; arm name `lora:<file stem>`, settings from that file) is an arm.

Every arm trains the default model (SmolLM2-135M-Instruct, fp32) with `tuneforge.workflows.train` on
alpaca_en_demo (../shared/data), the same examples in the same order: `--steps` optimizer steps
of `--batch` examples (cutoff `--cutoff`), constant learning rate, `--eval` held-out examples.
Its own settings (its keys and learning_rate) come from its example config: among the sft
examples/*.yaml of that finetuning_type without quantization or a named template, <method>.yaml, else the one that
sets the fewest finetune keys; else the defaults. Each method runs in its own fresh process (this script
with --arm), so the peak RSS is its own; LoRA always runs, since the ratios are to LoRA in the
same run. Columns:
- trainable: parameters the optimizer updates (count, % of the base model's);
- step time: mean seconds per optimizer step over all steps but the first, / LoRA's;
- peak RSS: the process's peak over the training steps (reset once model and data are
  loaded), / LoRA's;
- eval loss: mean token loss on the held-out examples after training (before training, every
  method that starts as the base model has the base's loss, printed above the table);
- latency: seconds per generated token (greedy, KV cache, prefill excluded: time for 1 + n
  tokens minus time for 1, over n) with the adapter attached, / the same for the merged model
  (the base model with the adapter folded in, which costs what the base costs); methods that
  merge also show the model merged with the adapter layers still in place;
- merges: whether `tuneforge export` can fold the adapter into the weights (else the reason).
Timings are the best of `--rounds` repetitions; the machine should otherwise be idle.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

DATA = ROOT.parent / "shared" / "data"
PROMPT = [{"role": "user", "content": "Give three tips for staying healthy."}]
DEFAULT_LR = 1e-3


# ---- the parent: one process per method, one table -----------------------------------------
def _examples(finetuning_type: str) -> list[tuple[Path, dict]]:
    """(path, its finetune keys and learning_rate) of the sft examples of `finetuning_type` without
    quantization, in name order."""
    import yaml

    from tuneforge.config import FinetuningArguments

    keys = {f.name for f in dataclasses.fields(FinetuningArguments)} - {"stage"}
    found = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        if _selected(raw) == finetuning_type and raw.get("stage", "sft") == "sft" \
                and "quantization_bit" not in raw and "template" not in raw:  # template_*.yaml show a template
            own = {k: v for k, v in raw.items() if k in keys}
            if "learning_rate" in raw:
                own["learning_rate"] = float(raw["learning_rate"])
            found.append((path, own))
    return found


def _selected(raw: dict) -> str | None:
    """The method a config trains: its finetuning_type, or the one a selector key picks
    (`finetuning_type: lora` with `adaptive: moe` is lora_moe)."""
    from tuneforge.adapter_methods import METHOD_SELECTORS

    chosen = raw.get("finetuning_type")
    for key, table in METHOD_SELECTORS.items():
        refines, selects = table.get(raw.get(key), (None, None))
        if chosen == refines:
            chosen = selects
    return chosen


def _split_tasks(data: str, records: int, folder: Path) -> tuple[str, list[str]]:
    """A dataset_dir holding alpaca_en_demo's first `records` records as two tasks (its halves,
    alpaca_a and alpaca_b), for methods that read one task per dataset: the same examples as the
    other arms, as two tasks."""
    rows = json.loads((Path(data) / "alpaca_en_demo.json").read_text())[:records]
    names = ["alpaca_a", "alpaca_b"]
    halves = [rows[: len(rows) // 2], rows[len(rows) // 2:]]
    for name, half in zip(names, halves):
        (folder / f"{name}.json").write_text(json.dumps(half))
    (folder / "dataset_info.json").write_text(json.dumps({n: {"file_name": f"{n}.json"} for n in names}))
    return str(folder), names


def variant_arms() -> list[str]:
    """`lora:<stem>` for each examples/lora_*.yaml that trains plain finetuning_type: lora (a variant)."""
    return [f"lora:{p.stem}" for p, _ in _examples("lora") if p.stem.startswith("lora_")]


def method_names(wanted: str | None, variants: bool = False) -> list[str]:
    from tuneforge.adapter_methods import METHODS

    names = list(METHODS) + (variant_arms() if variants or wanted else [])
    if wanted:
        chosen = [n.strip() for n in wanted.split(",") if n.strip()]
        unknown = [n for n in chosen if n not in names]
        if unknown:
            raise SystemExit(f"--methods: unknown {unknown}; registered: {', '.join(names)}")
        names = [n for n in names if n in chosen]
    return names if "lora" in names else ["lora", *names]


def method_settings(name: str) -> tuple[dict, str]:
    """(the arm's finetune keys and learning_rate from its example config, the file's name): for a
    method, <method>.yaml, else its example that sets the fewest keys; for `lora:<stem>`, <stem>.yaml."""
    method, _, stem = name.partition(":")
    if stem:
        own = dict(next(o for p, o in _examples(method) if p.stem == stem))
        own.setdefault("learning_rate", DEFAULT_LR)
        return own, f"{stem}.yaml"
    found = [(p.stem != name, len(own), p.name, own) for p, own in _examples(name)]
    if not found:
        return {"finetuning_type": name, "learning_rate": DEFAULT_LR}, "defaults"
    _, _, file, own = min(found, key=lambda f: f[:3])
    return own, file


def run_arm(name: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, __file__, "--arm", name, "--json", out.name, "--steps", str(args.steps),
               "--batch", str(args.batch), "--cutoff", str(args.cutoff), "--eval", str(args.eval),
               "--new-tokens", str(args.new_tokens), "--rounds", str(args.rounds), "--data", str(args.data)]
        began = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            return {"method": name, "error": tail[0]}
        result = json.loads(Path(out.name).read_text())
        result["run_s"] = time.perf_counter() - began
        return result


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def table(results: list[dict]) -> str:
    lora = next((r for r in results if r["method"] == "lora" and "error" not in r), {})
    rows = ["| method | trainable | step time / LoRA | peak RSS / LoRA | eval loss | latency / merged base "
            "| merged / base | merges |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['method']} | failed: {r['error']} | | | | | | |")
            continue
        merged = _ratio(r["latency_merged"], r["latency_base"]) if r["latency_merged"] else "-"
        rows.append(
            f"| {r['method']} | {r['trainable']:,} ({100 * r['trainable'] / r['base_params']:.3f}%) "
            f"| {_ratio(r['step_s'], lora.get('step_s'))} | {_ratio(r['peak_rss'], lora.get('peak_rss'))} "
            f"| {r['eval_loss']:.4f} | {_ratio(r['latency'], r['latency_base'])} | {merged} "
            f"| {'yes' if r['merges'] is True else 'no: ' + r['merges']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", help="comma list of finetuning_type names or lora:<example stem> "
                                      "(default: every registered method)")
    ap.add_argument("--variants", action="store_true", help="also every LoRA variant example (lora:<stem>)")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per method")
    ap.add_argument("--batch", type=int, default=2, help="examples per step")
    ap.add_argument("--cutoff", type=int, default=256, help="cutoff_len")
    ap.add_argument("--eval", type=int, default=8, help="held-out examples for the eval loss")
    ap.add_argument("--new-tokens", type=int, default=32, help="generated tokens per latency measurement")
    ap.add_argument("--rounds", type=int, default=3, help="latency repetitions (the best counts)")
    ap.add_argument("--data", default=str(DATA), help="dataset_dir holding alpaca_en_demo")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--arm", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.arm:
        Path(args.json).write_text(json.dumps(arm(args.arm, args)))
        return

    results = []
    for name in method_names(args.methods, args.variants):
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        results.append(run_arm(name, args))
        r = results[-1]
        done = r.get("error") or f"{r['run_s']:.0f} s, settings from {r['settings']}: {json.dumps(r)}"
        print(f"[bench] {name}: {done}", file=sys.stderr, flush=True)
    ok = [r for r in results if "error" not in r]
    import torch

    print(f"default model, alpaca_en_demo, {args.steps} steps x {args.batch} examples (cutoff {args.cutoff}), "
          f"eval on {args.eval} held-out examples, fp32, CPU, torch threads {torch.get_num_threads()}")
    if ok:
        before = statistics.median(r["eval_loss_before"] for r in ok)
        print(f"eval loss before training: {before:.4f} (the base model's, for every method that starts as it)")
    print()
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


# ---- one method in its own process --------------------------------------------------------
def arm(name: str, args) -> dict:
    import torch

    from throughput_arms import reset_peak, vm_hwm
    from tuneforge.config import load_config
    from tuneforge.train import loop
    from tuneforge.workflows import train

    settings, source = method_settings(name)
    steps: list[float] = []
    counted: dict = {}
    peak = {"rss": 0}
    train_step, run = loop.TrainingRun.train_step, loop.TrainingRun.run

    def observed_step(self):
        began = time.perf_counter()
        try:
            return train_step(self)
        finally:
            steps.append(time.perf_counter() - began)

    def observed_run(self):
        from tuneforge.adapters import trainable_parameters

        counted["trainable"], counted["all"] = trainable_parameters(self.model)
        reset_peak()
        try:
            return run(self)
        finally:
            peak["rss"] = vm_hwm()

    loop.TrainingRun.train_step, loop.TrainingRun.run = observed_step, observed_run
    from tuneforge.adapter_methods import TASK_ID_METHODS

    records = args.steps * args.batch + args.eval  # the same first records for every method
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as data:
        dataset, data_dir, served = "alpaca_en_demo", args.data, out
        if _selected(settings) in TASK_ID_METHODS:  # multi-task: alpaca's halves as two tasks
            data_dir, tasks = _split_tasks(args.data, records, Path(data))
            dataset, settings = ",".join(tasks), {**settings, "multitask": True}
            served = str(Path(out) / tasks[0])  # latency of one task's plain LoRA
        values = {
            "dataset": dataset, "dataset_dir": data_dir, "cutoff_len": args.cutoff,
            "val_size": args.eval, "per_device_train_batch_size": args.batch, "gradient_accumulation_steps": 1,
            "per_device_eval_batch_size": args.eval, "max_steps": args.steps, "lr_scheduler_type": "constant",
            "max_samples": records,
            "output_dir": out, "save_steps": 10**6, "logging_steps": 1, "bf16": False, "seed": 42,
            "disable_tqdm": True, **settings,
        }
        metrics = train(load_config(None, values))
        latency = measure_latency(served, args)
    return {
        "method": name, "settings": source, "trainable": counted["trainable"],
        "base_params": counted["all"] - counted["trainable"], "peak_rss": peak["rss"],
        "step_s": statistics.mean(steps[1:] if len(steps) > 1 else steps),
        "eval_loss": metrics.get("eval_loss"), "eval_loss_before": metrics.get("eval_loss_before",
                                                                            metrics.get("eval_loss")),
        **latency, "torch_threads": torch.get_num_threads(),
    }


def measure_latency(adapter_dir: str, args) -> dict:
    """Per-token decode latency of the plain base (what the merged model costs), the model with the
    adapter attached, and (where it merges) merged in place; the three are measured in turn within
    each of --rounds rounds, so a machine that gets busier or idler affects them alike. Per-token:
    (best time for 1 + n new tokens - best time for 1) / n."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge import adapters
    from tuneforge.errors import ConfigError
    from tuneforge.export.adapter import refuse_unmergeable_files, refuse_unmergeable_layers
    from tuneforge.models import default_model_dir

    path = str(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = adapters.load_adapter(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), adapter_dir).eval()
    try:
        refuse_unmergeable_files([adapter_dir])
        refuse_unmergeable_layers(model)
        merges = True
    except ConfigError as e:
        merges = str(e).split(": ", 1)[-1].split("; export it")[0]

    def timed(m, n: int) -> float:
        began = time.perf_counter()
        with torch.no_grad():
            m.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - began

    setups = ["base", "adapter"] + (["merged"] * (merges is True))
    times: dict[str, tuple[list, list]] = {s: ([], []) for s in setups}
    for _ in range(args.rounds + 1):  # the first round warms up and is dropped
        for setup in setups:
            m = base if setup == "base" else model
            if setup == "merged":
                adapters.merge_adapters(model)
            times[setup][0].append(timed(m, 1))
            times[setup][1].append(timed(m, 1 + args.new_tokens))
            if setup == "merged":
                adapters.unmerge_adapters(model)
    best = {s: (min(long[1:]) - min(short[1:])) / args.new_tokens for s, (short, long) in times.items()}
    return {"latency": best["adapter"], "latency_merged": best.get("merged"), "latency_base": best["base"],
            "merges": merges}


if __name__ == "__main__":
    main()
