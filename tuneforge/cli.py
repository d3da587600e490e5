"""`tuneforge train|chat|eval|export|api|webui|keys|env|convert-data`: parse, call the workflows, print. User-fixable errors
become one line on stderr and exit code 2 (a traceback only with --debug)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from . import __version__
from .config import describe_keys, load_config, parse_overrides
from .errors import TuneforgeError
from .fileio import describe_os_error

EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuneforge", description="Fine-tune LLMs with LoRA and friends.",
        epilog="Config keys follow LLaMA-Factory's YAML; `tuneforge keys` lists them all.")
    parser.add_argument("--version", action="version", version=f"tuneforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, config_required: bool = True):
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("config", nargs="?", help="YAML config file"
                       + ("" if config_required else " (optional)"))
        p.set_defaults(needs_config=config_required, subparser=p)
        p.add_argument("overrides", nargs="*", help="key=value pairs that override the YAML")
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        return p

    command("train", "Fine-tune a model as the YAML config says.")
    chat = command("chat", "Chat with a model (plus adapters) in the terminal.", config_required=False)
    chat.add_argument("--model", help="model_name_or_path (overrides the config)")
    chat.add_argument("--adapter", help="adapter_name_or_path (overrides the config)")
    chat.add_argument("--prompt", help="answer this one message and exit (for scripts)")
    chat.add_argument("--system", help="system prompt")
    ev = command("eval", "Eval loss and perplexity on the eval data; with do_predict: true also "
                 "generate answers and score them (ROUGE-1/2/L, BLEU-4). Greedy unless do_sample. "
                 "With task: (e.g. mmlu_test) or --benchmark: multiple-choice accuracy instead.",
                 config_required=False)
    ev.add_argument("--max_samples", type=int, help="evaluate only the first N eval examples")
    ev.add_argument("--benchmark", nargs="+", metavar="PATH",
                    help="instead: multiple-choice accuracy per subject on these .json/.jsonl/.csv "
                    "files or folders of them (columns question, A, B, ..., answer, optional "
                    "subject; MMLU's header-less CSVs work as they are)")
    ev.add_argument("--n_shot", type=int, help="solved examples before each question (default: the "
                    "n_shot key, 5)")
    ev.add_argument("--dev", nargs="+", metavar="PATH", help="files or folders the n-shot "
                    "examples come from, matched by subject (default: the other questions)")
    command("export", "Merge adapters into the model and write a Hugging Face folder.")
    api = command("api", "Serve the model and its adapters over an OpenAI-compatible HTTP API "
                  "(each adapter folder in adapter_name_or_path is a model id; api_key or the "
                  "API_KEY environment variable = bearer auth).", config_required=False)
    api.add_argument("--host", help="address to bind (default: api_host, API_HOST, else 127.0.0.1: "
                     "this machine only)")
    api.add_argument("--port", type=int, help="port (default: api_port, API_PORT, else 8000)")
    webui_help = ("Serve the web UI (train, with live loss curve; evaluate, chat, export, runs) in the browser; "
                  "needs the webui extra: pip install 'tuneforge[webui]'.")
    webui = sub.add_parser("webui", help=webui_help, description=webui_help)
    webui.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    webui.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    webui.add_argument("--lang", default="en", choices=("en", "zh"), help="language of the page (en)")
    webui.add_argument("--debug", action="store_true", help="show tracebacks")
    sub.add_parser("keys", help="List every config key with its default and meaning.")
    sub.add_parser("env", help="Print versions and devices, for bug reports.")
    conv = sub.add_parser("convert-data", help="Write records with other column names (question/answer "
                          "JSON, a CSV, ...) as LLaMA-Factory alpaca or sharegpt records.")
    conv.add_argument("input", help="a .json (list of objects), .jsonl or .csv file")
    conv.add_argument("output", help="the new .json or .jsonl file (never overwritten)")
    conv.add_argument("--to", default="alpaca", choices=("alpaca", "sharegpt"), help="record format (alpaca)")
    conv.add_argument("--map", action="append", metavar="KEY=COLUMN", help="which column holds instruction, "
                      "input, output, system or history (repeatable); unnamed keys are guessed from common "
                      "names (question, answer, prompt, response, ...) and printed")
    conv.add_argument("--name", help="the dataset's name in dataset_info.json (default: the output's stem)")
    conv.add_argument("--register", action="store_true", help="add the entry to the dataset_info.json beside "
                      "the output (else it is printed)")
    conv.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _take_back_overrides(args) -> None:
    """`eval --benchmark a.json n_shot=0`: the nargs="+" flags swallow what follows them; a
    key=value that is not an existing path is an override, as anywhere else on the line."""
    for flag in ("benchmark", "dev"):
        items = getattr(args, flag, None)
        if not items:
            continue
        keep = [i for i in items if "=" not in i or os.path.exists(i)]
        moved = [i for i in items if i not in keep]
        setattr(args, flag, keep or None)
        if moved:
            args.overrides = [*getattr(args, "overrides", []), *moved]


def _split_config_arg(args) -> tuple[str | None, list[str]]:
    """`tuneforge chat key=value` has no YAML: the first positional is then an override."""
    config, overrides = getattr(args, "config", None), list(getattr(args, "overrides", []))
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)
        config = None
    return config, overrides


def _run_chat(cfg, args) -> None:
    from .infer.stream import RequestError
    from .workflows import chat_model

    model = chat_model(cfg)
    history: list[dict] = []
    if args.prompt is not None:
        for piece in model.stream([{"role": "user", "content": args.prompt}], system=args.system):
            print(piece, end="", flush=True)
        print()
        return
    print("tuneforge chat: type a message; /clear forgets the conversation, /exit quits.")
    while True:
        try:
            text = input("\nUser: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        command = text.strip()
        if command == "/exit":
            return
        if command == "/clear":
            history = []
            print("(conversation cleared)")
            continue
        if not command:
            continue
        history.append({"role": "user", "content": text})
        print("Assistant: ", end="", flush=True)
        reply = ""
        try:
            for piece in model.stream(history, system=args.system):
                print(piece, end="", flush=True)
                reply += piece
        except RequestError as exc:  # the conversation outgrew the context: this turn is dropped
            history.pop()
            print(f"(not answered: {exc}, or /clear the conversation)")
            continue
        print()
        history.append({"role": "assistant", "content": reply})


def _greedy_unless_asked(config: str | None, values: dict) -> None:
    """Scores should be reproducible: eval decodes greedily unless do_sample is set explicitly
    (do_sample's default, true, is LLaMA-Factory's default for chat)."""
    from .config import read_yaml

    if "do_sample" not in values and "do_sample" not in (read_yaml(config) if config else {}):
        values["do_sample"] = False


def _lf_decoding_for_predict(config: str | None, values: dict) -> None:
    """`tuneforge train` with do_predict decodes as LLaMA-Factory's predict does where the config
    sets nothing (config_lf_keys.LF_DECODING: its max_new_tokens is 1024, tuneforge's 512)."""
    from .config import read_yaml
    from .config_lf_keys import LF_DECODING

    given = {**(read_yaml(config) if config else {}), **values}
    if given.get("do_predict") is True:
        for key, value in LF_DECODING.items():
            if key not in given:
                values[key] = value


def _run_eval(cfg, args) -> None:
    import json

    from .workflows import evaluate

    if args.benchmark or cfg.evaluation.task:
        from .workflows import evaluate_benchmark

        results = evaluate_benchmark(cfg, args.benchmark, args.n_shot, args.dev, args.max_samples)
        out_dir = cfg.evaluation.save_dir or cfg.train.output_dir
    else:
        results = evaluate(cfg, limit=args.max_samples)
        out_dir = cfg.train.output_dir
    print(json.dumps(results, indent=2, ensure_ascii=False))
    if out_dir:
        print(f"results written to {out_dir}")


def _run_webui(args) -> None:
    import importlib.util

    from .errors import ConfigError

    if importlib.util.find_spec("gradio") is None:
        raise ConfigError("tuneforge webui needs gradio, which is not installed: pip install 'tuneforge[webui]'")
    from .webui import launch

    launch(host=args.host, port=args.port, lang=args.lang)


def _env() -> None:
    import platform
    from pathlib import Path

    import torch
    import transformers

    print(f"tuneforge {__version__} from {Path(__file__).resolve().parent}")  # which checkout or install runs
    print(f"python {platform.python_version()} ({sys.executable}) on {platform.platform()}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"cuda: {torch.cuda.is_available()}"
          + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
    from .threads import apply_threads, wait_policy

    count, why = apply_threads()
    fewer = "; training uses fewer while other processes keep these cores busy" if count > 1 else ""
    print(f"cpu threads: {count} ({why}{fewer}); OpenMP wait policy: {wait_policy()}")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="[tuneforge] %(message)s")
    from .distributed.launch import info_on_rank_zero

    info_on_rank_zero()  # under torchrun: each info line once, from rank 0
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.showwarning = _warning_as_log_line


def _warning_as_log_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning (ours or a library's) is one `[tuneforge]` line like every other, not
    a file:line report with the source line under it."""
    logging.getLogger("tuneforge").warning("%s", " ".join(str(message).split()))


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # the reader went away (`tuneforge keys | head -3`): stop quietly
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so that the exit's flush cannot fail again
        except (OSError, ValueError, AttributeError):
            pass
        return 128 + 13  # as a process killed by SIGPIPE


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # key=value after a flag (`chat --prompt hi max_new_tokens=8`) lands here: keep it
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*getattr(args, "overrides", []), *extra]
    _take_back_overrides(args)
    if getattr(args, "needs_config", False) and not args.config and not args.overrides:
        args.subparser.error(f"nothing to {args.command}: give a YAML config (tuneforge "
                             f"{args.command} cfg.yaml [key=value ...]) or key=value settings")
    if args.command == "keys":
        print(describe_keys())
        return 0
    if args.command == "env":
        _env()
        return 0
    _quiet_libraries()
    try:
        if args.command == "webui":
            _run_webui(args)
            return 0
        if args.command == "convert-data":
            from .data.convert import convert_file

            lines, _ = convert_file(args.input, args.output, args.to, args.map, args.name, args.register)
            print("\n".join(lines))
            return 0
        config, overrides = _split_config_arg(args)
        values = parse_overrides(overrides)
        if args.command == "chat":  # flags take paths verbatim, not as YAML scalars
            if args.model:
                values["model_name_or_path"] = args.model
            if args.adapter:
                values["adapter_name_or_path"] = args.adapter
        if args.command == "eval":
            _greedy_unless_asked(config, values)
        if args.command == "train":
            _lf_decoding_for_predict(config, values)
        cfg = load_config(config, values)  # checked once here, before any process starts
        if args.command == "train":
            from .distributed.launch import needs_torchrun, relaunch
            from .workflows import train

            if needs_torchrun():  # FORCE_TORCHRUN=1 or several devices: LLaMA-Factory's launcher
                if cfg.distributed.deepspeed is not None:  # refused alike in every process: once, here
                    from .distributed.deepspeed_config import refuse_deepspeed

                    refuse_deepspeed()
                return relaunch(sys.argv[1:] if argv is None else list(argv))

            train(cfg)
        elif args.command == "chat":
            _run_chat(cfg, args)
        elif args.command == "eval":
            _run_eval(cfg, args)
        elif args.command == "api":
            from .workflows import api

            api(cfg, host=args.host, port=args.port)
        elif args.command == "export":
            from .workflows import export

            print(f"exported to {export(cfg)}")
    except TuneforgeError as exc:
        if args.debug:
            raise
        from .distributed.launch import note_user_error
        from .errors import ConfigError, DataError

        if note_user_error(isinstance(exc, (ConfigError, DataError))):  # launched: rank 0 prints, for all
            for message in getattr(exc, "messages", [str(exc)]):  # ConfigErrors: one line per blocker
                print(f"tuneforge: error: {' '.join(message.split())}", file=sys.stderr)  # one line
        return EXIT_USER_ERROR
    except BrokenPipeError:
        raise
    except OSError as exc:  # the last net: a file or disk the command met, not a bug to trace
        if args.debug:
            raise
        print(f"tuneforge: error: {describe_os_error(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except MemoryError:
        if args.debug:
            raise
        print("tuneforge: error: out of memory; lower lora_rank, cutoff_len or "
              "per_device_train_batch_size, or use a smaller model", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
