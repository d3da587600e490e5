"""QLoRA against LoRA on the default model (SmolLM2-135M-Instruct, fp32): bytes, memory, speed, answers.

    python benchmarks/qlora.py --steps 5 --warmup 1 --batch 4 --seq 256      # the measurement
    python benchmarks/qlora.py --quick                                       # a few minutes

1. Bytes the quantized Linear weights hold against the same weights in bf16 (`quantized_bytes`),
   for 4-bit NF4 with and without double quantization, and 8-bit.
2. Peak RSS and step time of one training step (forward + backward + AdamW on the adapter; LoRA
   r=8, alpha=16 on all linear layers; a fixed-seed batch of random token ids) for the arms
   lora (fp32 base), qlora-native, qlora-bnb (4-bit NF4, compute float32, tuneforge's / bitsandbytes'
   dequantize kernel) and qlora-int8. Each arm runs in its own fresh process (this script with
   `--arm`), so one arm's peak cannot show up in another's. The peak is reset after the warm-up
   (writing 5 to /proc/self/clear_refs resets VmHWM), so loading the fp32 model before quantizing
   it is not counted; where that is refused, the whole-life peak (ru_maxrss) is shown, marked.
   Memory is whole-process RSS as tuneforge leaves it: the fp32 weights stay mmapped from the
   safetensors file (file-backed pages, shown apart as "(file)"), and glibc keeps freed heap memory.
   The arms inherit the environment, so e.g. MALLOC_MMAP_THRESHOLD_=131072 applies to all of them.
3. Greedy answers of the fp32 and the 4-bit model side by side; how far the nf4 and int8 logits are
   from fp32 (mean |difference|, top-1 agreement, KL) on the prompt and on fp32's answer tokens.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARMS = ("lora", "qlora-native", "qlora-bnb", "qlora-int8")
# quantize_model arguments per arm (None: the fp32 base stays as it is)
ARM_QUANT = {
    "lora": None,
    "qlora-native": dict(bits=4, backend="native"),
    "qlora-bnb": dict(bits=4, backend="bitsandbytes"),
    "qlora-int8": dict(bits=8, backend="native"),
}
BYTES_SETUPS = (
    ("4-bit nf4, double quant", dict(bits=4, double_quant=True)),
    ("4-bit nf4, no double quant", dict(bits=4, double_quant=False)),
    ("8-bit int8", dict(bits=8)),
)
PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "Explain in one sentence what a neural network is.",
)
GOAL_BYTES, GOAL_PEAK, GOAL_TIME = 0.27, 0.6, 1.3
# --shape: Llama shapes for part 2 with random weights (SmolLM2-1.7B's: 1.7 B parameters)
SHAPES = {
    "default": None,
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True,
                 max_position_embeddings=2048),
}
RESULT_TAG = "@@qlora-arm "
MB = 1 << 20


# ---- process memory ----------------------------------------------------------------------------
def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def release_freed_memory() -> None:
    """Hand memory Python and glibc hold but no longer use back to the OS, so that RSS shows what
    is alive (the fp32 weights freed by quantizing would otherwise stay counted)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS may include freed memory
        pass


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel refuses (then ru_maxrss is used)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    st = proc_status()
    return st["VmHWM"] <= st["VmRSS"] + 4 * MB  # a kernel that ignores "5" leaves the old peak


# ---- one arm, in its own process ----------------------------------------------------------------
def load_base():
    from transformers import AutoModelForCausalLM

    from tuneforge.models import default_model_dir

    model = AutoModelForCausalLM.from_pretrained(str(default_model_dir()), dtype=torch.float32)
    model.config.use_cache = False
    return model


