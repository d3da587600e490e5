"""LLaMA-Factory's `mix_strategy` and `interleave_probs`: how several datasets in `dataset:` (and
in `eval_dataset:`) become one.

- `concat` (default): one after the other (tuneforge then shuffles the training examples).
- `interleave_under` / `interleave_over` / `interleave_once`: HF `datasets.interleave_datasets`
  with stopping_strategy `first_exhausted` / `all_exhausted` / `all_exhausted_without_replacement`,
  `probabilities` from `interleave_probs` (comma-separated, one per dataset, summing to 1; unset:
  the datasets in turn) and the run's `seed`, as LLaMA-Factory's data_utils.merge_dataset does.
  `first_exhausted` stops when one dataset runs out (undersampling the others), `all_exhausted`
  when every dataset has been seen whole (repeating the smaller ones).

The records (converted, not yet tokenized) are mixed, as LLaMA-Factory mixes its aligned
datasets before tokenizing; with `multitask: true` each dataset is tokenized alone, so its
examples are mixed. `streaming: true` mixes the streams the same way (IterableDataset).
"""

from __future__ import annotations

import math

from tuneforge.errors import ConfigError

STOPPING = {"interleave_under": "first_exhausted", "interleave_over": "all_exhausted",
            "interleave_once": "all_exhausted_without_replacement"}
STRATEGIES = ("concat", *STOPPING)


def strategy(data_args) -> str:
    return getattr(data_args, "mix_strategy", None) or "concat"


def probabilities(data_args, names: list[str], key: str = "dataset") -> list[float] | None:
    """interleave_probs as numbers, checked against the datasets named in `key`; None when unset.
    Raises ConfigError (one line) for probs with concat, a wrong count, a value that is not a
    number in [0, 1], or a sum other than 1."""
    text = getattr(data_args, "interleave_probs", None)
    if text is None or str(text).strip() == "":
        return None
    if strategy(data_args) == "concat":
        raise ConfigError("config key 'interleave_probs' is for interleaved mixing; set mix_strategy: "
                          "interleave_under (or interleave_over) too, or drop interleave_probs")
    parts = [p.strip() for p in (text if isinstance(text, (list, tuple)) else str(text).split(","))]
    try:
        probs = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise ConfigError(f"config key 'interleave_probs' must be comma-separated numbers, one per dataset "
                          f"(e.g. 0.7,0.3); got {text!r}") from None
    if len(probs) != len(names):
        raise ConfigError(f"config key 'interleave_probs' gives {len(probs)} probabilities for the "
                          f"{len(names)} datasets in {key}: ({','.join(names)}); give one per dataset")
    if any(not 0 <= p <= 1 for p in probs) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
        raise ConfigError(f"config key 'interleave_probs' must be numbers in [0, 1] that sum to 1 (the chance "
                          f"of drawing from each dataset); got {text!r} (sum {sum(probs):g})")
    if 0 in probs and strategy(data_args) != "interleave_under":
        raise ConfigError(f"config key 'interleave_probs' gives a dataset probability 0 ({text!r}), and "
                          f"mix_strategy: {strategy(data_args)} reads every dataset whole, so it would never end; "
                          "give each dataset a positive probability, or remove the dataset")
    return probs


def check(data_args) -> None:
    """The mixing keys against dataset: and eval_dataset: (ConfigError, one line)."""
    for key in ("dataset", "eval_dataset"):
        names = _names(getattr(data_args, key, None))
        if names:
            probabilities(data_args, names, key)


def mix(parts: list[list], data_args, seed: int, key: str = "dataset", names: list[str] | None = None) -> list:
    """One list from one list per dataset (any items), by mix_strategy: concatenated, or the
    items in the order datasets.interleave_datasets draws them (seeded by `seed`)."""
    chosen = strategy(data_args)
    probs = probabilities(data_args, names if names is not None else [str(i) for i in range(len(parts))], key)
    if len(parts) == 1 or chosen == "concat":
        return [item for part in parts for item in part]
    from datasets import Dataset, interleave_datasets

    tables = [Dataset.from_dict({"part": [k] * len(part), "index": list(range(len(part)))})
              for k, part in enumerate(parts)]
    mixed = interleave_datasets(tables, probabilities=probs, seed=seed, stopping_strategy=STOPPING[chosen])
    return [parts[k][i] for k, i in zip(mixed["part"], mixed["index"])]


def mix_streams(streams: list, data_args, seed: int, names: list[str]):
    """The IterableDatasets of several datasets as one, by mix_strategy (streaming: true)."""
    from datasets import concatenate_datasets, interleave_datasets

    if len(streams) == 1:
        return streams[0]
    if strategy(data_args) == "concat":
        return concatenate_datasets(streams)
    return interleave_datasets(streams, probabilities=probabilities(data_args, names), seed=seed,
                               stopping_strategy=STOPPING[strategy(data_args)])


def _names(value) -> list[str]:
    if isinstance(value, (list, tuple)):
        value = ",".join(value)
    return [name.strip() for name in str(value or "").split(",") if name.strip()]
