"""The CPU thread count chooser and the OpenMP wait policy (tuneforge/threads.py, issue 21)."""

import pytest
import torch

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.threads import cgroup_quota, choose_threads, prefer_passive_wait, wait_policy


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


def test_passive_wait_only_where_the_user_set_none_and_torch_has_not_started():
    env = {}
    assert prefer_passive_wait(env, torch_loaded=False) and env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert wait_policy(env) == "passive (set by tuneforge)"
    mine = {"OMP_WAIT_POLICY": "active"}
    assert not prefer_passive_wait(mine, torch_loaded=False) and mine == {"OMP_WAIT_POLICY": "active"}
    assert wait_policy(mine) == "active (OMP_WAIT_POLICY)"
    counted = {"GOMP_SPINCOUNT": "10000"}
    assert not prefer_passive_wait(counted, torch_loaded=False) and "OMP_WAIT_POLICY" not in counted
    assert wait_policy(counted).startswith("spin 10000 times")
    late = {}
    assert not prefer_passive_wait(late, torch_loaded=True) and late == {}
    assert wait_policy(late).startswith("OpenMP's default")


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
