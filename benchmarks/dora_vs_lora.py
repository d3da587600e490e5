"""Step time of DoRA against plain LoRA, for tuneforge and for peft, measured in the same run.

    python benchmarks/dora_vs_lora.py --steps 20 --batch 4 --seq 256 --dtype bf16

One training step = forward + backward + AdamW step on the adapter parameters of the default
model (SmolLM2-135M-Instruct), r=8 on all linear layers, one fixed random token batch. Each of the
four setups (tuneforge LoRA / DoRA, peft LoRA / DoRA) starts from the same base weights, runs
`--warmup` steps, then `--steps` timed ones; the rounds are interleaved (`--rounds`) so that a
machine getting slower or faster during the run affects all setups alike.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SETUPS = ("tuneforge-lora", "tuneforge-dora", "peft-lora", "peft-dora")


def load_base(dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    from tuneforge.models import default_model_dir

    model = AutoModelForCausalLM.from_pretrained(str(default_model_dir()), dtype=dtype)
    model.config.use_cache = False
    return model.to(device)


def build(setup: str, base, r: int):
    model = copy.deepcopy(base)
    kw = dict(r=r, lora_alpha=2 * r, target_modules="all-linear", use_dora=setup.endswith("dora"))
    if setup.startswith("tuneforge"):
        from tuneforge.adapters import LoraConfig, add_adapter

        add_adapter(model, LoraConfig(**kw))
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**kw))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_steps(model, opt, ids: torch.Tensor, n: int, device: str) -> list[float]:
    times = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per setup (split over the rounds)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per setup before timing")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the four setups")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    base = load_base(DTYPES[args.dtype], args.device)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=args.device)
    models = {s: build(s, base, args.rank) for s in SETUPS}
    del base
    for s in SETUPS:
        run_steps(*models[s], ids, args.warmup, args.device)
    per_round = max(1, args.steps // max(1, args.rounds))
    times: dict[str, list[float]] = {s: [] for s in SETUPS}
    for _ in range(max(1, args.rounds)):
        for s in SETUPS:
            times[s] += run_steps(*models[s], ids, per_round, args.device)

    ms = {s: 1000 * statistics.mean(t) for s, t in times.items()}
    print(f"default model, r={args.rank} all-linear, batch {args.batch} x {args.seq} tokens, {args.dtype}, "
          f"{args.device}, torch threads {torch.get_num_threads()}, {len(times[SETUPS[0]])} timed steps each")
    print(f"{'setup':<16}{'ms/step':>10}{'median':>10}")
    for s in SETUPS:
        print(f"{s:<16}{ms[s]:>10.1f}{1000 * statistics.median(times[s]):>10.1f}")
    print(f"DoRA/LoRA (tuneforge):        {ms['tuneforge-dora'] / ms['tuneforge-lora']:.3f}")
    print(f"DoRA/LoRA (peft):             {ms['peft-dora'] / ms['peft-lora']:.3f}")
    print(f"tuneforge-DoRA / peft-DoRA:   {ms['tuneforge-dora'] / ms['peft-dora']:.3f}")
    print(f"tuneforge-LoRA / peft-LoRA:   {ms['tuneforge-lora'] / ms['peft-lora']:.3f}")


if __name__ == "__main__":
    main()
