"""LLaMA-Factory's eval keys (task, task_dir, n_shot, lang, save_dir, batch_size) on local
benchmark folders and zips laid out as LLaMA-Factory's evaluation/ folder holds them."""

from __future__ import annotations

import json
import zipfile

import pytest
import yaml

from tuneforge.cli import main
from tuneforge.errors import ConfigError, DataError
from tuneforge.eval.choice import build_messages
from tuneforge.eval.tasks import category_accuracy, parse_task, resolve_task

MMLU = {  # split -> subject -> header-less rows, as MMLU's own CSVs
    "test": {"astronomy": ['"Closest star?",Sun,Vega,Sirius,Rigel,A', '"Red planet?",Venus,Mars,Io,Moon,B'],
             "elementary_mathematics": ['"2 + 5 = ?",7,6,5,4,A']},
    "dev": {"astronomy": ['"Our galaxy?",Andromeda,Milky Way,M87,Sombrero,B'],
            "elementary_mathematics": ['"1 + 2 = ?",1,2,3,4,C']},
}
MAPPING = {"astronomy": {"name": "天文学", "category": "STEM"},
           "elementary_mathematics": {"name": "初等数学", "category": "STEM"}}


def _mmlu_zip(task_dir):
    root = task_dir / "mmlu"
    root.mkdir(parents=True)
    with zipfile.ZipFile(root / "mmlu.zip", "w") as zf:
        for split, subjects in MMLU.items():
            for subject, rows in subjects.items():
                zf.writestr(f"data/{split}/{subject}_{split}.csv", "\n".join(rows) + "\n")
    (root / "mapping.json").write_text(json.dumps(MAPPING, ensure_ascii=False))
    return root


def test_task_names():
    assert parse_task("mmlu_test") == ("mmlu", "test")
    assert parse_task("ceval_validation") == ("ceval", "validation")
    with pytest.raises(ConfigError, match="<benchmark>_<split>"):
        parse_task("mmlu")


def test_zip_is_unpacked_once_into_the_cache(tmp_path):
    _mmlu_zip(tmp_path / "evaluation")
    cache = tmp_path / "cache"
    task = resolve_task("mmlu_test", tmp_path / "evaluation", cache)
    assert task.questions.name == "test" and task.shots.name == "dev"
    assert sorted(p.name for p in task.questions.iterdir()) == ["astronomy_test.csv",
                                                                 "elementary_mathematics_test.csv"]
    assert task.mapping == MAPPING
    again = resolve_task("mmlu_test", tmp_path / "evaluation", cache)
    assert again.questions == task.questions and len(list(cache.iterdir())) == 1


def test_missing_folders_and_unsafe_zips_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="set task_dir"):
        resolve_task("mmlu_test", tmp_path, tmp_path / "cache")
    _mmlu_zip(tmp_path)
    with pytest.raises(DataError, match="no 'val' folder"):
        resolve_task("mmlu_validation", tmp_path, tmp_path / "cache")
    evil = tmp_path / "evil"
    evil.mkdir()
    with zipfile.ZipFile(evil / "evil.zip", "w") as zf:
        zf.writestr("../../escaped.csv", "a,b,c,d,e,A\n")
    with pytest.raises(DataError, match="outside the archive"):
        resolve_task("evil_test", tmp_path, tmp_path / "cache")
    assert not (tmp_path.parent / "escaped.csv").exists()


def test_category_accuracy_by_hand():
    rows = [{"subject": "astronomy", "answer": "A"}, {"subject": "astronomy", "answer": "B"},
            {"subject": "elementary_mathematics", "answer": "A"}, {"subject": "unmapped", "answer": "A"}]
    mapping = {**MAPPING, "elementary_mathematics": {"category": "Other"}}
    assert category_accuracy(rows, ["A", "A", "A", "A"], mapping) == {"Other": 100.0, "STEM": 50.0}