def build_arm(arm: str, rank: int, shape: str = "default"):
    """The model as `tuneforge train` loads it (load_model_and_tokenizer quantizes), plus LoRA;
    or, for another `shape`, a randomly initialised model of that shape (memory and time do
    not depend on the weights' values), quantized as the loader would."""
    from tuneforge.adapters import LoraConfig, add_adapter
    from tuneforge.config import ModelArguments
    from tuneforge.models import load_model_and_tokenizer

    quant = ARM_QUANT[arm]
    if shape != "default":
        from transformers import LlamaConfig, LlamaForCausalLM

        from tuneforge.quant import quantize_model

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
        model.config.use_cache = False
        if quant is not None:
            model = quantize_model(model, compute_dtype="float32", **quant)
        add_adapter(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
        return model.train()
    args = ModelArguments()
    if quant is not None:
        args.quantization_bit, args.quantization_backend = quant["bits"], quant["backend"]
        args.compute_dtype = "float32"
    model, _ = load_model_and_tokenizer(args, dtype=torch.float32)
    add_adapter(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    return model.train()


def train_step(model, opt, ids: torch.Tensor) -> float:
    """One step with the loss as tuneforge's training loop computes it (fused head + loss)."""
    from tuneforge.train.token_loss import TokenLoss

    t0 = time.perf_counter()
    loss_sum, n = TokenLoss(model, model, "fused")({"input_ids": ids, "labels": ids})
    (loss_sum / n).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def run_arm(args) -> dict:
    torch.set_num_threads(args.threads)
    release_freed_memory()
    imports = proc_status()
    model = build_arm(args.arm, args.rank, args.shape)
    if args.gradient_checkpointing:  # as LLaMA-Factory runs by default, and the QLoRA paper did
        from tuneforge.workflows import _enable_activation_checkpointing

        _enable_activation_checkpointing(model)
    with torch.no_grad():  # fault in every weight page: fp32 weights are mmapped from the file, lazily
        for t in model.state_dict().values():
            t.sum()
    release_freed_memory()
    weights = proc_status()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen)
    for _ in range(args.warmup):
        train_step(model, opt, ids)
    rss_before = proc_status()["VmRSS"]
    peak_reset = reset_peak()
    times = [train_step(model, opt, ids) for _ in range(args.steps)]
    end = proc_status()
    peak = end["VmHWM"] if peak_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "arm": args.arm, "threads": torch.get_num_threads(), "peak_reset": peak_reset,
        "rss_imports": imports["VmRSS"], "rss_weights": weights["VmRSS"],
        "rss_weights_file": weights["RssFile"] - imports["RssFile"],
        "rss_before": rss_before, "peak": peak, "rss_file_end": end["RssFile"], "times": times,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def spawn_arm(arm: str, args) -> dict:
    """Run one arm in a fresh interpreter; its result dict, or {'error': ...}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--arm", arm, "--threads", str(args.threads),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--seq", str(args.seq), "--rank", str(args.rank), "--shape", args.shape]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"arm": arm, "error": f"exit {proc.returncode}: {tail}"}


# ---- the report -------------------------------------------------------------------------------
def verdict(ratio: float, goal: float) -> str:
    return f"goal <= {goal}: {'met' if ratio <= goal else 'NOT met'}"


def report_bytes(base) -> float:
    from tuneforge.quant import quantize_model, quantized_bytes

    print("\n== 1. bytes of the quantized linear weights (lm_head and embeddings stay fp32) ==")
    ratio_4bit = float("nan")
    for label, kw in BYTES_SETUPS:
        model = quantize_model(copy.deepcopy(base), compute_dtype="float32", backend="native", **kw)
        held, bf16 = quantized_bytes(model)
        ratio = held / bf16
        goal = ""
        if kw.get("double_quant"):
            ratio_4bit, goal = ratio, "   " + verdict(ratio, GOAL_BYTES)
        print(f"{label:<28}{held / MB:>9.1f} MB of {bf16 / MB:.1f} MB bf16   ratio {ratio:.3f}{goal}")
        del model
    return ratio_4bit


def report_arms(args) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for _ in range(args.rounds):  # rounds interleave the arms, so drift affects all alike
        for arm in args.arms:
            r = spawn_arm(arm, args)
            if arm in results and "error" not in r and "error" not in results[arm]:
                prev = results[arm]
                r["times"] = prev["times"] + r["times"]
                r["peak"] = max(prev["peak"], r["peak"])
            results[arm] = r
    ok = {a: r for a, r in results.items() if "error" not in r}
    first = next(iter(ok.values()), None)
    model = "the default model" if args.shape == "default" else f"a random Llama of shape {args.shape}"
    print(f"\n== 2. one training step of {model}: batch {args.batch} x {args.seq} tokens, LoRA r={args.rank} "
          f"alpha={2 * args.rank} all-linear, AdamW, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, torch threads "
          f"{first['threads'] if first else args.threads}, {args.warmup} warm-up + {args.steps} timed "
          f"steps x {args.rounds} round(s), each arm in its own process ==")
    if first and not all(r["peak_reset"] for r in ok.values()):
        print("NOTE: /proc/self/clear_refs refused: peaks are ru_maxrss over the whole process life, "
              "so they include loading the fp32 model before quantizing it")
    if first:
        print(f"RSS after importing torch + transformers (not in 'weights'): {first['rss_imports'] / MB:.0f} MB")
    print(f"{'arm':<14}{'weights MB':>11}{'(file)':>8}{'before MB':>10}{'peak MB':>9}{'(file)':>8}"
          f"{'median ms':>10}{'weights/lora':>13}{'peak/lora':>10}{'time/lora':>10}")
    ref = ok.get("lora")
    for arm, r in results.items():
        if "error" in r:
            print(f"{arm:<14}FAILED: {r['error']}")
            continue
        r["ms"] = 1000 * statistics.median(r["times"])
        r["weights_only"] = r["rss_weights"] - r["rss_imports"]
        rat = ""
        if ref:
            r["weights_ratio"] = r["weights_only"] / (ref["rss_weights"] - ref["rss_imports"])
            r["peak_ratio"] = r["peak"] / ref["peak"]
            r["time_ratio"] = r["ms"] / (1000 * statistics.median(ref["times"]))
            rat = f"{r['weights_ratio']:>13.3f}{r['peak_ratio']:>10.3f}{r['time_ratio']:>10.3f}"
        print(f"{arm:<14}{r['weights_only'] / MB:>11.0f}{r['rss_weights_file'] / MB:>8.0f}"
              f"{r['rss_before'] / MB:>10.0f}{r['peak'] / MB:>9.0f}{r['rss_file_end'] / MB:>8.0f}"
              f"{r['ms']:>10.1f}{rat}")
    print("weights: RSS after load + quantize + adapter, every weight page touched, freed memory "
          "trimmed, minus the imports; before: whole-process RSS after the warm-up (weights, optimizer "
          "state, what the allocator kept); peak: whole-process VmHWM over the timed steps; (file): "
          "the part of it that is file-backed pages (the mmapped safetensors file; in the peak, also "
          "the shared libraries)")
    if ref:
        for arm, r in ok.items():
            if arm != "lora":
                print(f"{arm}: peak RSS ratio {r['peak_ratio']:.3f} ({verdict(r['peak_ratio'], GOAL_PEAK)}), "
                      f"step time ratio {r['time_ratio']:.3f} ({verdict(r['time_ratio'], GOAL_TIME)})")
    return results


def chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def logit_gap(ref: torch.Tensor, other: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per position: mean |logit difference|, top-1 agreement, KL(ref || other) in nats."""
    ref, other = ref.float(), other.float()
    logp = ref.log_softmax(-1)
    return {
        "diff": (ref - other).abs().mean(-1),
        "top1": (ref.argmax(-1) == other.argmax(-1)).float(),
        "kl": (logp.exp() * (logp - other.log_softmax(-1))).sum(-1),
    }


@torch.inference_mode()
def report_answers(base, tokenizer, args) -> dict[str, float]:
    """Greedy answers of fp32 and nf4 side by side; logit gaps of nf4 and int8 against fp32,
    teacher-forced on the prompt + fp32's answer, split into prompt and answer positions."""
    from tuneforge.quant import quantize_model

    quantized = {name: quantize_model(copy.deepcopy(base), compute_dtype="float32", backend="auto", **kw).eval()
                 for name, kw in (("nf4", dict(bits=4)), ("int8", dict(bits=8)))}
    models = {"fp32": base.eval(), **quantized}
    for m in models.values():
        m.config.use_cache = True
    print(f"\n== 3. greedy answers (chat template, max_new_tokens {args.max_new_tokens}): "
          "fp32 against 4-bit nf4 (double quant, compute float32) ==")
    gaps: dict[tuple[str, str], list[dict]] = {}
    for prompt in PROMPTS[: args.prompts]:
        ids = chat_ids(tokenizer, prompt)
        outs = {}
        for name in ("fp32", "nf4"):
            outs[name] = models[name].generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                do_sample=False, temperature=None, top_p=None, top_k=None,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)[0]
        print(f"Q: {prompt}")
        for name, out in outs.items():
            print(f"  {name:>4}: {tokenizer.decode(out[ids.shape[1]:], skip_special_tokens=True).strip()!r}")
        seq = outs["fp32"].unsqueeze(0)  # position i predicts token i + 1
        logits = {name: m(input_ids=seq).logits[0, :-1] for name, m in models.items()}
        split = ids.shape[1] - 1  # positions before it predict prompt tokens, from it on the answer's
        for name in quantized:
            g = logit_gap(logits["fp32"], logits[name])
            gaps.setdefault((name, "prompt"), []).append({k: v[:split] for k, v in g.items()})
            gaps.setdefault((name, "answer"), []).append({k: v[split:] for k, v in g.items()})
    summary = {}
    for (name, part), items in gaps.items():
        cat = {k: torch.cat([g[k] for g in items]) for k in items[0]}
        n = cat["diff"].numel()
        line = {k: float(v.mean()) if n else float("nan") for k, v in cat.items()}
        summary[f"{name}-{part}"] = line
        print(f"{name:>4} vs fp32 over {n:>3} {part} tokens: mean |logit diff| {line['diff']:.3f}, "
              f"top-1 agreement {line['top1']:.3f}, KL {line['kl']:.4f} nats")
    print("(teacher-forced on the prompt + the fp32 answer; 'answer' top-1 agreement: how often the "
          "quantized model would pick fp32's next token)")
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per arm and round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per arm before the peak is reset")
    ap.add_argument("--rounds", type=int, default=1, help="fresh processes per arm, interleaved")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--shape", choices=list(SHAPES), default="default",
                    help="part 2 on a random model of a larger shape, where the Linear weights "
                         "dominate memory (the default model's weights are loaded otherwise)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="in every arm")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (all cores)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="prompts to answer (0: skip part 3)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="2 timed steps, 3 prompts, 24 new tokens")
    ap.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # internal: run one arm, print JSON
    args = ap.parse_args(argv)
    if args.arm:
        print(RESULT_TAG + json.dumps(run_arm(args)), flush=True)
        return
    if args.quick:
        args.steps, args.warmup, args.rounds = min(args.steps, 2), min(args.warmup, 1), 1
        args.prompts, args.max_new_tokens = min(args.prompts, 3), min(args.max_new_tokens, 24)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    torch.set_num_threads(args.threads)

    from tuneforge.models import load_tokenizer, default_model_dir

    t0 = time.perf_counter()
    base = load_base()
    tokenizer = load_tokenizer(default_model_dir())
    print(f"default model {default_model_dir().name}: fp32, {sum(p.numel() for p in base.parameters()) / 1e6:.1f} "
          f"M parameters, torch {torch.__version__}, {args.threads} threads")
    ratio_4bit = report_bytes(base)
    arms = report_arms(args)
    gaps = report_answers(base, tokenizer, args) if args.prompts > 0 else {}

    parts = [f"bytes 4bit/bf16 {ratio_4bit:.3f} ({'met' if ratio_4bit <= GOAL_BYTES else 'NOT met'})"]
    for arm, r in arms.items():
        if arm != "lora" and "peak_ratio" in r:
            ok = r["peak_ratio"] <= GOAL_PEAK and r["time_ratio"] <= GOAL_TIME
            parts.append(f"{arm} peak {r['peak_ratio']:.2f} time {r['time_ratio']:.2f} ({'met' if ok else 'NOT met'})")
        elif "error" in r:
            parts.append(f"{arm} FAILED")
    if gaps:
        g = gaps["nf4-prompt"]
        parts.append(f"nf4 on prompt tokens: top-1 {g['top1']:.3f}, |dlogit| {g['diff']:.3f}")
    print(f"\nSUMMARY: {'; '.join(parts)}; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
