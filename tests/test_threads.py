"""The CPU thread count chooser and the OpenMP wait policy (tuneforge/threads.py, issue 21)."""

import pytest
import torch

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.threads import (SPIN_COUNT, FreeCores, cgroup_quota, choose_threads, cpu_busy_seconds,
                               follow_free_cores, prefer_short_spin, wait_policy)


def test_the_key_wins_over_the_environment_and_the_cores():
    assert choose_threads(3, env={"OMP_NUM_THREADS": "5"}, cores=8) == (3, "num_threads key")


@pytest.mark.parametrize("raw, count", [("5", 5), (" 2 ", 2), ("4,2", 4)])
def test_omp_num_threads_is_honoured(raw, count):
    assert choose_threads(None, env={"OMP_NUM_THREADS": raw}, cores=8, quota=None) == (count, "OMP_NUM_THREADS")


@pytest.mark.parametrize("raw", ["two", "0", "-1", "1.5"])
def test_a_bad_omp_num_threads_is_one_line(raw):
    with pytest.raises(ConfigError, match=f"OMP_NUM_THREADS='{raw}' must be a positive whole number"):
        choose_threads(None, env={"OMP_NUM_THREADS": raw}, cores=8)


def test_the_affinity_mask_and_the_cgroup_quota():
    assert choose_threads(None, env={}, cores=6, quota=None) == (6, "6 cores in this process's affinity mask")
    count, why = choose_threads(None, env={}, cores=16, quota=1.5)
    assert count == 2 and "quota of 1.5 cores" in why
    assert choose_threads(None, env={}, cores=2, quota=4.0)[0] == 2  # a quota above the mask: the mask
    assert choose_threads(None, env={}, cores=4, quota=0.2)[0] == 1


