"""Conversations -> token ids and labels, with the chat template set on the tokenizer.

The conversation is rendered incrementally: the prompt up to assistant turn i (with the generation
prompt) and the text including turn i. The difference is the assistant's reply, which is labelled
together with its end-of-turn token; whitespace the template adds after that token is not.
Each piece is tokenized on its own (add_special_tokens=False), as chat tokenizes a prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tuneforge.errors import DataError

from .formats import Conversation
from .template_record import Template
from .templates import TemplateRefused, named_template, render_chat, renders_tools, template_hint, template_label
from .tool_formats import apply_tool_format

IGNORE_INDEX = -100


@dataclass
class Turn:
    prompt: str  # template text, system/user/tool turns and the assistant header before the reply
    answer: str  # the reply and its end-of-turn token: the labelled part
    tail: str  # whitespace after the end-of-turn token: in the input, never labelled


def encode_conversation(
    tokenizer,
    messages: list[dict[str, str]],
    tools: list[dict] | None = None,
    cutoff_len: int = 2048,
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> dict[str, list[int]]:
    """Tokenize one conversation: {"input_ids": [...], "labels": [...]} with -100 on masked tokens."""
    if not any(m.get("role") == "assistant" for m in messages):
        raise DataError("the conversation has no assistant message, so there is nothing to learn")
    return encode_conversations(
        tokenizer, [Conversation(list(messages), tools)],
        cutoff_len=cutoff_len, train_on_prompt=train_on_prompt, mask_history=mask_history,
    )[0]


def encode_conversations(
    tokenizer,
    conversations: list[Conversation],
    cutoff_len: int = 2048,
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> list[dict[str, list[int]]]:
    """Tokenize many conversations in one batched tokenizer call (much faster than one by one)."""
    tool_mode = _tool_mode(tokenizer)
    all_turns = [render_turns(tokenizer, c, tool_mode) for c in conversations]
    pieces = [text for turns in all_turns for text in _pieces(turns)]
    ids = iter(tokenizer(pieces, add_special_tokens=False)["input_ids"]) if pieces else iter(())
    eos_text, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    encoded = []
    for turns in all_turns:
        token_turns = []
        for position, turn in enumerate(turns):
            prompt, answer = next(ids), next(ids)
            tail = next(ids) if position == len(turns) - 1 else []
            # A template that does not end replies with eos would teach the model never to stop.
            if eos_id is not None and eos_text and eos_text not in turn.answer:
                answer = answer + [eos_id]
            token_turns.append((prompt, answer, tail))
        encoded.append(assemble(token_turns, cutoff_len, train_on_prompt, mask_history))
    return encoded


def _pieces(turns: list[Turn]) -> list[str]:
    """The texts to tokenize: prompt, answer, ..., last tail.

    A tail is tokenized with the next prompt: whitespace before text can merge into one token
    (e.g. "\n\n###"), and chat tokenizes the history as one text.
    """
    texts, carry = [], ""
    for turn in turns:
        texts += [carry + turn.prompt, turn.answer]
        carry = turn.tail
    return texts + [carry] if turns else texts


def render_turns(tokenizer, conversation: Conversation, tool_mode: Template | bool) -> list[Turn]:
    """Split the rendered conversation into one (prompt, answer, tail) per assistant message.
    tool_mode: see _tool_mode."""
    messages, tools = _add_tools(conversation, tool_mode)
    turns, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], tools, True, conversation.source)
        full = _render(tokenizer, messages[: i + 1], tools, False, conversation.source)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(
                f"{template_label(tokenizer)} is not prefix-consistent on {conversation.source}: the text "
                f"rendered up to message {i} is not the start of the text that includes it (the template "
                f"rewrites earlier turns), so assistant replies cannot be located; set template: to {template_hint()}"
            )
        reply = full[len(prompt):]
        answer = reply.rstrip()
        turns.append(Turn(prompt[len(done):], answer, reply[len(answer):]))
        done = full
    return turns


def last_reply_ids(tokenizer, conversations: list[Conversation]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reply ids) per conversation ending on an assistant turn: the prompt is everything
    the chat template renders before the last reply (the history included), the reply is that last
    reply as the template renders it, with EOS added where the template does not end replies with
    it, and the template's tail after it. All texts are tokenized in one call (preference and KTO
    records: data/pairwise.py, data/kto.py)."""
    tool_mode = _tool_mode(tokenizer)
    texts = []
    for conversation in conversations:
        turns = render_turns(tokenizer, conversation, tool_mode)
        history = "".join(t.prompt + t.answer + t.tail for t in turns[:-1])
        texts.append((history + turns[-1].prompt, turns[-1].answer, turns[-1].tail))
    pieces = [piece for text in texts for piece in text]
    ids = tokenizer(pieces, add_special_tokens=False)["input_ids"] if pieces else []
    eos_text, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    out = []
    for i, (_, answer_text, _) in enumerate(texts):
        prompt, answer, tail = ids[3 * i], ids[3 * i + 1], ids[3 * i + 2]
        if eos_id is not None and eos_text and eos_text not in answer_text:
            answer = answer + [eos_id]
        out.append((prompt, answer + tail))
    return out


