"""Tool-call data in a named template's own tool format (LLaMA-Factory's `tool_format`).

A record's tool list (its `tools` column) is described in the system text, and each function-call
turn (`function_call` in sharegpt data: JSON `{"name": ..., "arguments": {...}}` or a list of
them for parallel calls) is written the way the template's model family writes calls. The facts
(prompt wording, call syntax) are LLaMA-Factory's (src/llamafactory/data/tool_utils.py) and the
model families' own chat templates. Two deviations from LLaMA-Factory, where its text is not what
the model family writes and its own parser cannot read it back: glm4_moe calls end with
`</tool_call>` (GLM-4.5's chat template), and seed_oss writes `<function=name>` with its `>`
(Seed-OSS's chat template).

Only named templates (`template:`) use this; the tokenizer's own template gets the tools list
through apply_chat_template when it renders one (data/encode.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tuneforge.errors import DataError

from .template_record import Template

_DEFAULT_PROMPT = (
    "You have access to the following tools:\n{tool_text}Use the following format if using a tool:\n```\n"
    "Action: tool name (one of [{tool_names}])\nAction Input: the input to the tool, in a JSON format "
    'representing the kwargs (e.g. ```{{"input": "hello world", "num_beams": 5}}```)\n```\n')
_GLM4_PROMPT = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
                "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具{tool_text}")
_XML_TOOLS = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
              "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}\n</tools>\n\n")
_QWEN_PROMPT = "\n\n" + _XML_TOOLS + (
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')
_LING_PROMPT = _QWEN_PROMPT[2:] + "\ndetailed thinking off"
_GLM4_MOE_PROMPT = "\n\n" + _XML_TOOLS + (
    "For each function call, output the function name and arguments within the following XML format:\n"
    "<tool_call>{{function-name}}\n<arg_key>{{arg-key-1}}</arg_key>\n<arg_value>{{arg-value-1}}</arg_value>\n"
    "<arg_key>{{arg-key-2}}</arg_key>\n<arg_value>{{arg-value-2}}</arg_value>\n...\n</tool_call>\n")
_LLAMA3_PROMPT = (
    "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\nYou have access to the following functions. "
    "To call a function, please respond with JSON for a function call. Respond in the format "
    '{{"name": function name, "parameters": dictionary of argument name and its value}}. '
    "Do not use variables.\n\n{tool_text}")
_MINIMAX1_PROMPT = (
    "You are provided with these tools:\n<tools>\n{tool_text}</tools>\n\nIf you need to call tools, please respond "
    "with <tool_calls></tool_calls> XML tags, and provide tool-name and json-object of arguments, following the "
    'format below:\n<tool_calls>\n{{"name": <tool-name-1>, "arguments": <args-json-object-1>}}\n...\n</tool_calls>')
_MINIMAX2_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more tools to assist with the user query.\nHere are the tools available in "
    "JSONSchema format:\n\n<tools>\n{tool_text}</tools>\n\nWhen making tool calls, use XML format to invoke tools "
    'and pass parameters:\n\n<minimax:tool_call>\n<invoke name="tool-name-1">\n<parameter name="param-key-1">'
    'param-value-1</parameter>\n<parameter name="param-key-2">param-value-2</parameter>\n...\n</invoke>\n'
    "</minimax:tool_call>")
_QWEN35_PROMPT = (
    "\n\n# Tools\n\nYou have access to the following functions:\n\n<tools>{tool_text}\n</tools>\n\nIf you choose to "
    "call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n<function=example_function_name>"
    "\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n<parameter=example_parameter_2>\nThis is the value for "
    "the second parameter\nthat can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\n"
    "Reminder:\n- Function calls MUST follow the specified format: an inner <function=...></function> block must be "
    "nested within <tool_call></tool_call> XML tags\n- Required parameters MUST be specified\n- You may provide optional "
    "reasoning for your function call in natural language BEFORE the function call, but NOT after\n- If there is no "
    "function call available, answer the question like normal with your current knowledge and do not tell the user "
    "about function calls\n</IMPORTANT>")
_SEED_PROMPT = (
    "system\nYou are Doubao, a helpful AI assistant. You may call one or more functions to assist with the user query."
    "Tool List:\nYou are authorized to use the following tools (described in JSON Schema format). Before performing "
    "any task, you must decide how to call them based on the descriptions and parameters of these tools.{tool_text}\n"
    "工具调用请遵循如下格式:\n<seed:tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>value_1"
    "</parameter>\n<parameter=example_parameter_2>This is the value for the second parameter\nthat can span\nmultiple "
    "lines</parameter>\n</function>\n</seed:tool_call>\n")

# a call as the data gives it: (function name, its arguments as parsed JSON)
Call = tuple[str, Any]


def _dump(value: Any, **kw) -> str:
    return json.dumps(value, ensure_ascii=False, **kw)


def _function(tool: dict) -> dict:
    """A tool's own description: OpenAI's {"type": "function", "function": {...}} unwrapped."""
    return tool.get("function", tool) if tool.get("type") == "function" else tool


def _wrapped(tool: dict) -> dict:
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else _dump(value)


def _kwargs(name: str, args: Any) -> dict:
    if not isinstance(args, dict):
        raise ValueError(f"the arguments of {name!r} are {type(args).__name__}, not a JSON object")
    return args


# ---- tool lists (the system text) ----

def _default_tools(tools: list[dict]) -> str:
    blocks, names = [], []
    for tool in map(_function, tools):
        params = tool.get("parameters") or {}
        lines = []
        for name, param in (params.get("properties") or {}).items():
            required = ", required" if name in params.get("required", []) else ""
            enum = f", should be one of [{', '.join(map(str, param['enum']))}]" if param.get("enum") else ""
            items = f", where each item should be {param['items'].get('type', '')}" if param.get("items") else ""
            lines.append(f"  - {name} ({param.get('type', '')}{required}): {param.get('description', '')}{enum}{items}\n")
        blocks.append(f"> Tool Name: {tool['name']}\nTool Description: {tool.get('description', '')}\n"
                      f"Tool Args:\n{''.join(lines)}\n")
        names.append(tool["name"])
    return _DEFAULT_PROMPT.format(tool_text="".join(blocks), tool_names=", ".join(names))


def _glm4_tools(tools: list[dict]) -> str:
    text = "".join(f"\n\n## {t['name']}\n\n{_dump(t, indent=4)}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
                   for t in map(_function, tools))
    return _GLM4_PROMPT.format(tool_text=text)


def _lines(prompt: str, each: Callable[[dict], str]) -> Callable[[list[dict]], str]:
    """A prompt whose tool text is one piece per tool."""
    return lambda tools: prompt.format(tool_text="".join(each(t) for t in tools))


def _llama3_tools(tools: list[dict]) -> str:
    text = "".join(_dump(_wrapped(t), indent=4) + "\n\n" for t in tools)
    return _LLAMA3_PROMPT.format(date=datetime.now().strftime("%d %b %Y"), tool_text=text)


def _gemma4_value(schema: dict) -> str:
    parts = []
    if schema.get("description"):
        parts.append(f'description:<|"|>{schema["description"]}<|"|>')
    if schema.get("type"):
        parts.append(f'type:<|"|>{str(schema["type"]).upper()}<|"|>')
    return ",".join(parts)


def _gemma4_tools(tools: list[dict]) -> str:
    out = []
    for tool in map(_function, tools):
        text = f'declaration:{tool["name"]}{{description:<|"|>{tool.get("description", "")}<|"|>'
        params = tool.get("parameters")
        if params:
            parts = []
            if params.get("properties"):
                props = ",".join(f"{k}:{{{_gemma4_value(v)}}}" for k, v in params["properties"].items())
                parts.append(f"properties:{{{props}}}")
            if params.get("required"):
                parts.append("required:[" + ",".join(f'<|"|>{r}<|"|>' for r in params["required"]) + "]")
            if params.get("type"):
                parts.append(f'type:<|"|>{str(params["type"]).upper()}<|"|>')
            text += f",parameters:{{{','.join(parts)}}}"
        response = tool.get("response")
        if response:
            parts = [f'description:<|"|>{response["description"]}<|"|>'] if response.get("description") else []
            if str(response.get("type", "")).upper() == "OBJECT":
                parts.append('type:<|"|>OBJECT<|"|>')
            text += f",response:{{{','.join(parts)}}}"
        out.append(text + "}")
    return "\n".join(out)


# ---- calls (the function-call turn) ----

def _default_calls(calls: list[Call]) -> str:
    return "\n".join(f"Action: {name}\nAction Input: {_dump(args)}" for name, args in calls)


def _glm4_calls(calls: list[Call]) -> str:
    if len(calls) > 1:
        raise ValueError("GLM-4's tool format has no parallel calls: write one call per function_call turn")
    name, args = calls[0]
    return f"{name}\n{_dump(args)}"


def _one_or_list(key: str) -> Callable[[list[Call]], str]:
    def calls_text(calls: list[Call]) -> str:
        objects = [{"name": name, key: args} for name, args in calls]
        return _dump(objects[0] if len(objects) == 1 else objects)
    return calls_text


def _qwen_calls(calls: list[Call]) -> str:
    return "\n".join(f"<tool_call>\n{_dump({'name': n, 'arguments': a})}\n</tool_call>" for n, a in calls)


def _tagged(opening: str, argument: str, closing: str) -> Callable[[list[Call]], str]:
    """Calls written as `opening` (with {name}), one `argument` (with {key}, {value}) per argument
    and `closing`, joined by newlines: the XML-like formats of Qwen3.5, GLM-4.5, MiniMax-M2, Seed-OSS."""
    def calls_text(calls: list[Call]) -> str:
        return "\n".join(opening.format(name=name) + "".join(argument.format(key=k, value=_text(v))
                                                             for k, v in _kwargs(name, args).items()) + closing
                         for name, args in calls)
    return calls_text


_qwen35_calls = _tagged("<tool_call>\n<function={name}>", "\n<parameter={key}>\n{value}\n</parameter>",
                        "\n</function>\n</tool_call>")
_glm4_moe_calls = _tagged("\n<tool_call>{name}", "\n<arg_key>{key}</arg_key>\n<arg_value>{value}</arg_value>",
                          "\n</tool_call>")
_minimax2_calls = _tagged('<invoke name="{name}">', '\n<parameter name="{key}">{value}</parameter>', "\n</invoke>")
_seed_calls = _tagged("\n<seed:tool_call>\n<function={name}>", "\n<parameter={key}>{value}</parameter>",
                      "\n</function>\n</seed:tool_call>")


def _minimax1_calls(calls: list[Call]) -> str:
    return "<tool_calls>\n" + "\n".join(_dump({"name": n, "arguments": a}) for n, a in calls) + "\n</tool_calls>"


def _lfm2_calls(calls: list[Call]) -> str:
    def kwarg(key: str, value: Any) -> str:
        return f'{key}="{value}"' if isinstance(value, str) else f"{key}={_dump(value)}"
    texts = [f"{name}({', '.join(kwarg(k, v) for k, v in _kwargs(name, args).items())})" for name, args in calls]
    return f"<|tool_call_start|>[{', '.join(texts)}]<|tool_call_end|>"


def _gemma4_arg(value: Any, quote_keys: bool) -> str:
    if isinstance(value, str):
        return f'<|"|>{value}<|"|>'
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        keys = sorted(value)
        return "{" + ",".join(f"{_gemma4_key(k, quote_keys)}:{_gemma4_arg(value[k], quote_keys)}" for k in keys) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_gemma4_arg(v, quote_keys) for v in value) + "]"
    return str(value)


def _gemma4_key(key: str, quoted: bool) -> str:
    return f'<|"|>{key}<|"|>' if quoted else str(key)


def _gemma4_calls(calls: list[Call]) -> str:
    out = []
    for name, args in calls:
        if isinstance(args, dict):
            body = ",".join(f"{k}:{_gemma4_arg(args[k], False)}" for k in sorted(args))
        else:
            body = args if isinstance(args, str) else _gemma4_arg(args, False)
        out.append(f"<|tool_call>call:{name}{{{body}}}<tool_call|>")
    return "".join(out)


@dataclass(frozen=True)
class ToolFormat:
    """How one model family writes tools: `tools(list of tool dicts) -> system text` (appended to
    the system prompt) and `calls([(name, arguments)]) -> the function-call turn's text`.
    `call_words`: the words that may wrap a call's JSON in the data (text outside them is kept
    before the formatted call, as a thought)."""

    tools: Callable[[list[dict]], str]
    calls: Callable[[list[Call]], str]
    call_words: tuple[str, str] = ("<tool_call>", "</tool_call>")


TOOL_FORMATS: dict[str, ToolFormat] = {
    "default": ToolFormat(_default_tools, _default_calls),
    "gemma4": ToolFormat(_gemma4_tools, _gemma4_calls),
    "glm4": ToolFormat(_glm4_tools, _glm4_calls),
    "glm4_moe": ToolFormat(_lines(_GLM4_MOE_PROMPT, lambda t: "\n" + _dump(_wrapped(t))), _glm4_moe_calls),
    "lfm2": ToolFormat(lambda tools: "List of tools: <|tool_list_start|>" + _dump([_function(t) for t in tools])
                       + "<|tool_list_end|>", _lfm2_calls, ("<|tool_call_start|>", "<|tool_call_end|>")),
    "ling": ToolFormat(_lines(_LING_PROMPT, lambda t: "\n" + _dump(_wrapped(t))), _qwen_calls),
    "llama3": ToolFormat(_llama3_tools, _one_or_list("parameters")),
    "minimax1": ToolFormat(_lines(_MINIMAX1_PROMPT, lambda t: _dump(_function(t)) + "\n"), _minimax1_calls),
    "minimax2": ToolFormat(_lines(_MINIMAX2_PROMPT, lambda t: f"<tool>{_dump(_function(t))}</tool>\n"),
                           _minimax2_calls),
    "mistral": ToolFormat(lambda tools: f"[AVAILABLE_TOOLS] {_dump([_wrapped(t) for t in tools])}[/AVAILABLE_TOOLS]",
                          lambda calls: _dump([{"name": n, "arguments": a} for n, a in calls])),
    "qwen": ToolFormat(_lines(_QWEN_PROMPT, lambda t: "\n" + _dump(_wrapped(t))), _qwen_calls),
    "qwen3_5": ToolFormat(_lines(_QWEN35_PROMPT, lambda t: "\n" + _dump(_function(t))), _qwen35_calls),
    "seed_oss": ToolFormat(lambda tools: _SEED_PROMPT.format(tool_text="\n" + _dump(tools)), _seed_calls),
}


def tool_text(template: Template, tools: list[dict], source: str = "the record") -> str:
    """What the template appends to the system text for this tool list (LLaMA-Factory's
    format_tools): a literal format (Template.tools, e.g. phi4_mini's) or the tool format's prompt.
    Raises DataError naming `source` for a tool description the format cannot write."""
    if template.tools is not None:
        return template.tools.replace("{content}", _dump(tools))
    try:
        return TOOL_FORMATS[template.tool_format].tools(tools)
    except (KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{source}: a tool description lacks what template {template.name!r} writes ({err!s}); "
                        'each tool needs a "name" and may have "description" and "parameters"') from None


def function_call(template: Template, content: str, source: str = "the record") -> tuple[str, str]:
    """(thought, call text) of a function-call turn whose content is JSON `{"name": ..., "arguments":
    ...}` or a list of them, maybe after a thought (the template's thought words, else
    `<think>\\n ... \\n</think>\\n\\n` as LLaMA-Factory) or inside the format's call words.
    Raises DataError naming `source` for content that is not such JSON."""
    fmt = TOOL_FORMATS[template.tool_format]
    start, end = fmt.call_words
    wrapped = re.search(re.escape(start) + "(.*?)" + re.escape(end), content, re.DOTALL)
    if wrapped:
        thought, body = content.replace(wrapped.group(0), ""), wrapped.group(1)
    else:
        start, end = template.thought or ("<think>\n", "\n</think>\n\n")
        found = re.search(re.escape(start) + ".*?" + re.escape(end), content, re.DOTALL)
        thought = found.group(0) if found else ""
        body = content.replace(thought, "") if found else content
    try:
        calls = _parse_calls(body)
        return thought, fmt.calls(calls)
    except ValueError as err:
        raise DataError(f"{source}: function call {_short(body)} cannot be written in template "
                        f"{template.name!r}'s tool format: {err}; fix the record") from None


def _parse_calls(body: str) -> list[Call]:
    try:
        value = json.loads(body)
    except json.JSONDecodeError as err:
        raise ValueError(f'it is not JSON (column {err.colno}: {err.msg}); write {{"name": ..., "arguments": '
                         "{...}} or a list of them") from None
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(c, dict) and isinstance(c.get("name"), str) and "arguments" in c
                            for c in items):
        raise ValueError('each call must be an object with a "name" (text) and "arguments"')
    return [(c["name"], c["arguments"]) for c in items]


def _short(text: str, limit: int = 60) -> str:
    text = text.strip()
    return repr(text if len(text) <= limit else text[:limit] + "...")


def apply_tool_format(template: Template, messages: list[dict], tools: list[dict] | None,
                      source: str = "the record") -> list[dict]:
    """The messages with the tool list appended to the system text (a system message made from
    the template's default system when there is none, as LLaMA-Factory) and each function-call
    turn (`"function_call": True`) given `function_call` (the formatted call) and `thought`, which
    the template's Jinja renders (data/template_record.py). Raises DataError naming `source`."""
    out = []
    for message in messages:
        if message.get("function_call") is True:
            thought, call = function_call(template, message["content"], source)
            message = {"role": "assistant", "content": thought + call, "function_call": call, "thought": thought}
        out.append(message)
    if tools:
        text = tool_text(template, tools, source)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + text}
        else:
            out.insert(0, {"role": "system", "content": template.default_system + text})
    return out
