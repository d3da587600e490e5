"""Output folders refused before any model is loaded: the rule training shares with export
(`fileio.check_outside`: never the folder of something read, nor inside it, symlinks resolved),
and eval's output_dir / save_dir (V14: a file there used to be found only after the whole
benchmark had run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneforge.cli import main
from tuneforge.errors import CheckpointError
from tuneforge.fileio import check_outside

REPO = Path(__file__).resolve().parents[2]


def test_check_outside_refuses_the_folder_read_and_anything_inside_it(tmp_path):
    model, adapter = tmp_path / "model", tmp_path / "ad"
    model.mkdir()
    adapter.mkdir()
    (tmp_path / "alias").symlink_to(model)
    sources = [("model_name_or_path", model), ("adapter_name_or_path", adapter)]
    cases = {
        model: "is the folder of model_name_or_path, which training reads; choose another folder",
        tmp_path / "alias": "is the folder of model_name_or_path",
        tmp_path / "alias" / "new" / "deeper": "lies inside the folder of model_name_or_path, "
                                                "which training reads; choose a folder outside it",
        tmp_path / "x" / ".." / "ad": "is the folder of adapter_name_or_path",
        adapter / "run": "lies inside the folder of adapter_name_or_path",
    }
    for out, words in cases.items():
        with pytest.raises(CheckpointError) as err:
            check_outside(out, "output_dir", sources, "training", CheckpointError)
        assert str(err.value).startswith(f"output_dir '{out}' {words}")
    for out in (tmp_path / "run", tmp_path / "model-2", tmp_path, tmp_path.parent / "elsewhere"):
        check_outside(out, "output_dir", sources, "training")  # beside or above: fine


@pytest.fixture
def no_model(monkeypatch):
    import tuneforge.infer

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(tuneforge.infer, "ChatModel", refuse)


def _refused(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.splitlines()
    errors = [line for line in err if line.startswith("tuneforge: error: ")]
    assert code == 2 and len(errors) == 1 and not any("Traceback" in x for x in err), err
    return errors[0].removeprefix("tuneforge: error: ")


@pytest.mark.parametrize("key, place, words", [
    ("output_dir", "notes", "output_dir '{path}' is a file, not a folder; choose a folder path"),
    ("save_dir", "notes", "save_dir '{path}' is a file, not a folder; choose a folder path"),
    ("output_dir", "notes/results", "output_dir '{path}' lies under '{notes}', which is a file; "
                                    "choose a folder path"),
])
def test_a_benchmark_checks_its_output_folder_before_the_model_loads(
        tmp_path, tiny_model_dir, capsys, no_model, key, place, words):
    (tmp_path / "notes").write_text("mine")
    path = tmp_path / place
    line = _refused(capsys, ["eval", f"model_name_or_path={tiny_model_dir}", f"{key}={path}",
                             "--benchmark", str(REPO / "examples" / "mc_demo.json")])
    assert line == words.format(path=path, notes=tmp_path / "notes")
    assert (tmp_path / "notes").read_text() == "mine"


def test_eval_checks_its_output_dir_before_the_model_loads(tmp_path, tiny_model_dir,
                                                           tiny_data_dir, capsys, no_model):
    (tmp_path / "notes").write_text("mine")
    line = _refused(capsys, ["eval", f"model_name_or_path={tiny_model_dir}", "dataset=arith",
                             f"dataset_dir={tiny_data_dir}", "val_size=2", "do_predict=true",
                             f"output_dir={tmp_path / 'notes'}"])
    assert line == f"output_dir '{tmp_path / 'notes'}' is a file, not a folder; choose a folder path"


def test_the_folders_training_reads(tmp_path, monkeypatch):
    from tuneforge.config import load_config
    from tuneforge.workflows import _read_folders

    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "m").mkdir()
    cfg = load_config(None, {"model_name_or_path": str(tmp_path / "m"),
                             "adapter_name_or_path": "a1, a2", "output_dir": "out"})
    assert _read_folders(cfg) == [("model_name_or_path", tmp_path / "m"),
                                  ("adapter_name_or_path", Path("a1")),
                                  ("adapter_name_or_path", Path("a2"))]
    # a .gguf file is no folder: a run beside it (in its folder) is fine
    cfg = load_config(None, {"model_name_or_path": str(tmp_path / "model.gguf"), "output_dir": "out"})
    assert _read_folders(cfg) == []
    # the default model: its place in the cache, found without converting it
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    cfg = load_config(None, {"output_dir": "out"})
    assert _read_folders(cfg) == [("model_name_or_path",
                                   tmp_path / "home" / "models" / "SmolLM2-135M-Instruct")]
    assert not (tmp_path / "home").exists()