def assemble(
    turns: list[tuple[list[int], list[int], list[int]]],
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> dict[str, list[int]]:
    """Concatenate turns within cutoff_len; each turn's budget is shared so its reply survives."""
    # mask_history trains on the last turn only, so that turn gets the budget first.
    order = list(reversed(turns)) if mask_history else list(turns)
    pieces, used = [], 0
    for position, (prompt, answer, tail) in enumerate(order):
        if used >= cutoff_len:
            break  # later turns (earlier ones under mask_history) no longer fit
        target = answer + tail
        prompt_len, target_len = split_budget(len(prompt), len(target), cutoff_len - used)
        prompt, target = prompt[:prompt_len], target[:target_len]
        learn = not mask_history or position == 0
        answer_len = min(len(answer), target_len) if learn else 0
        labels = (prompt if train_on_prompt else [IGNORE_INDEX] * prompt_len) + target[:answer_len] + [
            IGNORE_INDEX
        ] * (target_len - answer_len)
        pieces.append((prompt + target, labels))
        used += prompt_len + target_len
    if mask_history:
        pieces.reverse()
    return {
        "input_ids": [t for ids, _ in pieces for t in ids],
        "labels": [t for _, labels in pieces for t in labels],
    }


def split_budget(prompt_len: int, target_len: int, budget: int) -> tuple[int, int]:
    """How many prompt and target tokens of one turn to keep within `budget` (LLaMA-Factory's rule)."""
    if target_len * 2 < budget:  # a short reply is kept whole
        max_target = budget
    elif prompt_len * 2 < budget:  # a short prompt is kept whole, the reply takes the rest
        max_target = budget - prompt_len
    else:  # both long: share in proportion to their lengths
        max_target = int(budget * target_len / (prompt_len + target_len))
    kept_target = min(max_target, target_len)
    return min(max(budget - kept_target, 0), prompt_len), kept_target


def describe_tools(tools: list[dict]) -> str:
    """Plain-text tool description for templates that do not render `tools` themselves."""
    return (
        "You can call the following tools. To call one, reply with only a JSON object "
        '{"name": <tool name>, "arguments": {<argument>: <value>}}.\n'
        f"Tools: {json.dumps(tools, ensure_ascii=False)}"
    )


def _tool_mode(tokenizer) -> Template | bool:
    """How tools and function calls are written: a named template (its tool format:
    data/tool_formats.py), True (the tokenizer's own template renders the tools list) or False
    (the tools are described in the system text; a call is the data's text)."""
    return named_template(tokenizer) or renders_tools(tokenizer)


def _add_tools(conversation: Conversation, tool_mode: Template | bool):
    """(messages, tools for apply_chat_template): a named template's tool format writes the tools
    and calls, or the tokenizer's template renders the tools list, or the system message does."""
    messages, tools = conversation.messages, conversation.tools
    if isinstance(tool_mode, Template):
        return apply_tool_format(tool_mode, messages, tools, conversation.source), None
    messages = [{k: v for k, v in m.items() if k != "function_call"} for m in messages]
    if not tools or tool_mode:
        return messages, tools or None
    description = describe_tools(tools)
    if messages and messages[0]["role"] == "system":
        system = {"role": "system", "content": f"{messages[0]['content']}\n\n{description}"}
        return [system, *messages[1:]], None
    return [{"role": "system", "content": description}, *messages], None


def _render(tokenizer, messages, tools, add_generation_prompt: bool, source: str) -> str:
    try:
        return render_chat(tokenizer, messages, tools, add_generation_prompt, source)
    except TemplateRefused as err:  # the record may be the cause here: say so
        raise DataError(
            f"{template_label(tokenizer)} cannot render {source}: {err.reason}; "
            f"fix the record or set template: to {template_hint()}"
        ) from None
