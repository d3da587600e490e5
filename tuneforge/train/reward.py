"""A trained reward model (stage: rm) ready for use: the base model, its adapter and the value
head saved beside it, and scores for conversations.

    model, tokenizer = load_reward_model("saves/rm")          # base from adapter_config.json
    load_reward_model("saves/rm", model_name_or_path="...")   # or named
    score(model, tokenizer, [[{"role": "user", ...}, {"role": "assistant", ...}], ...])
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import load_config
from ..data.encode import encode_conversations
from ..data.formats import Conversation
from ..data.pairwise import pad_rows
from ..errors import CheckpointError
from ..loading import load_for_use
from .heads import load_value_head, value_scores


def load_reward_model(directory: str | Path, model_name_or_path: str | None = None,
                      template: str | None = None, cache_dir: str | None = None):
    """(model, tokenizer) of the reward model trained into `directory`: a LoRA adapter folder
    (its base is `model_name_or_path`, else the default model) or a full model folder, with
    value_head.safetensors beside it, loaded by the one road to a model (loading.load_for_use,
    as chat loads it) in fp32. The tokenizer gets `template` (None: the chat template saved with
    the run, else the tokenizer's own). The model is in eval mode, frozen.

    Raises CheckpointError (no or a damaged value head), ModelError (no model or adapter
    there), ConfigError (no chat template)."""
    directory = Path(directory)
    is_adapter = (directory / "adapter_config.json").is_file()
    cfg = load_config(None, {
        "model_name_or_path": model_name_or_path if is_adapter else str(directory),
        "adapter_name_or_path": str(directory) if is_adapter else None,
        "template": template, "cache_dir": cache_dir})
    ready = load_for_use(cfg, "score", dtype=torch.float32)
    model, tokenizer = ready.model, ready.tokenizer
    load_value_head(model, directory)
    saved = _saved_template(directory)
    if template is None and saved:
        tokenizer.chat_template = saved
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def _saved_template(directory: Path) -> str | None:
    """The chat template the run saved with its tokenizer (chat_template.jinja, or in
    tokenizer_config.json)."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = directory / "tokenizer_config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError):
            raise CheckpointError(f"'{config}' is not readable JSON; train the reward model again") from None
        return value if isinstance(value, str) else None
    return None


@torch.no_grad()
def score(model, tokenizer, conversations: list[list[dict]], cutoff_len: int = 2048,
          batch_size: int = 8) -> list[float]:
    """The reward of each conversation (messages ending on the assistant reply to judge),
    rendered with the chat template as training rendered it.

    Raises DataError for a conversation the template cannot render."""
    examples = encode_conversations(tokenizer, [Conversation(list(c)) for c in conversations],
                                    cutoff_len=cutoff_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(examples), batch_size):
        rows = [e["input_ids"] for e in examples[start:start + batch_size]]
        batch = {k: v.to(device) for k, v in pad_rows(rows, pad).items()}
        scores += value_scores(model, model, batch).tolist()
    return scores
