"""`tuneforge.train` / `tuneforge.export` are functions of the public API and also the names of
packages; importing a module of those packages must not take the functions away."""

from __future__ import annotations

import json



def test_train_and_export_stay_callable_after_their_packages_are_imported(tiny_model_dir, tiny_data_dir,
                                                                         tmp_path):
    import tuneforge.export.gguf  # noqa: F401 - these imports set the package attributes
    from tuneforge.train.reward import load_reward_model  # noqa: F401

    keys = {"model_name_or_path": str(tiny_model_dir), "dataset": "arith", "dataset_dir": str(tiny_data_dir),
            "cutoff_len": 32, "max_steps": 1, "disable_tqdm": True, "bf16": False}
    for run in ("a", "b"):  # twice in one process
        metrics = tuneforge.train({**keys, "output_dir": str(tmp_path / run)})
        assert metrics == json.loads((tmp_path / run / "train_results.json").read_text())
        assert (tmp_path / run / "adapter_config.json").exists()
    path = tuneforge.export({"model_name_or_path": str(tiny_model_dir), "adapter_name_or_path": str(tmp_path / "a"),
                             "export_dir": str(tmp_path / "merged")})
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "llama"
    assert str(path).endswith("merged")
