"""What every generating path shares (chat, eval predictions, the API engine): the chat prompt
as token ids, transformers `generate()` arguments from the config's generation keys, and the
context budget (the model's context, an adapter's virtual tokens, the room an answer has left;
training and eval loss check their examples against it too: `check_virtual_room`)."""

from __future__ import annotations

import torch

from ..adapters.virtual_tokens import holder
from ..data.templates import render_chat
from ..errors import ConfigError


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def chat_input_ids(tokenizer, messages: list[dict], system: str | None = None,
                   device=None) -> torch.Tensor:
    """(1, n) prompt ids for `messages` with the generation prompt appended; `system` is put
    first unless the messages already start with a system turn. Raises TemplateRefused (a
    ModelError, data/templates.py) when the chat template fails on them."""
    if system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system}, *messages]
    text = render_chat(tokenizer, messages, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return ids.to(device) if device is not None else ids


def generation_kwargs(gen, tokenizer, temperature: float | None = None, top_p: float | None = None,
                      max_tokens: int | None = None) -> dict:
    """generate() arguments from GeneratingArguments `gen`; the explicit values (an API request's)
    win over the config's. temperature 0 (the request's or the config's) means greedy."""
    sample = (gen.do_sample and gen.temperature > 0) if temperature is None else temperature > 0
    kwargs = {"max_new_tokens": max_tokens or gen.max_new_tokens, "do_sample": sample,
              "repetition_penalty": gen.repetition_penalty, "pad_token_id": pad_id(tokenizer),
              "eos_token_id": tokenizer.eos_token_id}
    if sample:
        kwargs.update(temperature=temperature if temperature is not None else gen.temperature,
                      top_p=top_p if top_p is not None else gen.top_p, top_k=gen.top_k)
    else:  # greedy: unset the model's sampling defaults so transformers does not warn
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def context_length(model, tokenizer=None) -> int | None:
    """Most tokens the model attends over (prompt and answer together): its config's
    max_position_embeddings (or the older names for it), lowered to the tokenizer's
    model_max_length when that is a real limit. None when neither names one."""
    config = getattr(model, "config", None)  # None: not a transformers model
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limits = [getattr(text_config, key, None) for key in _CONTEXT_KEYS]
    found = next((int(v) for v in limits if isinstance(v, int) and v > 0), None)
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 10**7:  # "no limit" is ~1e30
        found = tokenizer_limit if found is None else min(found, tokenizer_limit)
    return found


def virtual_prefix(model, adapter: str | None = None) -> tuple[int, str | None]:
    """(N, name): the positions of the context that the virtual tokens of adapter `adapter` (its
    name inside `model`) take, and that name. N is num_virtual_tokens of a prompt-tuning /
    P-tuning adapter (input positions before the prompt) or of a prefix-tuning / P-tuning v2 / MAM
    adapter (cache positions before it, which count against max_position_embeddings or the rope
    length alike; adapters/virtual_tokens.py). adapter None: the virtual-token adapter active in
    `model` (what a plain forward uses). (0, None) for an adapter without virtual tokens (LoRA,
    IA3, ..., the base) and a model without any."""
    vt = holder(model)
    if vt is None:
        return 0, None
    names = ((adapter,) if adapter is not None else () if vt.adapters_disabled else vt.active)
    found = [(vt.encoders[n].num_virtual_tokens, n) for n in names if n in vt.encoders]
    return max(found) if found else (0, None)


def context_room(context: int, prompt_tokens: int, virtual: int = 0, adapter: str | None = None) -> int:
    """Tokens an answer may have after a prompt of `prompt_tokens` tokens and `virtual` virtual
    tokens (of adapter `adapter`, named in the message) in a context of `context` tokens. Raises
    ValueError with a one-line message when that leaves no room for one answer token."""
    room = context - virtual - prompt_tokens
    if room < 1:
        added = f" and adapter {adapter!r} adds {virtual} virtual tokens," if virtual else ""
        raise ValueError(
            f"the prompt is {prompt_tokens} tokens{added} but this model's context is {context} "
            "tokens, which must also hold at least one answer token; shorten the messages")
    return room


def sequence_length(example: dict) -> int:
    """Tokens of an encoded example's longest sequence: its input_ids (sft, pt), or the longer of
    a pair's chosen_ids / rejected_ids (rm)."""
    return max((len(v) for k, v in example.items() if k == "input_ids" or k.endswith("_ids")), default=0)


def check_virtual_room(model, tokenizer, splits: dict, cutoff_len: int | None, adapter: str | None = None,
                       tunable: bool = False, whole_rows: bool = False) -> None:
    """Refuse examples that, after the virtual tokens of the adapter active in `model` (prompt /
    prefix tuning, P-tuning, MAM, ...: `virtual_prefix`), run past the model's context
    (`context_length`): each of their N virtual tokens takes a position before the real ones, so a
    row of L tokens ends at position N + L. Past the context, a model with learned positions
    (GPT-2) fails with an IndexError and a rope model runs on positions it was never trained on
    (and `tuneforge api` / `chat` refuse such a prompt), so the examples are refused, not cut:
    cutoff_len stays what the config says.

    `splits`: split name ("train", "eval") -> encoded examples (or None). `adapter`: who adds the
    virtual tokens, for the message (default: "adapter '<its name in the model>'"). `tunable`:
    num_virtual_tokens is a setting of this run (training), so the message offers lowering it too.
    `whole_rows` (training: every token of a row runs through the model): without virtual tokens, a
    model with learned positions (`learned_positions`) is checked too, its examples must fit the
    context themselves. Nothing to check for a rotary model without
    virtual tokens or a model without a known context.
    Raises ConfigError (one line: the split, the longest example, cutoff_len, num_virtual_tokens,
    the context and the cutoff_len that fits)."""
    context = context_length(model, tokenizer)
    virtual, name = virtual_prefix(model)
    if context is None or not (virtual or (whole_rows and learned_positions(model))):
        return
    for split, examples in splits.items():
        lengths = [sequence_length(e) for e in examples or ()]
        over = [n for n in lengths if n + virtual > context]
        if not over:
            continue
        longest = max(lengths)
        cut = f" (cutoff_len={cutoff_len})" if cutoff_len else ""
        count = "all" if len(over) == len(lengths) else f"{len(over)} of the"
        if not virtual:
            raise ConfigError(
                f"{count} {len(lengths)} {split} examples run past this model's context of {context} tokens "
                f"(its learned position embeddings end there): the longest example is {longest} tokens{cut}; "
                f"lower cutoff_len to {context}")
        fixes = [f"cutoff_len to {context - virtual}"] if context - virtual > 1 else []
        if tunable and context - longest >= 1:
            fixes.append(f"num_virtual_tokens to {context - longest}")
        fix = ("lower " + " or ".join(fixes) if fixes else
               "lower num_virtual_tokens" if tunable else "use an adapter with fewer virtual tokens")
        who = adapter or f"adapter {name!r}"
        raise ConfigError(
            f"{count} {len(lengths)} {split} examples run past this model's context of {context} tokens: "
            f"{who} puts num_virtual_tokens={virtual} virtual tokens before each, and the longest example is "
            f"{longest} tokens{cut}; {fix}")


_POSITION_TABLES = ("wpe", "position_embeddings", "embed_positions")


def learned_positions(model) -> bool:
    """Whether `model` looks positions up in a learned table (GPT-2's wpe, BERT's
    position_embeddings, OPT's embed_positions): past its end a forward fails with an IndexError,
    where a rotary model only runs on positions it was not trained on."""
    return any(isinstance(m, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_TABLES
               for name, m in model.named_modules())
