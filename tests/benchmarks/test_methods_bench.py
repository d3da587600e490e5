"""benchmarks/methods.py without timing anything: which methods run, where each one's settings
come from, and the table it prints."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("methods_bench", BENCH / "methods.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


bench = _load()


def test_every_registered_method_runs_and_lora_always():
    from tuneforge.adapter_methods import METHODS

    assert bench.method_names(None) == list(METHODS)
    assert bench.method_names("bottleneck,ia3") == ["lora", "ia3", "bottleneck"]
    with pytest.raises(SystemExit, match="unknown \\['ia4'\\]"):
        bench.method_names("ia4")


def test_lora_variant_examples_are_arms_of_their_own():
    arms = bench.variant_arms()
    assert {"lora:lora_dora", "lora:lora_distributed", "lora:lora_hierarchical"} <= set(arms)
    assert "lora:lora_adalora" not in arms and "lora:lora_ensemble" not in arms  # methods of their own
    assert bench.method_names("lora:lora_dora") == ["lora", "lora:lora_dora"]
    assert bench.method_names(None, variants=True)[-len(arms):] == arms
    dora, source = bench.method_settings("lora:lora_dora")
    assert source == "lora_dora.yaml" and dora["use_dora"] is True and dora["finetuning_type"] == "lora"
    ranks, _ = bench.method_settings("lora:lora_distributed")
    assert ranks.get("lora_rank_pattern") or ranks.get("lora_rank_schedule")


def test_settings_come_from_the_plainest_example_config():
    ia3, source = bench.method_settings("ia3")
    assert source == "ia3.yaml" and ia3 == {"finetuning_type": "ia3", "lora_target": "all", "learning_rate": 1e-2}
    lora, source = bench.method_settings("lora")  # lora has no lora.yaml: the example with fewest keys
    assert source == "demo_identity.yaml" and lora["learning_rate"] == 5e-4 and "use_dora" not in lora
    bn, source = bench.method_settings("bottleneck")
    assert source == "bottleneck.yaml" and bn["adapter_type"] == "houlsby"
    assert "dataset" not in bn and "output_dir" not in bn  # only the method's own keys and its learning rate
    assert bench.method_settings("nothing") == ({"finetuning_type": "nothing", "learning_rate": bench.DEFAULT_LR},
                                                "defaults")


def test_table_gives_ratios_to_lora_and_the_merged_base():
    common = dict(base_params=1000, eval_loss=1.5, latency_base=0.01)
    results = [
        dict(method="lora", trainable=10, step_s=2.0, peak_rss=100, latency=0.012, latency_merged=0.01,
             merges=True, **common),
        dict(method="bottleneck", trainable=50, step_s=3.0, peak_rss=150, latency=0.015, latency_merged=None,
             merges="a nonlinearity", **common),
        dict(method="broken", error="ValueError: no"),
    ]
    lines = bench.table(results).splitlines()
    assert lines[2] == "| lora | 10 (1.000%) | 1.00 | 1.00 | 1.5000 | 1.20 | 1.00 | yes |"
    assert lines[3] == "| bottleneck | 50 (5.000%) | 1.50 | 1.50 | 1.5000 | 1.50 | - | no: a nonlinearity |"
    assert lines[4].startswith("| broken | failed: ValueError: no")
