"""export_dir: a previous tuneforge export is replaced whole and atomically; nothing else is ever
written over; a failure while writing (full disk, interrupt) leaves the previous export (or
nothing) and no temporary folder. The refusals themselves are in tests/bad_inputs/export/."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys

import pytest

from tuneforge.cli import main
from tuneforge.errors import ConfigError
from tuneforge.export.target import MANIFEST


def _snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _run(capsys, *argv):
    import logging

    code = main(["export", *argv])
    logging.getLogger().handlers.clear()
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("tuneforge: error:")], err


def _args(model, out, *extra):
    return [f"model_name_or_path={model}", f"export_dir={out}", *extra]


def test_a_previous_export_is_replaced_whole_and_its_manifest_lists_every_file(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    assert _run(capsys, *_args(tiny_model_dir, out, "export_size=0.00005"))[0] == 0  # sharded
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {MANIFEST}
    assert len([n for n in manifest["files"] if n.startswith("model-")]) > 3
    assert all("sha256" in r for n, r in manifest["files"].items() if n.endswith(".json"))

    # again, unsharded and as GGUF: the old shards and index go, only the new files are there
    assert _run(capsys, *_args(tiny_model_dir, out))[0] == 0
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and not any(n.startswith("model-") for n in names)
    modelfile = (out / "Modelfile").read_text()  # as LLaMA-Factory's HF export: `ollama create` imports the folder
    assert modelfile.startswith("FROM .\n") and "TEMPLATE " in modelfile and "PARAMETER stop" in modelfile
    assert _run(capsys, *_args(tiny_model_dir, out, "export_format=gguf"))[0] == 0
    assert {p.name for p in out.iterdir()} == {"merged.f16.gguf", "Modelfile", MANIFEST}
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no staging folder left


def test_export_dir_through_a_symlink_replaces_the_folder_it_points_to(tiny_model_dir, tmp_path, capsys):
    real = tmp_path / "exports" / "v1"
    real.parent.mkdir()
    link = tmp_path / "current"
    link.symlink_to(real, target_is_directory=False)
    assert _run(capsys, *_args(tiny_model_dir, link))[0] == 0
    assert link.is_symlink() and (real / MANIFEST).is_file()
    assert _run(capsys, *_args(tiny_model_dir, link, "export_dtype=bfloat16"))[0] == 0
    assert link.is_symlink() and json.loads((real / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_symlink_into_the_adapter_folder_is_refused(tiny_model_dir, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (tmp_path / "out").symlink_to(adapter / "sub")
    code, errors, _ = _run(capsys, *_args(tiny_model_dir, tmp_path / "out"), f"adapter_name_or_path={adapter}")
    assert code == 2 and errors == [
        f"tuneforge: error: export_dir '{tmp_path / 'out'}' lies inside the folder of adapter_name_or_path, "
        "which the export reads; choose a folder outside it"]
    assert [p.name for p in adapter.iterdir()] == ["adapter_config.json"]


def _disk_full_in_safetensors(monkeypatch):
    """transformers' safetensors writer fails as on a full disk, after writing part of the file."""
    import transformers.modeling_utils as mu
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 4096)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(mu, "safe_save_file", full)


def _disk_full_in_gguf(monkeypatch):
    import gguf

    def full(self, *args, **kwargs):
        path = self.path
        with open(path, "ab") as f:
            f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_a_full_disk_keeps_the_previous_export_and_leaves_no_temporary_files(
        tiny_model_dir, tmp_path, capsys, monkeypatch, fmt):
    out = tmp_path / "merged"
    assert _run(capsys, *_args(tiny_model_dir, out, f"export_format={fmt}"))[0] == 0
    before = _snapshot(tmp_path)
    (_disk_full_in_safetensors if fmt == "hf" else _disk_full_in_gguf)(monkeypatch)
    code, errors, err = _run(capsys, *_args(tiny_model_dir, out, f"export_format={fmt}"))
    shown = "" if fmt == "hf" else f" '{out / 'merged.f16.gguf'}'"
    assert code == 2 and "Traceback" not in err
    assert errors == [f"tuneforge: error: writing export_dir '{out}' failed (the previous export is kept): "
                      f"the disk is full{': could not write' + shown if shown else ''}; "
                      "free some space and run again"]
    assert _snapshot(tmp_path) == before

    # into a new folder under new parents: nothing at all is left
    code, errors, _ = _run(capsys, *_args(tiny_model_dir, tmp_path / "a" / "b" / "new", f"export_format={fmt}"))
    assert code == 2 and "(nothing was written)" in errors[0]
    assert _snapshot(tmp_path) == before


def test_a_real_write_error_in_a_subprocess_keeps_the_previous_export(tiny_model_dir, tmp_path):
    """The file-size limit makes the OS refuse the write (EFBIG), as a full disk would: the
    failure comes from the kernel, through safetensors' Rust writer, not from a test double."""
    out = tmp_path / "merged"
    cmd = [sys.executable, "-m", "tuneforge", "export", *_args(tiny_model_dir, out)]
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    before = _snapshot(tmp_path)
    limit = "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))"
    wrapped = [sys.executable, "-c", f"{limit}; import sys, runpy; sys.argv = {cmd[2:]!r}; "
               "runpy.run_module('tuneforge', run_name='__main__')"]
    done = subprocess.run(wrapped, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"tuneforge: error: writing export_dir '{out}' failed (the previous export is kept): "
        "could not write: File too large")
    assert _snapshot(tmp_path) == before


def test_a_file_added_while_exporting_stops_the_replacement(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import tuneforge.export.target as target

    out = tmp_path / "merged"
    assert _run(capsys, *_args(tiny_model_dir, out))[0] == 0
    original = target._readable_like_new_files

    def user_writes_meanwhile(folder):
        (out / "notes.txt").write_text("mine")
        original(folder)

    monkeypatch.setattr(target, "_readable_like_new_files", user_writes_meanwhile)
    before_files = {p.name for p in out.iterdir()}
    code, errors, _ = _run(capsys, *_args(tiny_model_dir, out))
    assert code == 2 and "notes.txt" in errors[0] and "did not write" in errors[0]
    assert {p.name for p in out.iterdir()} == before_files | {"notes.txt"}
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_too_little_free_space_is_refused_before_merging(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    from tuneforge.workflows import export
    from tuneforge.config import load_config
    import tuneforge.export.merge as merge

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    monkeypatch.setattr(merge.adapters, "unload", lambda *a, **k: pytest.fail("merged before refusing"))
    cfg = load_config(None, {"model_name_or_path": str(tiny_model_dir), "export_dir": str(tmp_path / "out"),
                             "export_dtype": "float32"})
    with pytest.raises(ConfigError, match=r"needs about [0-9.]+ MB and its disk has 1000 bytes free"):
        export(cfg)
    assert list(tmp_path.iterdir()) == []


def test_a_staging_folder_left_by_a_killed_export_is_removed(tiny_model_dir, tmp_path, capsys):
    import tuneforge.export.target as target

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)
    out = tmp_path / "merged"
    leftover = tmp_path / f".merged.tuneforge-staging-{target._host()}-{pid}-abc123"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    running = tmp_path / f".merged.tuneforge-staging-{target._host()}-{os.getpid()}-xyz"
    running.mkdir()  # an export still at work (this process): left alone
    assert _run(capsys, *_args(tiny_model_dir, out))[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["merged", running.name])
