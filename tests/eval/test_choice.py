"""Multiple-choice benchmarks: file reading, n-shot prompts, letter scoring, accuracy per subject."""

from __future__ import annotations

import json

import pytest
import torch

from tuneforge.errors import DataError
from tuneforge.eval.choice import (build_messages, evaluate_choices, pick_shots, read_benchmark,
                                   read_questions)

ROWS = [
    {"question": "1 + 1 = ?", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "B", "subject": "math"},
    {"question": "2 + 2 = ?", "A": "4", "B": "2", "C": "3", "D": "5", "answer": "A", "subject": "math"},
    {"question": "Capital of France?", "A": "Rome", "B": "Paris", "C": "Oslo", "D": "Bern",
     "answer": "B", "subject": "geography"},
]


class AlwaysB(torch.nn.Module):
    """A stand-in model whose next token is always the letter B."""

    def __init__(self, b_id, vocab):
        super().__init__()
        self.b_id, self.vocab = b_id, vocab
        self.device = torch.device("cpu")

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.b_id] = 1.0
        return type("Out", (), {"logits": logits})()


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path)


def test_accuracy_per_subject_by_hand(tokenizer):
    model = AlwaysB(tokenizer.encode("B", add_special_tokens=False)[-1], len(tokenizer))
    result = evaluate_choices(model, tokenizer, ROWS, n_shot=1, batch_size=2, progress=False)
    # answers B, A (math) and B (geography): math 1 of 2, geography 1 of 1, all 2 of 3
    assert result["choices"] == ["B", "B", "B"]
    assert result["accuracy"] == {"geography": 100.0, "math": 50.0, "average": 66.6667}


def test_shots_come_from_the_same_subject():
    shots = pick_shots(ROWS, 0, 5, None)
    assert shots == [ROWS[1]]
    messages = build_messages(ROWS[0], shots)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2]["content"] == "A" and messages[-1]["content"].endswith("D. 4\nAnswer:")


