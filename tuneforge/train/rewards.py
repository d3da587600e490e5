"""Reward functions for stage: grpo (`reward_funcs`), called as TRL calls them:
`f(prompts, completions, **columns) -> list[float]`, one reward per completion, where prompts and
completions are texts (the prompt as the chat template renders it, the completion decoded
without special tokens) and columns holds per-completion lists: `reference`, the record's own
last reply (the SFT data's answer), and `completion_ids` (token id lists). A function may
return None for a completion it does not judge (counted as 0).

Built-ins (a name, or name=argument):
- exact_match: 1.0 when the completion equals the reference reply (both stripped), else 0.0.
- length: brevity, 1 / (1 + tokens in the completion, EOS included): shorter completions score
  higher. Counted in tokens, not words, so that it cannot be raised by writing fewer spaces.
- ends_with=WORD: 1.0 when the completion's last word is WORD (case-insensitive, trailing
  punctuation and quotes ignored), else 0.0.
- token_share=ID: the share of the completion's tokens equal to token id ID (a toy task).
Anything else is `module:function`, imported from sys.path (the working folder first)."""

from __future__ import annotations

import importlib
import os
import string
import sys
from collections.abc import Callable

from ..errors import ConfigError

BUILT_INS = ("exact_match", "length", "ends_with=WORD", "token_share=ID")
_PUNCTUATION = string.punctuation + "\u201c\u201d\u2019\u2018\u3002\uff01\uff1f"


def exact_match(prompts, completions, reference, **_) -> list[float]:
    return [float(c.strip() == r.strip()) for c, r in zip(completions, reference)]


def length(prompts, completions, completion_ids, **_) -> list[float]:
    return [1.0 / (1 + len(ids)) for ids in completion_ids]


def last_word(text: str) -> str:
    words = text.strip().split()
    return words[-1].strip(_PUNCTUATION).lower() if words else ""


def ends_with(word: str) -> Callable:
    wanted = word.strip(_PUNCTUATION).lower()

    def reward(prompts, completions, **_) -> list[float]:
        return [float(last_word(c) == wanted) for c in completions]
    reward.__name__ = f"ends_with={word}"
    return reward


def token_share(token_id: int) -> Callable:
    def reward(prompts, completions, completion_ids, **_) -> list[float]:
        return [sum(t == token_id for t in ids) / max(len(ids), 1) for ids in completion_ids]
    reward.__name__ = f"token_share={token_id}"
    return reward


def _refuse(name: str, why: str) -> ConfigError:
    return ConfigError(f"config key 'reward_funcs' names {name!r}, {why}; use a built-in "
                       f"({', '.join(BUILT_INS)}) or module:function")


def load_reward(name: str) -> Callable:
    """The reward function `name` names (see the module's docstring). Raises ConfigError."""
    name = name.strip()
    head, _, argument = name.partition("=")
    if head == "exact_match" and not argument:
        return exact_match
    if head == "length" and not argument:
        return length
    if head == "ends_with":
        if not argument.strip(_PUNCTUATION + " "):
            raise _refuse(name, "with no word after '='")
        return ends_with(argument.strip())
    if head == "token_share":
        if not argument.strip().isdigit():
            raise _refuse(name, "whose argument is not a token id")
        return token_share(int(argument))
    module_name, colon, function_name = name.partition(":")
    if not colon or not module_name or not function_name:
        raise _refuse(name, "which is no built-in and not module:function")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise _refuse(name, f"but module {module_name!r} cannot be imported ({e})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise _refuse(name, f"but module {module_name!r} has no function {function_name!r}")
    return function


def parse_list(value, what: str) -> list[str]:
    """A YAML list or a comma-separated string -> its items."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    out = [str(v).strip() for v in items if str(v).strip()]
    if not out and what == "reward_funcs":
        raise ConfigError("config key 'reward_funcs' is empty; name one or more reward functions, e.g. "
                          "exact_match")
    return out


class Rewards:
    """The configured reward functions and their weights: `score(...)` -> (per-completion
    weighted sum, {function name: per-completion rewards})."""

    def __init__(self, names, weights=None):
        self.names = parse_list(names, "reward_funcs")
        self.functions = [load_reward(n) for n in self.names]
        given = parse_list(weights, "reward_weights")
        if not given:
            self.weights = [1.0] * len(self.functions)
        else:
            try:
                self.weights = [float(w) for w in given]
            except ValueError:
                raise ConfigError(f"config key 'reward_weights' must hold numbers; got {weights!r}") from None
            if len(self.weights) != len(self.functions):
                raise ConfigError(f"config key 'reward_weights' has {len(self.weights)} weights for "
                                  f"{len(self.functions)} reward_funcs; give one weight per function")

    def score(self, prompts: list[str], completions: list[str], **columns) -> tuple[list[float], dict]:
        total = [0.0] * len(completions)
        each = {}
        for name, function, weight in zip(self.names, self.functions, self.weights):
            values = function(prompts=prompts, completions=completions, **columns)
            if values is None or len(values) != len(completions):
                raise ValueError(f"reward function {name!r} returned {type(values).__name__} for "
                                 f"{len(completions)} completions; it must return one float (or None) each")
            values = [0.0 if v is None else float(v) for v in values]
            each[name] = values
            total = [t + weight * v for t, v in zip(total, values)]
        return total, each
