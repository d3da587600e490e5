"""Multiple-choice benchmarks (MMLU / C-Eval style) from local files, scored by letter log-probs.

A question is a row with `question`, one column per option letter (A, B, C, D, ...), `answer`
(the letter) and optionally `subject`. The prompt is a chat: n solved examples of the same
subject as user/assistant turns, then the question, rendered with the chat template and its
generation prompt. The model's choice is the option letter with the highest next-token logit.
"""

from __future__ import annotations

import csv
import io
import json
import string
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError
from ..fileio import json_kind, parse_json, read_text
from ..infer.generation import context_length, pad_id, virtual_prefix
from .predict import left_pad


SPLIT_SUFFIXES = ("_test", "_dev", "_val", "_validation")  # MMLU's and C-Eval's file names
READABLE = (".csv", ".json", ".jsonl")
NAMED_COLUMNS = ("id", "question", "answer", "subject", "explanation")
# the benchmarks' own prompt wording: MMLU's (plus what to answer with), and C-Eval's for zh
PROMPTS = {
    "en": ("The following are multiple choice questions (with answers) about {subject}. "
           "Answer with the letter of the correct option.", "\nAnswer:"),
    "zh": ("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。", "\n答案："),
}


def subject_of(path: Path) -> str:
    """astronomy_test.csv and astronomy_dev.csv hold the same subject, so shots can be matched."""
    stem = path.stem
    for suffix in SPLIT_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def read_benchmark(paths) -> list[dict]:
    """Questions of every file given; a folder stands for its .csv/.json/.jsonl files (MMLU's
    data/test, C-Eval's val), read in name order. Raises DataError (one line naming the file and
    line) as `read_questions` does, and for a folder without such files."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in READABLE and p.is_file())
            if not found:
                raise DataError(f"benchmark folder '{path}' holds no .csv, .json or .jsonl file")
            files += found
        else:
            files.append(path)
    return [row for path in files for row in read_questions(path)]


def _read_csv(text: str, path: Path) -> list[tuple[str, object]]:
    """With a header (C-Eval: id,question,A,B,C,D,answer,...) or without one, as MMLU's own
    files are: question, the options, then the answer letter. Blank lines are skipped."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        table = [(reader.line_num, values) for values in reader if values]
    except csv.Error as exc:
        raise DataError(f"benchmark file '{path}' line {reader.line_num}: not valid CSV ({exc}); "
                        "fix the line") from None
    if not table:
        return []
    # CMMLU capitalises Question and Answer; the option letters stay as they are
    header = [h.strip().lower() if h.strip().lower() in NAMED_COLUMNS else h.strip() for h in table[0][1]]
    if "question" in header:
        missing = [c for c in ("A", "B", "answer") if c not in header]
        if missing:
            raise DataError(f"benchmark file '{path}' line {table[0][0]}: the header has no "
                            f"{', '.join(missing)} column; name the columns question, A, B, ... and answer")
        rows = []
        for line, values in table[1:]:
            if len(values) != len(header):
                raise DataError(f"benchmark file '{path}' line {line}: {len(values)} values, but the "
                                f"header names {len(header)} columns; fix the line")
            rows.append((f"line {line}", dict(zip(header, values))))
        return rows
    rows = []
    for line, values in table:
        if len(values) < 4:
            raise DataError(f"benchmark file '{path}' line {line}: a file without a header needs "
                            "question, at least two options and the answer letter")
        *options, answer = values[1:]
        rows.append((f"line {line}", {"question": values[0], "answer": answer,
                                      **dict(zip(string.ascii_uppercase, options))}))
    return rows


def _read_jsonl(text: str, path: Path) -> list[tuple[str, object]]:
    rows = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON text may hold U+2028
        if not line.strip():
            continue
        try:
            rows.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataError(f"benchmark file '{path}' line {number}: malformed JSON at column "
                            f"{err.colno}: {err.msg}; fix the line") from None
        except RecursionError:
            raise DataError(f"benchmark file '{path}' line {number}: JSON nested too deeply to "
                            "read; flatten it") from None
    return rows


def read_questions(path: str | Path) -> list[dict]:
    """Rows of a .json (a list of objects), .jsonl (an object per line) or .csv file; subject
    defaults to the file's name without a split suffix (_test, _dev, _val).

    Raises DataError (one line naming the file, and the line or item) for a missing, unreadable
    or non-UTF-8 file, malformed JSON or CSV, a file without questions, a question without
    question / A / B / answer, a value that is not text, and an answer that is not the letter
    of one of its options."""
    path = Path(path)
    if not path.exists():
        hint = ("; key=value settings go before --benchmark, which takes every path after it"
                if "=" in path.name else "")
        raise DataError(f"benchmark file '{path}' does not exist{hint}")
    if path.suffix not in READABLE and not path.is_dir():
        raise DataError(f"benchmark file '{path}' is not a .csv, .json or .jsonl file; give one of "
                        "those (or a folder of them)")
    text = read_text(path, "benchmark file", DataError)
    if path.suffix == ".csv":
        rows = _read_csv(text, path)
    elif path.suffix == ".jsonl":
        rows = _read_jsonl(text, path)
    else:
        data = parse_json(text, path, "benchmark file", DataError)
        if not isinstance(data, list):
            raise DataError(f"benchmark file '{path}' must hold a JSON list of questions "
                            f"([{{\"question\": ..., \"A\": ..., \"B\": ..., \"answer\": \"A\"}}, ...]), "
                            f"not {json_kind(data)}")
        rows = [(f"item {i}", row) for i, row in enumerate(data, 1)]
    if not rows:
        raise DataError(f"benchmark file '{path}' holds no questions")
    for where, row in rows:
        _check_question(row, f"benchmark file '{path}' {where}")
        if row.get("subject") in (None, ""):
            row["subject"] = subject_of(path)
    return [row for _, row in rows]


