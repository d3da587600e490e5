"""Per-layer LoRA ranks from YAML: Distributed LoRA and Hierarchical LoRA, written as peft's
`rank_pattern` / `alpha_pattern`, so the adapter is a plain peft LoRA file.

Three finetune keys, read with `finetuning_type: lora` (adapter_methods.METHOD_KEYS has their help):

- `lora_rank_pattern` (Distributed LoRA: layer i gets its own rank r_i, W_i + B_i A_i): a mapping
  whose keys are a layer index (`5`), an inclusive index range (`"0-7"`) or a regex matched against
  the end of the module name (peft's rule, e.g. `".*mlp.*"`, `"q_proj"`), and whose values are ranks.
- `lora_rank_schedule`: a depth ramp `"linear 4->16"` or `"cosine 4->16"`: layer i of L gets
  r_first + (r_last - r_first) * f(i / (L - 1)), f(t) = t (linear) or (1 - cos(pi t)) / 2 (cosine),
  rounded to the nearest integer (halves up); one layer gets r_first.
- `lora_rank_levels` (Hierarchical LoRA): `{embed: 4, attn: 8, mlp: 16, head: 4}`. Levels come from
  the model: `embed` is `get_input_embeddings()`, `head` is `get_output_embeddings()` (both are
  added to the adapted modules), `attn` every adapted module inside a layer whose path below the
  layer has a part containing "attn" or "attention" (self_attn, attn, attention, self_attention,
  SelfAttention), `mlp` every other adapted module inside a layer (mlp, feed_forward, BERT's
  intermediate / output). An attn / mlp value may be a rank, a depth ramp ("linear 8->16") or a
  mapping of layer indices / ranges to ranks.

"Layers" are the entries of the model's list of blocks: the first `nn.ModuleList` with
`config.num_hidden_layers` entries (else the longest one), e.g. `model.layers` (Llama), `transformer.h`
(GPT-2), `bert.encoder.layer`. A module's rank is the first that applies of: the `lora_rank_pattern`
entries in their order, the levels, the schedule, `lora_rank`. The ranks are resolved per adapted
module against the model and written as a compact exact `rank_pattern` (one regex per rank and set
of layers, e.g. `model\\.layers\\.(?:0|1)\\.(?:mlp\\.up_proj|mlp\\.down_proj)`; `r` stays `lora_rank`
for the modules nothing else covers). With `lora_alpha` empty every module gets alpha = 2 x its rank
(LLaMA-Factory's default, per module: `alpha_pattern` mirrors `rank_pattern`); a set `lora_alpha` is
kept for every module (peft's behaviour: scaling alpha / r_i).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from torch import nn

from tuneforge.errors import ConfigError

from .config import ALL_LINEAR, LoraConfig
from .targets import candidate_modules, minimal_suffixes, output_head_name, pattern_value, resolve_targets

log = logging.getLogger("tuneforge")

LEVELS = ("embed", "attn", "mlp", "head")
KEYS = ("lora_rank_pattern", "lora_rank_schedule", "lora_rank_levels")
_RANGE = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")
_SCHEDULE = re.compile(r"\s*(linear|cosine)\s+(\d+)\s*->\s*(\d+)\s*", re.IGNORECASE)
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)

# a rule gives the rank of an adapted module (name, layer index or None, level or None) or None
Rule = Callable[[str, "int | None", "str | None"], "int | None"]


def fit_ranks(finetune, model: nn.Module, cfg: LoraConfig) -> LoraConfig:
    """`cfg` (from the YAML's lora keys) with the per-module ranks that lora_rank_pattern,
    lora_rank_schedule and lora_rank_levels ask for on `model` written into rank_pattern (and
    alpha_pattern when lora_alpha is empty), and the embed / head levels' modules added to
    target_modules. Unchanged when none of the three keys is set. ConfigError (one line naming the
    key and entry) for an entry that is malformed or that the model cannot satisfy."""
    pattern = getattr(finetune, "lora_rank_pattern", None) or {}
    schedule = getattr(finetune, "lora_rank_schedule", None)
    levels = getattr(finetune, "lora_rank_levels", None) or {}
    if not (pattern or schedule or levels):
        return cfg
    for key, value in (("lora_rank_pattern", pattern), ("lora_rank_levels", levels)):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
    blocks = find_blocks(model)
    cfg = _with_level_targets(model, cfg, levels)
    targets = [name for name, _ in resolve_targets(model, cfg)]
    head, embed = output_head_name(model), _input_embeddings_name(model)
    where = {name: _place(name, blocks, head, embed) for name in targets}

    rules: list[tuple[str, Rule]] = []
    for entry, rank in pattern.items():
        rules.append((f"config key 'lora_rank_pattern': entry '{entry}'", _pattern_rule(entry, rank, blocks)))
    for level, value in levels.items():
        rules.append((f"config key 'lora_rank_levels': level '{level}'", _level_rule(level, value, blocks)))
    if schedule is not None:
        what = "config key 'lora_rank_schedule'"
        ramp = parse_schedule(what, schedule, _count(what, blocks))
        rules.append(("config key 'lora_rank_schedule'", lambda name, idx, level: None if idx is None else ramp[idx]))

    ranks: dict[str, int] = {}
    sets = [False] * len(rules)  # the rule gives some module its rank
    hidden_by: list[int | None] = [None] * len(rules)  # an earlier rule that took a module it matches
    for name in targets:
        idx, level = where[name]
        given = [rule(name, idx, level) for _, rule in rules]
        first = next((i for i, rank in enumerate(given) if rank is not None), None)
        ranks[name] = cfg.r if first is None else given[first]
        if first is not None:
            sets[first] = True
            for i in range(first + 1, len(rules)):
                if given[i] is not None and hidden_by[i] is None:
                    hidden_by[i] = first
    for i, (what, _) in enumerate(rules):
        if sets[i]:
            continue
        if hidden_by[i] is None:
            raise ConfigError(f"{what} matches no module that lora_target adapts (they look like "
                              f"'{targets[0]}'); fix the entry or widen lora_target")
        raise ConfigError(f"{what} sets no rank: every module it matches takes its rank from "
                          f"{rules[hidden_by[i]][0].removeprefix('config key ')} first (the first that applies "
                          "wins: lora_rank_pattern entries, then levels, then the schedule); drop or narrow one")
    rank_pattern = compact_pattern(ranks, cfg.r, blocks[0] if blocks else None)
    for name, rank in ranks.items():  # the file must say exactly this, by peft's rule
        if pattern_value(rank_pattern, name, cfg.r) != rank:
            raise AssertionError(f"rank_pattern {rank_pattern} gives {name} the wrong rank (want {rank})")
    alpha_pattern = {}
    if finetune.lora_alpha is None:  # LLaMA-Factory's alpha = 2 x rank, per module
        alpha_pattern = {key: 2 * rank for key, rank in rank_pattern.items()}
    counts = Counter(ranks.values())
    log.info("LoRA ranks per module: %s", ", ".join(f"r={r} x{counts[r]}" for r in sorted(counts)))
    return replace(cfg, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


def find_blocks(model: nn.Module) -> tuple[str, int] | None:
    """(path, length) of the model's list of layers: the first nn.ModuleList with
    config.num_hidden_layers entries, else the longest one; None when the model has none."""
    wanted = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(name, len(m)) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    for name, size in lists:
        if size == wanted:
            return name, size
    return max(lists, key=lambda item: item[1]) if lists else None


def parse_layers(what: str, entry, n_layers: int) -> range | None:
    """'5' / 5 / '0-7' -> the layer indices (range); None when `entry` is not an index or range.
    ConfigError (starting with `what`) for a range backwards or past the last layer."""
    m = _RANGE.fullmatch(str(entry))
    if m is None:
        return None
    first, last = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
    if last < first:
        raise ConfigError(f"{what} is a range from {first} down to {last}; write the smaller index first "
                          f"('{last}-{first}')")
    if last >= n_layers:
        raise ConfigError(f"{what} names layer {last}, but the model has {n_layers} layers (0-{n_layers - 1})")
    return range(first, last + 1)


def parse_schedule(what: str, text, n_layers: int) -> list[int]:
    """'linear 4->16' / 'cosine 4->16' -> the rank of each of `n_layers` layers (nearest integer,
    halves up). ConfigError (starting with `what`) for any other text."""
    m = _SCHEDULE.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise ConfigError(f"{what} must look like 'linear 4->16' or 'cosine 4->16' "
                          f"(first layer's rank -> last layer's rank), got {text!r}")
    shape, first, last = m.group(1).lower(), int(m.group(2)), int(m.group(3))
    if first < 1 or last < 1:
        raise ConfigError(f"{what}: the ranks must be positive integers, got {text!r}")
    ranks = []
    for i in range(n_layers):
        t = i / (n_layers - 1) if n_layers > 1 else 0.0
        f = t if shape == "linear" else (1 - math.cos(math.pi * t)) / 2
        ranks.append(math.floor(first + (last - first) * f + 0.5))
    return ranks


def compact_pattern(ranks: dict[str, int], default: int, blocks_path: str | None) -> dict[str, int]:
    """peft's rank_pattern giving each module of `ranks` its rank (modules at `default` need no key):
    per rank, one regex per set of layers (`<blocks>\\.(?:0|1)\\.(?:<suffix>|...)`) and the escaped
    full name of each module outside the layers. Keys never match another module of `ranks`."""
    out: dict[str, int] = {}
    per_layer: dict[int, set[str]] = {}  # layer index -> the paths below it of all modules in `ranks`
    for name in ranks:
        split = _in_block(name, blocks_path)
        if split is not None:
            per_layer.setdefault(split[0], set()).add(split[1])
    by_rank: dict[int, list[str]] = {}
    for name, rank in ranks.items():
        if rank != default:
            by_rank.setdefault(rank, []).append(name)
    for rank, names in by_rank.items():
        layers: dict[str, list[int]] = {}  # suffix below the layer -> its layer indices
        for name in names:
            split = _in_block(name, blocks_path)
            if split is None:
                out[re.escape(name)] = rank
            else:
                layers.setdefault(split[1], []).append(split[0])
        groups: dict[tuple[int, ...], list[str]] = {}  # layer indices -> suffixes with exactly those
        for suffix, indices in layers.items():
            groups.setdefault(tuple(sorted(indices)), []).append(suffix)
        for indices, suffixes in groups.items():
            whole = all(set(suffixes) == per_layer[i] for i in indices)  # every adapted module of the layers
            below = ".+" if whole else _suffixes(suffixes)
            out[rf"{re.escape(blocks_path)}\.{_alternatives(map(str, indices))}\.{below}"] = rank
    return out


def _alternatives(items) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else "(?:" + "|".join(items) + ")"


def _suffixes(suffixes: list[str]) -> str:
    """A regex for exactly these dotted paths: 'self_attn\\.(?:q_proj|v_proj)' when they share a parent."""
    parents = {s.rpartition(".")[0] for s in suffixes}
    if len(parents) == 1 and "" not in parents:
        parent = parents.pop()
        return rf"{re.escape(parent)}\.{_alternatives(re.escape(s.rpartition('.')[2]) for s in suffixes)}"
    return _alternatives(map(re.escape, suffixes))


def _in_block(name: str, blocks_path: str | None) -> tuple[int, str] | None:
    """(layer index, path below the layer) of a module inside the list of layers, else None."""
    if not blocks_path or not name.startswith(blocks_path + "."):
        return None
    index, _, below = name[len(blocks_path) + 1:].partition(".")
    return (int(index), below) if index.isdigit() and below else None


def _place(name: str, blocks, head: str | None, embed: str | None) -> tuple[int | None, str | None]:
    """(layer index or None, level or None) of an adapted module."""
    if name == embed:
        return None, "embed"
    if name == head:
        return None, "head"
    split = _in_block(name, blocks[0] if blocks else None)
    if split is None:
        return None, None
    index, below = split
    parents = below.split(".")[:-1] or below.split(".")
    return index, "attn" if any(_ATTENTION.search(part) for part in parents) else "mlp"


def _count(what: str, blocks) -> int:
    if blocks is None:
        raise ConfigError(f"{what} needs a model with a list of layers (an nn.ModuleList), and this one has "
                          "none; use a regex entry in lora_rank_pattern instead")
    return blocks[1]


def _rank(what: str, value) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{what}: the rank must be a positive integer, got {value!r}")
    return value


def _pattern_rule(entry, rank, blocks) -> Rule:
    what = f"config key 'lora_rank_pattern': entry '{entry}'"
    rank = _rank(what, rank)
    if _RANGE.fullmatch(str(entry)):
        layers = set(parse_layers(what, entry, _count(what, blocks)))
        return lambda name, idx, level: rank if idx in layers else None
    try:
        regex = re.compile(rf"(.*\.)?({entry})$")
    except re.error as e:
        raise ConfigError(f"{what} is neither a layer index, a range such as '0-7', nor a valid regex ({e})") from None
    return lambda name, idx, level: rank if regex.match(name) else None


def _level_rule(level: str, value, blocks) -> Rule:
    what = f"config key 'lora_rank_levels': level '{level}'"
    if level not in LEVELS:
        raise ConfigError(f"{what} is not one of {', '.join(LEVELS)}")
    if level in ("embed", "head"):
        rank = _rank(what, value)
        return lambda name, idx, lvl: rank if lvl == level else None
    if isinstance(value, str):
        ramp = parse_schedule(what, value, _count(what, blocks))
        return lambda name, idx, lvl: ramp[idx] if lvl == level else None
    if isinstance(value, dict):
        per_layer: dict[int, int] = {}
        for entry, rank in value.items():
            sub = f"{what}: entry '{entry}'"
            layers = parse_layers(sub, entry, _count(what, blocks))
            if layers is None:
                raise ConfigError(f"{sub} must be a layer index or a range such as '0-7'")
            rank = _rank(sub, rank)
            for i in layers:
                per_layer.setdefault(i, rank)  # the first entry naming a layer wins
        return lambda name, idx, lvl: per_layer.get(idx) if lvl == level else None
    rank = _rank(what, value)
    return lambda name, idx, lvl: rank if lvl == level else None


def _input_embeddings_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    return next((name for name, m in model.named_modules() if emb is not None and m is emb), None)


def _with_level_targets(model: nn.Module, cfg: LoraConfig, levels: dict) -> LoraConfig:
    """`cfg` whose target_modules also hold the modules of the embed / head levels ('all-linear'
    written out as names, since it never covers them)."""
    extra = []
    for level, find in (("embed", _input_embeddings_name), ("head", output_head_name)):
        if level not in levels:
            continue
        name = find(model)
        what = f"config key 'lora_rank_levels': level '{level}'"
        if name is None:
            raise ConfigError(f"{what}: this model has no {'input embeddings' if level == 'embed' else 'output head'}"
                              f" (get_{'input' if level == 'embed' else 'output'}_embeddings()); drop the level")
        if cfg.modules_to_save and any(name == m or name.endswith("." + m) for m in cfg.modules_to_save):
            raise ConfigError(f"{what}: '{name}' is in additional_target (trained in full); drop it there or "
                              "drop the level")
        extra.append(name)
    if not extra:
        return cfg
    if cfg.target_modules == ALL_LINEAR:
        chosen = [name for name, _ in resolve_targets(model, cfg)] + extra
        all_names = [name for name, _ in candidate_modules(model)]
        return replace(cfg, target_modules=minimal_suffixes(chosen, all_names))
    targets = list(cfg.target_modules)
    return replace(cfg, target_modules=targets + [n for n in extra if n not in targets])