def test_cgroup_quota_files(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cgroup_quota(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(v2) is None
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(tmp_path / "v1") == 2.0
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_quota(tmp_path / "v1") is None
    assert cgroup_quota(tmp_path / "none") is None


def test_short_spin_only_where_the_user_set_none_and_torch_has_not_started():
    env = {}
    assert prefer_short_spin(env, torch_loaded=False)
    assert env["GOMP_SPINCOUNT"] == str(SPIN_COUNT) and env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert wait_policy(env) == f"spin {SPIN_COUNT} times, then sleep (set by tuneforge)"
    mine = {"OMP_WAIT_POLICY": "active"}
    assert not prefer_short_spin(mine, torch_loaded=False) and mine == {"OMP_WAIT_POLICY": "active"}
    assert wait_policy(mine) == "active (OMP_WAIT_POLICY)"
    counted = {"GOMP_SPINCOUNT": "10000"}
    assert not prefer_short_spin(counted, torch_loaded=False) and counted == {"GOMP_SPINCOUNT": "10000"}
    assert wait_policy(counted) == "spin 10000 times, then sleep (GOMP_SPINCOUNT)"
    late = {}
    assert not prefer_short_spin(late, torch_loaded=True) and late == {}
    assert wait_policy(late).startswith("OpenMP's default")
    assert wait_policy({"OMP_WAIT_POLICY": ""}) == wait_policy({})  # OpenMP ignores an empty or unknown value
    assert "OMP_WAIT_POLICY='bogus' is neither active nor passive" in wait_policy({"OMP_WAIT_POLICY": "bogus"})


def test_the_spin_count_reaches_torchs_openmp_runtime():
    """`import tuneforge` before torch: a fresh interpreter's GNU OpenMP spins SPIN_COUNT times (read
    back from libgomp's environment report, OMP_DISPLAY_ENV=verbose, printed when torch starts it)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["OMP_DISPLAY_ENV"] = "verbose"
    done = subprocess.run([sys.executable, "-c", "import tuneforge, torch; torch.ones(4) @ torch.ones(4)"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = done.stderr + done.stdout
    if "GOMP_SPINCOUNT" not in report:  # another OpenMP runtime (LLVM's libomp): it reads the policy
        assert "OMP_WAIT_POLICY" in report and "PASSIVE" in report.upper(), report[-2000:]
        return
    assert f"GOMP_SPINCOUNT = '{SPIN_COUNT}'" in report, report[-2000:]


def test_the_num_threads_key_takes_effect_in_a_run(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    from tuneforge.train import loop
    from tuneforge.workflows import train

    seen, step = [], loop.TrainingRun.train_step

    def observed(self):
        seen.append(torch.get_num_threads())
        return step(self)

    monkeypatch.setattr(loop.TrainingRun, "train_step", observed)
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    try:
        train(load_config(None, {
            "model_name_or_path": str(tiny_model_dir), "dataset": "arith", "dataset_dir": str(tiny_data_dir),
            "output_dir": str(tmp_path / "out"), "max_steps": 1, "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1, "cutoff_len": 32, "lora_rank": 2, "save_strategy": "no",
            "eval_strategy": "no", "disable_tqdm": True, "bf16": False, "num_threads": want}))
    finally:
        torch.set_num_threads(before)
    assert seen == [want]


def _run_config(tiny_model_dir, tiny_data_dir, out, **keys) -> dict:
    return {"model_name_or_path": str(tiny_model_dir), "dataset": "arith", "dataset_dir": str(tiny_data_dir),
            "output_dir": str(out), "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
            "cutoff_len": 32, "lora_rank": 2, "save_strategy": "no", "eval_strategy": "no",
            "disable_tqdm": True, "bf16": False, **keys}


def test_busy_seconds_are_read_per_cpu_of_the_affinity_mask(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 1000 10 0 0 5 0 0\n"
                    "cpu0 60 0 30 500 5 0 0 5 0 0\n"  # user nice system idle iowait irq softirq steal
                    "cpu1 40 7 20 500 5 2 3 0 0 0\n"
                    "\ncpu2 x y\n"  # malformed lines are skipped
                    "intr 12345\n")
    tick = __import__("os").sysconf("SC_CLK_TCK")
    assert cpu_busy_seconds({0}, stat, count_nice=False) == pytest.approx(95 / tick)  # steal (another VM) counts
    assert cpu_busy_seconds({0, 1, 2}, stat, count_nice=False) == pytest.approx((95 + 65) / tick)
    assert cpu_busy_seconds({0, 1}, stat, count_nice=True) == pytest.approx((95 + 72) / tick)  # we run niced
    assert cpu_busy_seconds({2}, stat) is None and cpu_busy_seconds({0}, tmp_path / "missing") is None


def test_free_cores_follow_other_processes_between_one_thread_and_the_starting_count():
    now = {"clock": 0.0, "busy": 0.0, "own": 0.0}
    applied, reads = [], []
    cores = FreeCores(2, cpus={0, 1}, busy=lambda cpus: reads.append(cpus) or now["busy"], clock=lambda: now["clock"],
                      own=lambda: now["own"], set_threads=applied.append)

    def step(seconds: float, ours: float, others: float):  # this process used `ours` CPU s, others `others` cores
        now["clock"] += seconds
        now["own"] += ours
        now["busy"] += ours + others * seconds
        return cores.update()

    assert step(2.0, 3.8, 0.2) is None and cores.current == 2  # an idle machine: both cores
    # a neighbour near half a core does not flip the count every window (hysteresis)
    assert [step(2.0, 3.0, o) for o in (0.45, 0.55, 0.45, 0.55)] == [None] * 4 and applied == []
    assert step(2.0, 2.0, 0.7) == 1 and applied == [1]  # a busy loop got 0.7 of a core
    assert step(2.0, 2.0, 1.0) is None and cores.current == 1  # it keeps its core
    assert [step(2.0, 1.0, o) for o in (0.45, 0.35)] == [None, None] and cores.current == 1
    read = len(reads)
    assert step(0.5, 0.5, 0.0) is None and len(reads) == read  # within the 1 s window: not even read
    assert step(0.6, 0.6, 0.0) == 2 and applied == [1, 2]  # it ended: back to 2, never above
    assert step(2.0, 0.5, 1.9) == 1 and step(2.0, 2.0, 5.0) is None  # never below 1
    cores.restore()
    assert applied[-1] == 2 and cores.current == 2


def test_free_cores_stay_off_where_the_count_is_fixed(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert follow_free_cores(num_threads=2) is None  # the key: exactly that many
        assert follow_free_cores(None, processes=2) is None  # ranks share the CPUs on purpose
        assert follow_free_cores(None) is not None  # /proc/stat is read here (Linux)
        torch.set_num_threads(1)
        assert follow_free_cores(None) is None  # nothing to lower
    finally:
        torch.set_num_threads(before)


def test_a_run_lowers_its_threads_while_others_are_busy_and_restores_them(tiny_model_dir, tiny_data_dir,
                                                                         tmp_path, monkeypatch):
    from tuneforge.train import loop
    from tuneforge.workflows import train

    seen, step = [], loop.TrainingRun.train_step

    def observed(self):
        seen.append(torch.get_num_threads())
        return step(self)

    now = {"t": 0.0}

    def clock():  # a second passes at each reading
        now["t"] += 1.0
        return now["t"]

    def busy(cpus):  # another process keeps one core busy: its busy time grows a second per second
        return now["t"]

    monkeypatch.setattr(loop.TrainingRun, "train_step", observed)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the run starts at 2 (a test worker's share may be 1)
    monkeypatch.setattr(loop, "follow_free_cores", lambda num_threads, processes: FreeCores(
        2, cpus={0, 1}, busy=busy, clock=clock, own=lambda: 0.0))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        train(load_config(None, _run_config(tiny_model_dir, tiny_data_dir, tmp_path / "out", max_steps=3)))
        assert torch.get_num_threads() == 2  # back as training started
    finally:
        torch.set_num_threads(before)
    assert seen == [2, 1, 1]
