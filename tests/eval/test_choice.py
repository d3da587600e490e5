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