def _check_question(row, where: str) -> None:
    """One question as scoring needs it; DataError naming `where` otherwise."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a question must be an object with question, A, B, ... and "
                        f"answer, not {json_kind(row)}")
    missing = [c for c in ("question", "A", "B", "answer") if row.get(c) in (None, "")]
    if missing:
        raise DataError(f"{where}: needs columns question, A, B, ... and answer (missing or empty: "
                        f"{', '.join(missing)})")
    for key, value in row.items():
        if (key in ("question", "answer", "subject") or key in string.ascii_uppercase) and not (
                value is None or isinstance(value, (str, int, float)) and not isinstance(value, bool)):
            raise DataError(f"{where}: '{key}' must be text, not {json_kind(value)}")
    options = letters(row)
    if str(row["answer"]).strip().upper() not in options:
        raise DataError(f"{where}: the answer {row['answer']!r} is not one of its options "
                        f"({', '.join(options)}); write the letter of the right option")


def letters(row: dict) -> list[str]:
    return [c for c in string.ascii_uppercase if row.get(c) not in (None, "")]


def format_question(row: dict, lang: str = "en") -> str:
    options = "\n".join(f"{c}. {row[c]}" for c in letters(row))
    return f"{row['question']}\n{options}{PROMPTS[lang][1]}"


def build_messages(row: dict, shots: list[dict], lang: str = "en", names: dict | None = None) -> list[dict]:
    """names: subject -> display name (mapping.json's), else the subject with spaces."""
    subject = (names or {}).get(row["subject"]) or str(row["subject"]).replace("_", " ")
    messages = [{"role": "system", "content": PROMPTS[lang][0].format(subject=subject)}]
    for shot in shots:
        messages += [{"role": "user", "content": format_question(shot, lang)},
                     {"role": "assistant", "content": str(shot["answer"]).strip().upper()}]
    return messages + [{"role": "user", "content": format_question(row, lang)}]


def pick_shots(rows: list[dict], index: int, n_shot: int, dev: list[dict] | None) -> list[dict]:
    """n solved examples of the same subject: from `dev` if given, else other test rows."""
    pool = dev if dev is not None else [r for i, r in enumerate(rows) if i != index]
    return [r for r in pool if r["subject"] == rows[index]["subject"]][:n_shot]


def _check_room(tokens: int, context: int | None, virtual: int, adapter: str | None, index: int,
                rows: list[dict], shots: int) -> None:
    """ConfigError when question `index`'s prompt of `tokens` tokens (with `shots` shots) and the
    `virtual` tokens of adapter `adapter` are more than a context of `context` tokens."""
    if context is None or tokens + virtual <= context:
        return
    added = f" and adapter {adapter!r} adds {virtual} virtual tokens" if virtual else ""
    fix = (f"lower n_shot (its {shots} shots take part of it)" if shots else
           "leave the question out: alone it does not fit")
    raise ConfigError(
        f"benchmark question {index + 1} of {len(rows)} (subject {rows[index]['subject']!r}) is a "
        f"{tokens}-token prompt{added}, but this model's context is {context} tokens; {fix}")


@torch.inference_mode()
def evaluate_choices(model, tokenizer, rows: list[dict], n_shot: int = 0,
                     dev: list[dict] | None = None, batch_size: int = 8,
                     progress: bool = True, lang: str = "en", names: dict | None = None,
                     adapter: str | None = None) -> dict:
    """{"accuracy": {subject: %, ..., "average": %}, "choices": [letter per row]}.

    Raises ConfigError, before any scoring, for a prompt (the question with its shots) that runs
    past the model's context with the active adapter's virtual tokens (prompt / prefix tuning,
    ...; `adapter`: its name for the message): a model with learned positions would fail on it,
    a rope model would score it on positions it was never trained on."""
    letter_ids = {c: tokenizer.encode(c, add_special_tokens=False)[-1]
                  for c in string.ascii_uppercase}
    context = context_length(model, tokenizer)
    virtual, name = virtual_prefix(model)
    prompts = []
    for i, row in enumerate(rows):
        shots = pick_shots(rows, i, n_shot, dev)
        messages = build_messages(row, shots, lang, names)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        _check_room(len(prompts[-1]), context, virtual, adapter or name, i, rows, len(shots))
    choices = []
    for start in tqdm(range(0, len(rows), batch_size), desc="choices", unit="batch",
                      disable=not progress):
        batch = {k: v.to(model.device)
                 for k, v in left_pad(prompts[start:start + batch_size], pad_id(tokenizer)).items()}
        # positions count real tokens only, so a padded row scores as it would alone
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        last = model(**batch, position_ids=positions).logits[:, -1]  # left padding: the last column is every row's next token
        for row, logits in zip(rows[start:start + batch_size], last):
            options = letters(row)
            scores = logits[[letter_ids[c] for c in options]]
            choices.append(options[int(scores.argmax())])
    per_subject = defaultdict(list)
    for row, choice in zip(rows, choices):
        per_subject[row["subject"]].append(choice == str(row["answer"]).strip().upper())
    accuracy = {s: round(100 * sum(v) / len(v), 4) for s, v in sorted(per_subject.items())}
    all_hits = [hit for v in per_subject.values() for hit in v]
    accuracy["average"] = round(100 * sum(all_hits) / max(len(all_hits), 1), 4)
    return {"accuracy": accuracy, "choices": choices}
