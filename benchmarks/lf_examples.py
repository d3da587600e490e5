"""Run LLaMA-Factory's own `examples/` folder through tuneforge, unchanged, and count what runs.

    python benchmarks/lf_examples.py path/to/LLaMA-Factory/examples [--data ../shared/data] [--steps 1]

Each YAML that is a LLaMA-Factory run config (it names `model_name_or_path`) runs as its folder
says, in one scratch folder so that later configs find what earlier ones wrote (`saves/...`):
training configs with `tuneforge train`, then `export_dir` configs with `tuneforge export`, then
the rest (inference) with `tuneforge chat --prompt`. What a user's machine would download is
served offline instead: every hub id the configs name is a Hugging Face cache entry (HF_HOME in
the scratch folder, HF_HUB_OFFLINE=1) holding the default model (SmolLM2-135M-Instruct), and
`data/` is the demo data folder. Only `max_steps` is added (training length; default 1).
Accelerate / DeepSpeed / Ray files (no `model_name_or_path`) are listed as not run configs.

Prints one row per config (ran, refused with tuneforge's line, or failed with the last line of a
traceback) and the counts by reason. Nothing of LLaMA-Factory is copied into this repository."""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
COMMIT = "0" * 40


def default_model() -> Path:
    sys.path.insert(0, str(HERE.parent))
    from tuneforge.models import default_model_dir as converted  # converted once into the user cache

    return converted()


def hub_cache(home: Path, repo_id: str, source: Path) -> None:
    """`repo_id` in an HF cache under `home` (hub/models--org--name/snapshots + refs/main)."""
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    if repo.exists():
        return
    (repo / "snapshots").mkdir(parents=True)
    os.symlink(source, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


def command_of(cfg: dict) -> str:
    if "export_dir" in cfg:
        return "export"
    if cfg.get("do_train") or cfg.get("do_predict") or "stage" in cfg:
        return "train"
    return "chat"


def run(command: str, path: Path, cwd: Path, env: dict, steps: int, timeout: int) -> tuple[str, str]:
    """(outcome, line): ran / refused / failed / timeout, with tuneforge's line or the last line."""
    argv = [sys.executable, "-m", "tuneforge", command, str(path)]
    if command == "train":
        argv.append(f"max_steps={steps}")
    if command == "chat":
        argv += ["--prompt", "Hi", "max_new_tokens=8"]
    try:
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", f"still running after {timeout} s"
    if done.returncode == 0:
        return "ran", ""
    errors = [line[len("tuneforge: error: "):] for line in done.stderr.splitlines()
              if line.startswith("tuneforge: error: ")]
    if errors:
        return "refused", " | ".join(errors)
    tail = [line for line in done.stderr.splitlines() if line.strip()]
    return "failed", tail[-1] if tail else f"exit {done.returncode}"


def reason(line: str) -> str:
    """A refusal line without the config's own values, to count alike refusals together."""
    line = re.sub(r"'[^']*\.ya?ml'", "<config>", line)
    return line[:140]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("examples", type=Path, help="LLaMA-Factory's examples/ folder")
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data",
                        help="the demo data folder served as data/ (default ../shared/data)")
    parser.add_argument("--steps", type=int, default=1, help="max_steps of each training config")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per config")
    parser.add_argument("--only", help="run only configs whose path contains one of these comma-separated texts")
    args = parser.parse_args()
    model = default_model()
    scratch = Path(tempfile.mkdtemp(prefix="lf-examples-"))
    (scratch / "data").symlink_to(args.data.resolve())
    # LLaMA-Factory's configs name files by paths from its root (deepspeed: examples/deepspeed/ds_z3_config.json)
    (scratch / "examples").symlink_to(args.examples.resolve())
    env = {**os.environ, "HF_HOME": str(scratch / "hf"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("HF_HUB_CACHE", None)
    rows, plan = [], []
    for path in sorted(args.examples.rglob("*.y*ml")):
        if args.only and not any(part in str(path) for part in args.only.split(",")):
            continue
        name = str(path.relative_to(args.examples))
        try:
            cfg = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            rows.append((name, "-", "not YAML", ""))
            continue
        if not isinstance(cfg, dict) or "model_name_or_path" not in cfg:
            rows.append((name, "-", "not a run config", "accelerate / DeepSpeed / Ray settings"))
            continue
        for key in ("model_name_or_path", "teacher_model", "reward_model"):
            value = cfg.get(key)
            if isinstance(value, str) and value.count("/") == 1 and not Path(value).exists():
                hub_cache(scratch / "hf", value, model)
        plan.append(({"train": 0, "export": 1, "chat": 2}[command_of(cfg)], name, path, command_of(cfg)))
    for _, name, path, command in sorted(plan):
        outcome, line = run(command, path, scratch, env, args.steps, args.timeout)
        rows.append((name, command, outcome, line))
        print(f"{outcome:8} {command:6} {name}  {line}", flush=True)
    print("\n| config | command | outcome | tuneforge says |\n|---|---|---|---|")
    for name, command, outcome, line in rows:
        print(f"| {name} | {command} | {outcome} | {line} |")
    counts = collections.Counter(outcome for _, _, outcome, _ in rows)
    print("\n" + ", ".join(f"{n} {k}" for k, n in counts.most_common()) + f" (of {len(rows)} files)")
    by_reason = collections.Counter(reason(part) for _, _, outcome, line in rows if outcome == "refused"
                                    for part in line.split(" | "))
    for text, n in by_reason.most_common():
        print(f"{n:3}  {text}")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
