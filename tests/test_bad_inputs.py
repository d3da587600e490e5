"""Every bad input kept in tests/bad_inputs/<area>/<case>/ gets exactly its one-line message (one line per blocker).

A case folder holds the files of one bad input and a `case.yaml`:

    argv: [train, cfg.yaml]     # tuneforge's argv, run in-process in a fresh copy of the folder
    error: "..."                # the exact text after 'tuneforge: error: ' (a list: a config with
                                # several blockers, one error line each, in that order)
    exit: 2                     # optional (default 2)
    tiny_model: model           # optional: copy the tiny random Llama into this subfolder first
    env: {NAME: value}          # optional environment for the run

`{tiny_model}`, `{shared_data}` and `{work}` (the case's working folder, absolute) in argv, in the case's *.yaml / *.json files and in `error`
stand for the shared (read-only) tiny model folder, ../shared/data and the case's copy. In `error` only, lists that
grow with every registered adapter method are written as placeholders, so a new method does not
rewrite every case that prints one: `{finetuning_types}` (the finetuning_type choices, "a, b, c"),
`{quantized_base}` (adapter_methods.QUANTIZED_BASE, "a, b or c"), `{peft_types}` (the registered
methods' peft_types, "A, B, C"), `{readers:KEY}` (the
registered methods whose keys include KEY, "a, b or c") and `{declared:KEY}` (the methods
adapter_methods.METHOD_KEYS declares for KEY, "a, b or c"); likewise `{stages}` (the registered
stages, "a, b, c"). The run must exit with the
given code, print exactly the expected `tuneforge: error:` lines, no traceback, and leave every file in the
folder as it was (nothing added, removed or changed).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import sys
from pathlib import Path

import dataclasses
import re

import pytest
import yaml

from tuneforge import adapters
from tuneforge.adapter_methods import METHOD_KEYS, QUANTIZED_BASE
from tuneforge.cli import main
from tuneforge.config import FinetuningArguments
from tuneforge.train.stages import STAGES

CASES_ROOT = Path(__file__).parent / "bad_inputs"
CASES = sorted(p.parent for p in CASES_ROOT.glob("*/*/case.yaml"))
SUBSTITUTED = (".yaml", ".yml", ".json")


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "link:" + str(path.readlink())
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _substitute(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def _either(names) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _expected_error(text: str) -> str:
    """`error` with the method-list placeholders filled from the registries (see the docstring)."""
    choices = next(f for f in dataclasses.fields(FinetuningArguments) if f.name == "finetuning_type")
    text = text.replace("{finetuning_types}", ", ".join(choices.metadata["choices"]))
    text = text.replace("{quantized_base}", _either(QUANTIZED_BASE))
    text = text.replace("{stages}", ", ".join(STAGES))
    text = text.replace("{peft_types}", ", ".join(dict.fromkeys(m.peft_type for m in adapters.methods.all_methods())))
    text = re.sub(r"\{declared:(\w+)\}", lambda m: _either(METHOD_KEYS[m.group(1)]["methods"]), text)
    return re.sub(r"\{readers:(\w+)\}",
                  lambda m: _either(x.name for x in adapters.methods.all_methods() if m.group(1) in x.keys), text)


@pytest.mark.parametrize("case", CASES, ids=[f"{p.parent.name}/{p.name}" for p in CASES])
def test_bad_input(case, tmp_path, monkeypatch, capsys, tiny_model_dir, shared_data_dir):
    spec = yaml.safe_load((case / "case.yaml").read_text(encoding="utf-8"))
    work = tmp_path / case.name
    shutil.copytree(case, work, symlinks=True, ignore=shutil.ignore_patterns("case.yaml"))
    values = {"tiny_model": str(tiny_model_dir), "shared_data": str(shared_data_dir), "work": str(work),
              # the parser's depth limit is the interpreter's (pytest-xdist's workers raise it)
              "recursion_limit": str(sys.getrecursionlimit())}
    if spec.get("tiny_model"):
        shutil.copytree(tiny_model_dir, work / spec["tiny_model"])
    for path in work.rglob("*"):
        if path.suffix in SUBSTITUTED and path.is_file() and not path.is_symlink():
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue  # a deliberately non-UTF-8 file stays as it is
            if "{" in text:
                path.write_text(_substitute(text, values), encoding="utf-8")
    for name, value in (spec.get("env") or {}).items():
        monkeypatch.setenv(name, _substitute(str(value), values))
    monkeypatch.chdir(work)
    before = _snapshot(work)

    code = main([_substitute(str(a), values) for a in spec["argv"]])
    logging.getLogger().handlers.clear()  # the CLI's basicConfig handler holds capsys' stream
    err = capsys.readouterr().err

    errors = [line for line in err.splitlines() if line.startswith("tuneforge: error:")]
    assert "Traceback" not in err, err
    expected = spec["error"] if isinstance(spec["error"], list) else [spec["error"]]
    assert errors == [f"tuneforge: error: {_expected_error(_substitute(e, values))}" for e in expected], err
    assert code == spec.get("exit", 2)
    assert _snapshot(work) == before, "the failed run changed files in its folder"


def test_every_area_has_cases():
    """The folders exist and are read: an empty set would make the test above pass vacuously."""
    assert len(CASES) >= 10
