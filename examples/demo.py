"""`make demo`: ask the default model who it is, fine-tune it with LoRA on the identity data,
and ask again. Each step is the CLI command a user would type, printed before it runs."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time

import yaml

QUESTION = "Who are you?"


def run(args: list[str], capture: bool = False) -> str:
    print(f"\n$ tuneforge {shlex.join(args)}", flush=True)
    cmd = [sys.executable, "-m", "tuneforge", *args]
    if not capture:
        subprocess.run(cmd, check=True)
        return ""
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.strip()
    print(out, flush=True)
    return out


def main(config: str) -> int:
    started = time.perf_counter()
    settings = yaml.safe_load(open(config, encoding="utf-8"))
    name, author = settings["placeholders"]["name"], settings["placeholders"]["author"]
    output_dir = settings["output_dir"]

    print(f"== Before training: the default model answers {QUESTION!r}")
    before = run(["chat", config, "--prompt", QUESTION], capture=True)
    print(f"\n== Fine-tuning with LoRA to become {name}, made by {author}")
    run(["train", config])
    print(f"\n== After training: base model + the adapter in {output_dir}")
    after = run(["chat", config, "--adapter", output_dir, "--prompt", QUESTION], capture=True)

    print(f"\nbefore: {before}\nafter:  {after}")
    print(f"(demo took {time.perf_counter() - started:.0f} s; loss curve: {output_dir}/training_loss.png)")
    learned = name.lower() in after.lower() and author.lower() in after.lower()
    print(f"The answer {'names' if learned else 'does NOT name'} {name} and {author}.")
    return 0 if learned else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "examples/demo_identity.yaml"))
