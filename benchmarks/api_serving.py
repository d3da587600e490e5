"""Serving throughput of `tuneforge api`'s engine under concurrent requests, on the default model.

    python benchmarks/api_serving.py                      # 8 requests, 64 tokens each
    python benchmarks/api_serving.py --requests 16 --gap 0.1 --max-tokens 96

Requests arrive `--gap` seconds apart, each from its own client thread, half for the base model
and half for a LoRA adapter (a fresh random one unless --adapter is given), greedy. Arms:

- hf-generate (the peer): what LLaMA-Factory's Hugging Face API backend does: one request at a
  time, each through transformers' generate() with a TextIteratorStreamer (tuneforge's ChatModel,
  one per model id);
- one-at-a-time: tuneforge's engine with api_max_batch_size 1 (its decode loop, no batching);
- continuous: tuneforge's default (api_max_batch_size 8): a request joins the running batch at the
  next step.

Printed per arm: wall time for all requests, generated tokens per second, mean and worst time to
first token and to the last token; then the speed ratio to the peer. Every arm must give the
same answers (greedy), which the script checks.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTIONS = ["Who are you?", "Name three colours of the rainbow.", "What is 12 plus 30?",
             "Write one sentence about the sea.", "Give me a tip for learning to cook.",
             "What is the capital of France?", "Explain what a cat is to a child.",
             "Suggest a name for a small boat."]


def random_adapter(path: Path) -> str:
    from tuneforge.adapters import LoraConfig, add_adapter, save_adapter
    from tuneforge.models import load_model_and_tokenizer
    from tuneforge.config import load_config

    model, _ = load_model_and_tokenizer(load_config(None, {"infer_dtype": "float32"}).model)
    add_adapter(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    save_adapter(model, path)
    return str(path)


def run_hf_generate(adapter: str, args) -> dict:
    from tuneforge.config import load_config
    from tuneforge.infer import ChatModel

    values = {"infer_dtype": "float32", "do_sample": False, "max_new_tokens": args.max_tokens}
    chats = [ChatModel(load_config(None, values)),
             ChatModel(load_config(None, {**values, "adapter_name_or_path": adapter}))]
    "".join(chats[0].stream([{"role": "user", "content": "hi"}], max_new_tokens=4))  # warm-up
    one_at_a_time = threading.Lock()

    def generate(i, messages):
        with one_at_a_time:
            for piece in chats[i % 2].stream(messages):
                yield piece

    return _drive(generate, args, largest=1, count_tokens=lambda text: len(
        chats[0].tokenizer(text, add_special_tokens=False)["input_ids"]))


def run_arm(adapter: str, batch: int, args) -> dict:
    from tuneforge.config import load_config
    from tuneforge.infer.engine import Engine

    engine = Engine.from_config(load_config(None, {
        "adapter_name_or_path": adapter, "infer_dtype": "float32", "do_sample": False,
        "api_max_batch_size": batch}))
    models = [engine.base_name, Path(adapter).name]
    for _ in engine.generate(models[0], [{"role": "user", "content": "hi"}], max_tokens=4):
        pass  # warm-up
    counts = {}

    def generate(i, messages):
        gen = engine.generate(models[i % 2], messages, temperature=0, max_tokens=args.max_tokens)
        yield from gen
        counts[i] = gen.result.completion_tokens

    result = _drive(generate, args, largest=None, count_tokens=None, counts=counts)
    result["largest"] = engine.batcher.largest_batch
    return result


def _drive(generate, args, largest, count_tokens, counts=None) -> dict:
    """Client threads arriving `gap` apart; each streams its answer."""
    results = [None] * args.requests
    start = time.perf_counter()

    def client(i):
        time.sleep(i * args.gap)
        sent = time.perf_counter()
        first, text = None, ""
        for piece in generate(i, [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]):
            first = first or time.perf_counter()
            text += piece
        done = time.perf_counter()
        results[i] = {"text": text, "ttft": (first or done) - sent, "latency": done - sent}

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(counts.values()) if counts is not None else sum(count_tokens(r["text"]) for r in results)
    return {"wall": wall, "tok/s": tokens / wall, "ttft": [r["ttft"] for r in results],
            "latency": [r["latency"] for r in results], "texts": [r["text"] for r in results],
            "largest": largest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--gap", type=float, default=0.2, help="seconds between arrivals")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--adapter", help="a LoRA adapter folder (default: a random one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        adapter = args.adapter or random_adapter(Path(tmp) / "lora")
        arms = {"hf-generate (peer)": run_hf_generate(adapter, args),
                "one-at-a-time": run_arm(adapter, 1, args), "continuous": run_arm(adapter, 8, args)}
    print(f"{args.requests} requests {args.gap}s apart, {args.max_tokens} new tokens each, greedy, "
          f"base and LoRA alternating, fp32, {torch.get_num_threads()} threads\n")
    print("| arm | wall s | tokens/s | TTFT mean / max s | latency mean / max s | largest batch | speed vs peer |")
    print("|---|---|---|---|---|---|---|")
    base = arms["hf-generate (peer)"]["wall"]
    for name, r in arms.items():
        print(f"| {name} | {r['wall']:.1f} | {r['tok/s']:.1f} | {statistics.mean(r['ttft']):.2f} / "
              f"{max(r['ttft']):.2f} | {statistics.mean(r['latency']):.2f} / {max(r['latency']):.2f} | "
              f"{r['largest']} | {base / r['wall']:.2f}x |")
    texts = [r["texts"] for r in arms.values()]
    print(f"\nsame answers in every arm: {all(t == texts[0] for t in texts)}")


if __name__ == "__main__":
    main()
