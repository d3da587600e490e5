"""Ctrl-C and SIGTERM in the middle of a run: the current optimizer step finishes, a checkpoint
is saved at that step boundary, one line says how to resume, the exit code is 130 / 143, and
the same command run again ends equal to an uninterrupted run. A second signal stops at once."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file

from tests.conftest import arithmetic_records, write_dataset
from tuneforge.cli import main
from tuneforge.train.stop import StopSignals

STEPS = 12
ADAPTER = "adapter_model.safetensors"


def write_config(path, model_dir, data_dir, out):
    path.write_text(yaml.safe_dump({
        "model_name_or_path": str(model_dir), "dataset": "arith", "dataset_dir": str(data_dir),
        "output_dir": str(out), "cutoff_len": 64, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2, "learning_rate": 3e-3, "max_steps": STEPS,
        "save_steps": 1000, "logging_steps": 1, "lora_rank": 4, "lora_dropout": 0.1,
        "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "disable_tqdm": True, "bf16": False,
    }))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """The uninterrupted run (in this process: only the interrupted ones need their own)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    data = write_dataset(root / "data", "arith", arithmetic_records(48))
    assert main(["train", str(write_config(root / "cfg.yaml", tiny_model_dir, data,
                                           root / "run"))]) == 0
    return root


def logged_steps(out) -> int:
    try:
        lines = (out / "trainer_log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if line.endswith("}") and '"loss"' in line)


def start_and_wait_for_steps(args, out, steps=3) -> subprocess.Popen:
    """Start `tuneforge train ARGS` in a child process; return it once `steps` steps are logged."""
    victim = subprocess.Popen([sys.executable, "-m", "tuneforge", "train", *args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while logged_steps(out) < steps:
        assert victim.poll() is None, f"run ended before the signal: {victim.stderr.read()}"
        assert time.time() < deadline
        time.sleep(0.01)
    return victim


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_at_the_step_boundary_and_the_rerun_ends_equal(reference, tmp_path,
                                                                      tiny_model_dir, sig, code,
                                                                      capsys):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, reference / "data", out)
    victim = start_and_wait_for_steps([str(cfg)], out)
    victim.send_signal(sig)
    assert victim.wait() == code
    stderr = victim.stderr.read().splitlines()
    assert not any("Traceback" in line or "error" in line for line in stderr), stderr
    (saved,) = [p.name for p in out.glob("checkpoint-*")]
    step = int(saved.split("-")[1])
    assert 3 <= step < STEPS and not (out / ADAPTER).exists()
    state = json.loads((out / saved / "trainer_state.json").read_text())
    assert state["global_step"] == step and state["micro_batches_seen"] == 2 * step
    assert stderr[-1] == (f"[tuneforge] stopped by {sig.name}; saved {out / saved}; to resume, "
                          f"run the same command again: tuneforge train {cfg}")

    capsys.readouterr()
    assert main(["train", str(cfg)]) == 0  # the same command, run again
    assert f"resumed from {out / saved} at step {step}" in capsys.readouterr().out
    want, got = load_file(str(reference / "run" / ADAPTER)), load_file(str(out / ADAPTER))
    assert want.keys() == got.keys()
    assert max((want[k] - got[k]).abs().max().item() for k in want) <= 1e-6
    assert not [p.name for p in out.iterdir() if p.name.startswith((".tmp", ".trash"))]


def test_the_first_signal_asks_the_second_stops_at_once():
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in a background job
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)  # a real signal, to this (main) thread
        for _ in range(100):  # Python runs the handler between bytecodes
            if signals.received is not None:
                break
        assert signals.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):
                pass
    assert signal.getsignal(signal.SIGINT) is before
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):
            if signals.received is not None:
                break
        with pytest.raises(SystemExit) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):
                pass
        assert stopped.value.code == 143


def test_a_launcher_sigterm_promises_no_checkpoint_it_cannot_write(caplog):
    """Under torchrun a SIGTERM usually means the launcher is stopping every process because one
    failed: the line says so (a checkpoint only if every process gets to the step's end), and when
    a collective then fails, the run stops (exit 143) with one line naming the last complete
    checkpoint instead of gloo's traceback. No signal, or one process: the error passes as it is."""
    gloo = "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242"
    for last, kept in (("out/checkpoint-5", "the last complete checkpoint is out/checkpoint-5; to resume, run "
                                            "the same command again"),
                       (None, "no checkpoint was saved yet: the same command starts over")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tuneforge"), pytest.raises(SystemExit) as stopped:
            with StopSignals(processes=2) as signals, signals.peers_gone(lambda: last):
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(100):
                    if signals.received is not None:
                        break
                raise RuntimeError(gloo)
        assert stopped.value.code == 143
        asked, stopped_line = [r.getMessage() for r in caplog.records]
        assert asked.startswith("SIGTERM: the launcher is stopping the run") and "only if every process" in asked
        assert stopped_line == (f"stopped by SIGTERM: another process is gone (RuntimeError: {gloo}), so this "
                                f"step's checkpoint cannot be saved; {kept}")
    with pytest.raises(RuntimeError, match="no signal"), StopSignals(processes=2) as signals, \
            signals.peers_gone(lambda: None):
        raise RuntimeError("no signal")
    with pytest.raises(RuntimeError, match="one process"), StopSignals() as signals, signals.peers_gone(lambda: None):
        signals.received = signal.SIGTERM
        raise RuntimeError("one process")


def test_with_overwrite_output_dir_the_advice_keeps_the_checkpoint(reference, tmp_path, tiny_model_dir,
                                                                   capsys):
    """overwrite_output_dir: true would start over and delete the saved checkpoint: the line says
    to run the command with overwrite_output_dir=false, and that command resumes from it."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, reference / "data", out)
    victim = start_and_wait_for_steps([str(cfg), "overwrite_output_dir=true"], out)
    victim.send_signal(signal.SIGTERM)
    assert victim.wait() == 143
    (saved,) = [p.name for p in out.glob("checkpoint-*")]
    last = victim.stderr.read().splitlines()[-1]
    assert last == (f"[tuneforge] stopped by SIGTERM; saved {out / saved}; to resume, run the same "
                    "command with overwrite_output_dir=false (with true it starts over and deletes "
                    f"the checkpoints): tuneforge train {cfg} overwrite_output_dir=true "
                    "overwrite_output_dir=false")
    capsys.readouterr()
    assert main(last.split(": tuneforge ")[-1].split()) == 0  # the command the line gives
    assert f"resumed from {out / saved}" in capsys.readouterr().out


def test_a_diverged_run_with_overwrite_output_dir_is_told_how_to_continue():
    from tuneforge.errors import TrainingDiverged
    from tuneforge.train.stop import check_finite

    with pytest.raises(TrainingDiverged) as info:
        check_finite("loss", float("nan"), 7, 1e6, "out/checkpoint-5", overwrite=True)
    assert str(info.value).endswith("or run again with overwrite_output_dir=false to continue from "
                                    "that checkpoint at the lower rate")
    with pytest.raises(TrainingDiverged) as info:
        check_finite("loss", float("nan"), 7, 1e6, "out/checkpoint-5")
    assert str(info.value).endswith("or run again to continue from that checkpoint at the lower rate")
