"""Padding-free packing on the default model: padded batch vs packed row, with transformers'
masked sdpa over the whole row and with tuneforge's per-sequence (varlen) attention.

    python benchmarks/packing.py                    # 8 alpaca_en_demo examples, cutoff 512, fp32
    python benchmarks/packing.py --batches 2 --repeats 3 --threads 2

Each arm runs forward + backward of the training loss (LoRA r=8 on all linear layers) on the
same micro-batches; printed: median seconds per micro-batch, real tokens/s, the loss sum (equal
across arms up to rounding), and the attention alone (one layer's shapes, forward + backward).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuneforge.config import load_config  # noqa: E402
from tuneforge.data import PackingCollator, PaddingCollator, load_datasets  # noqa: E402
from tuneforge.models import load_model_and_tokenizer  # noqa: E402
from tuneforge.train.batches import MicroBatchStream  # noqa: E402
from tuneforge.train.methods import prepare_model  # noqa: E402
from tuneforge.train.packed_attention import NAME, register, varlen_attention  # noqa: E402
from tuneforge.train.token_loss import TokenLoss  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def time_step(model, batch, repeats: int) -> tuple[float, float]:
    token_loss = TokenLoss.choose(model, model, batch, None)  # the loop's loss (fused if it can)
    times, loss = [], 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        loss_sum, _ = token_loss(batch)
        loss_sum.backward()
        times.append(time.perf_counter() - start)
        loss = loss_sum.item()
        model.zero_grad(set_to_none=True)
    return statistics.median(times), loss


def attention_only(lengths: list[int], heads=9, kv_heads=3, dim=64, repeats=3,
                   dtype=torch.float32) -> dict:
    """One layer's attention, forward + backward: masked sdpa on the row vs per sequence."""
    total = sum(lengths)
    q = torch.randn(1, heads, total, dim, dtype=dtype, requires_grad=True)
    k = torch.randn(1, kv_heads, total, dim, dtype=dtype, requires_grad=True)
    v = torch.randn(1, kv_heads, total, dim, dtype=dtype, requires_grad=True)
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    idx = torch.arange(total)
    mask = ((seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None]))[None, None]
    starts = [0, *torch.tensor(lengths).cumsum(0)[:-1].tolist()]

    def masked():
        kk = k.repeat_interleave(heads // kv_heads, dim=1)
        vv = v.repeat_interleave(heads // kv_heads, dim=1)
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask).transpose(1, 2)

    out = {}
    for name, fn in (("masked", masked),
                     ("varlen", lambda: varlen_attention(q, k, v, starts, kv_groups=heads // kv_heads))):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn().sum().backward()
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    a = masked()
    b = varlen_attention(q, k, v, starts, kv_groups=heads // kv_heads)
    out["max_diff"] = (a - b).abs().max().item()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=1, help="micro-batches timed per arm")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cutoff", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bf16", action="store_true", help="bf16 weights + autocast, as training")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = load_config(None, {"dataset": "alpaca_en_demo", "dataset_dir": str(SHARED),
                             "cutoff_len": args.cutoff, "bf16": False,
                             "output_dir": tempfile.mkdtemp()})
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model, tokenizer = load_model_and_tokenizer(cfg.model, dtype=dtype)
    splits = load_datasets(cfg.data, tokenizer, seed=42)
    model, _ = prepare_model(model, tokenizer, cfg)
    model.config.use_cache = False  # no KV cache while training, in every arm
    model.train()
    stream = MicroBatchStream(splits.train, args.batch_size, None, seed=42)
    micro = [[splits.train[i] for i in stream.indices(j)] for j in range(args.batches)]
    register()
    arms = [("padded, sdpa", PaddingCollator(tokenizer.pad_token_id), "sdpa"),
            ("packed, masked sdpa", PackingCollator(), "sdpa"),
            (f"packed, {NAME}", PackingCollator(), NAME)]
    print(f"threads {args.threads}, batch {args.batch_size}, cutoff {args.cutoff}, "
          f"{'bf16' if args.bf16 else 'fp32'}, LoRA r=8")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)
    for examples in micro:
        lengths = [len(e["input_ids"]) for e in examples]
        print(f"micro-batch lengths {lengths}: {sum(lengths)} real tokens, "
              f"padded {len(lengths) * max(lengths)}")
        for name, collate, attn in arms:
            model.set_attn_implementation(attn)
            with autocast:
                seconds, loss = time_step(model, collate(examples), args.repeats)
            print(f"  {name:28s} {seconds:7.3f} s  {sum(lengths) / seconds:8.1f} real tok/s  "
                  f"loss sum {loss:.6f}")
        att = attention_only(lengths, repeats=args.repeats, dtype=dtype)
        print(f"  attention only, one layer fwd+bwd: masked {att['masked'] * 1e3:.1f} ms, "
              f"varlen {att['varlen'] * 1e3:.1f} ms, max diff {att['max_diff']:.2e}")


if __name__ == "__main__":
    main()