def test_batched_equals_single(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = ROWS * 2
    batched = evaluate_choices(model, tok, rows, n_shot=1, batch_size=6, progress=False)
    single = evaluate_choices(model, tok, rows, n_shot=1, batch_size=1, progress=False)
    assert batched == single


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_read_formats(tmp_path, suffix):
    path = tmp_path / f"astronomy{suffix}"
    rows = [{k: v for k, v in r.items() if k != "subject"} for r in ROWS]
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        path.write_text("question,A,B,C,D,answer\n" + "\n".join(
            ",".join(f'"{r[k]}"' for k in ("question", "A", "B", "C", "D", "answer")) for r in rows))
    read = read_questions(path)
    assert len(read) == 3 and read[0]["subject"] == "astronomy" and read[2]["B"] == "Paris"


def _mmlu_layout(root):
    """MMLU's own data: data/{dev,test}/<subject>_<split>.csv, no header row."""
    for split, rows in (("dev", ['"1 + 2 = ?",1,2,3,4,C']),
                        ("test", ['"2 + 5 = ?",7,6,5,4,A', '"3 + 3 = ?",5,6,"7, or so",8,B'])):
        (root / split).mkdir(parents=True)
        (root / split / f"elementary_math_{split}.csv").write_text("\n".join(rows) + "\n")
        (root / split / f"astronomy_{split}.csv").write_text('"Closest star?",Sun,Vega,Sirius,Rigel,A\n')


def test_reads_mmlu_folders_without_a_header(tmp_path):
    _mmlu_layout(tmp_path)
    test = read_benchmark([tmp_path / "test"])
    assert [r["subject"] for r in test] == ["astronomy", "elementary_math", "elementary_math"]
    assert test[2] == {"question": "3 + 3 = ?", "A": "5", "B": "6", "C": "7, or so", "D": "8",
                       "answer": "B", "subject": "elementary_math"}
    dev = read_benchmark([tmp_path / "dev"])
    assert pick_shots(test, 1, 5, dev) == [dev[1]]  # elementary_math_dev matches elementary_math_test


def test_reads_ceval_csv_with_header(tmp_path):
    path = tmp_path / "computer_network_val.csv"
    path.write_text("id,question,A,B,C,D,answer,explanation\n0,TCP is?,a protocol,a cable,a chip,a file,A,\n")
    (row,) = read_questions(path)
    assert row["subject"] == "computer_network" and row["answer"] == "A" and row["D"] == "a file"


def test_cli_benchmark_on_mmlu_folders(tiny_model_dir, tmp_path, capsys):
    from tuneforge.cli import main

    _mmlu_layout(tmp_path)
    assert main(["eval", f"model_name_or_path={tiny_model_dir}", "disable_tqdm=true", "--benchmark",
                 str(tmp_path / "test"), "--dev", str(tmp_path / "dev"), "--n_shot", "1"]) == 0
    out = capsys.readouterr().out
    assert "elementary_math" in out and "astronomy" in out
    (tmp_path / "empty").mkdir()
    assert main(["eval", f"model_name_or_path={tiny_model_dir}", "--benchmark", str(tmp_path / "empty")]) == 2
    assert "holds no .csv" in capsys.readouterr().err


def test_bad_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_questions(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text(json.dumps([{"q": 1}]))
    with pytest.raises(DataError, match="needs columns"):
        read_questions(tmp_path / "bad.json")
    (tmp_path / "short.csv").write_text("what?,A\n")
    with pytest.raises(DataError, match="short.csv' line 1"):
        read_questions(tmp_path / "short.csv")


def test_cli_benchmark(tiny_model_dir, tmp_path, capsys):
    from tuneforge.cli import main

    path = tmp_path / "quiz.json"
    path.write_text(json.dumps(ROWS))
    out = tmp_path / "out"
    assert main(["eval", f"model_name_or_path={tiny_model_dir}", f"output_dir={out}",
                 "disable_tqdm=true", "--benchmark", str(path), "--n_shot", "1"]) == 0
    saved = json.loads((out / "benchmark_results.json").read_text())
    assert set(saved) == {"math", "geography", "average"}
    assert '"average"' in capsys.readouterr().out
    assert main(["eval", f"model_name_or_path={tiny_model_dir}", "--benchmark",
                 str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---- malformed benchmark files: one DataError line naming the file and line (issue 13) ----------
GOOD = {"question": "1 + 1 = ?", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "B"}


@pytest.mark.parametrize("name, content, match", [
    ("q.json", b'[{"question": "x",', r"q.json': malformed JSON at line 1, column 19"),
    ("q.json", json.dumps(GOOD).encode(), r"must hold a JSON list of questions .*not an object"),
    ("q.json", b'"questions"', "not a string"),
    ("q.json", b"[]", "holds no questions"),
    ("q.json", json.dumps([GOOD, [1, 2]]).encode(), "item 2: a question must be an object .*not a list"),
    ("q.json", json.dumps([{**GOOD, "answer": "E"}]).encode(), r"item 1: the answer 'E' is not one of its options \(A, B, C, D\)"),
    ("q.json", json.dumps([{**GOOD, "answer": 2}]).encode(), "the answer 2 is not one of its options"),
    ("q.json", json.dumps([{**GOOD, "answer": None}]).encode(), r"needs columns .*\(missing or empty: answer\)"),
    ("q.json", json.dumps([{**GOOD, "question": ""}]).encode(), r"missing or empty: question"),
    ("q.json", json.dumps([{"question": "x", "A": "y", "answer": "A"}]).encode(), "missing or empty: B"),
    ("q.json", json.dumps([{**GOOD, "B": ["2"]}]).encode(), "'B' must be text, not a list"),
    ("q.json", json.dumps([{**GOOD, "question": True}]).encode(), "'question' must be text, not true/false"),
    ("q.json", json.dumps([{**GOOD, "subject": {"a": 1}}]).encode(), "'subject' must be text, not an object"),
    ("q.json", "[{\"question\": \"Où ?\"}]".encode("cp1252"), "is not UTF-8 text .*Latin-1"),
    ("q.jsonl", (json.dumps(GOOD) + "\n\n{oops}\n").encode(), "q.jsonl' line 3: malformed JSON at column 2"),
    ("q.jsonl", (json.dumps(GOOD) + "\n" + json.dumps([GOOD]) + "\n").encode(), "line 2: a question must be an object"),
    ("q.jsonl", b"\n\n", "holds no questions"),
    ("q.jsonl", ("[" * 100_000 + "\n").encode(), "line 1: JSON nested too deeply"),
    ("q.csv", b"question,A,B,answer\nx,1,2,C\n", r"q.csv' line 2: the answer 'C' is not one of its options \(A, B\)"),
    ("q.csv", b"question,A,B,C\nx,1,2,3\n", "line 1: the header has no answer column"),
    ("q.csv", b"question,answer\nx,A\n", "line 1: the header has no A, B column"),
    ("q.csv", b"question,A,B,answer\nx,1,2,A\ny,1,2\n", "line 3: 3 values, but the header names 4 columns"),
    ("q.csv", b'question,A,B,answer\n"multi\nline",1,2,A\nz,1,2,A,extra\n', "line 4: 5 values"),
    ("q.csv", b"x,1,2,A\ny,1\n", "line 2: a file without a header needs question"),
    ("q.csv", b"", "holds no questions"),
    ("q.csv", "question,A,B,answer\n问题,甲,乙,A\n".encode("gbk"), "is not UTF-8 text .*GBK"),
    ("q.csv", "question,A,B,answer\nx,1,2,A\n".encode("utf-16"), "is not UTF-8 text .*UTF-16"),
    ("q.txt", b"question,A,B,answer\n", "is not a .csv, .json or .jsonl file"),
])
def test_malformed_benchmarks_are_one_line(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=match) as exc:
        read_questions(tmp_path / name)
    assert "\n" not in str(exc.value) and f"benchmark file '{tmp_path / name}'" in str(exc.value)


def test_benchmark_paths_of_the_wrong_kind(tmp_path):
    with pytest.raises(DataError, match="'n_shot=0' does not exist; key=value settings go before --benchmark"):
        read_benchmark(["n_shot=0"])
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(DataError, match="folder.json' holds no .csv, .json or .jsonl file"):
        read_benchmark([tmp_path / "folder.json"])


def test_what_real_benchmarks_hold_still_reads(tmp_path):
    """Lower-case answers, numbers as options, blank CSV lines, empty subjects, a U+2028 inside a
    JSONL string (a line break for str.splitlines, not for JSON)."""
    (tmp_path / "nums.json").write_text(json.dumps([{"question": "1 + 1", "A": 2, "B": 3.5, "answer": " a ",
                                                     "subject": ""}]))
    (row,) = read_questions(tmp_path / "nums.json")
    assert row["subject"] == "nums" and row["A"] == 2
    (tmp_path / "s.jsonl").write_text(json.dumps({**GOOD, "question": "a\u2028b"}, ensure_ascii=False) + "\n")
    assert read_questions(tmp_path / "s.jsonl")[0]["question"] == "a\u2028b"
    (tmp_path / "blank.csv").write_text("question,A,B,answer\n\nx,1,2,b\n\n")
    assert [r["answer"] for r in read_questions(tmp_path / "blank.csv")] == ["b"]