def test_chinese_prompt_uses_the_mapping_name():
    row = {"question": "离太阳最近的行星？", "A": "水星", "B": "金星", "answer": "A", "subject": "astronomy"}
    messages = build_messages(row, [row], "zh", {"astronomy": "天文学"})
    assert messages[0]["content"].startswith("以下是中国关于天文学考试的单项选择题")
    assert messages[1]["content"].endswith("B. 金星\n答案：") and messages[2]["content"] == "A"


def test_llama_factory_eval_yaml_runs(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """LLaMA-Factory's examples/train_lora/llama3_lora_eval.yaml shape, on the tiny model."""
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    _mmlu_zip(tmp_path / "evaluation")
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml.safe_dump({
        "model_name_or_path": str(tiny_model_dir), "trust_remote_code": True, "finetuning_type": "lora",
        "task": "mmlu_test", "task_dir": str(tmp_path / "evaluation"), "template": "fewshot",
        "lang": "en", "n_shot": 1, "save_dir": str(tmp_path / "results"), "batch_size": 2}))
    assert main(["eval", str(cfg)]) == 0
    saved = json.loads((tmp_path / "results" / "benchmark_results.json").read_text())
    assert set(saved) == {"astronomy", "elementary_mathematics", "STEM", "average"}
    assert saved["STEM"] == saved["average"]  # every subject is STEM here
    assert "results written to" in capsys.readouterr().out

    # the same questions and shots through --benchmark give the same scores
    unpacked = next((tmp_path / "home" / "eval").iterdir()) / "data"
    assert main(["eval", f"model_name_or_path={tiny_model_dir}", "template=fewshot", "batch_size=2",
                 f"output_dir={tmp_path / 'direct'}", "--benchmark", str(unpacked / "test"),
                 "--dev", str(unpacked / "dev"), "--n_shot", "1"]) == 0
    direct = json.loads((tmp_path / "direct" / "benchmark_results.json").read_text())
    assert direct == {k: v for k, v in saved.items() if k != "STEM"}


# ---- mapping.json and archives that cannot be used (issue 13) ---------------------------------------
@pytest.mark.parametrize("content, match", [
    (b'{"astronomy": ', "mapping.json': malformed JSON at line 1"),
    (b'[{"astronomy": "STEM"}]', r"must hold a JSON object \{subject: .*not a list"),
    (b'{"astronomy": "STEM"}', "subject 'astronomy' must map to an object with name and category, not a string"),
    (b'{"astronomy": {"name": ["x"]}}', "'name' of subject 'astronomy' must be text, not a list"),
    (b'{"astronomy": {"category": 3}}', "'category' of subject 'astronomy' must be text, not a number"),
    ('{"astronomy": {"name": "天文学"}}'.encode("gbk"), "mapping.json' is not UTF-8 text .*GBK"),
])
def test_a_broken_mapping_is_one_line(tmp_path, content, match):
    root = tmp_path / "mmlu" / "test"
    root.mkdir(parents=True)
    (root / "astronomy_test.csv").write_text('"Red planet?",Venus,Mars,Io,Moon,B\n')
    (tmp_path / "mmlu" / "mapping.json").write_bytes(content)
    with pytest.raises(DataError, match=match) as exc:
        resolve_task("mmlu_test", tmp_path, tmp_path / "cache")
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("damage, match", [
    (lambda data: data[:-30], r"is truncated or damaged \(its zip directory is missing\)"),
    (lambda data: b"<html>rate limited</html>", "is not a zip file"),
])
def test_a_damaged_archive_leaves_the_cache_alone(tmp_path, damage, match):
    root = _mmlu_zip(tmp_path / "tasks")
    archive = root / "mmlu.zip"
    archive.write_bytes(damage(archive.read_bytes()))
    with pytest.raises(DataError, match=f"task archive '{archive}' {match}; download or copy it again"):
        resolve_task("mmlu_test", tmp_path / "tasks", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
