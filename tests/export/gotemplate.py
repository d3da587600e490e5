"""A small evaluator for the subset of Go's text/template that Ollama prompt templates use, and
Ollama's way of calling a template for a chat, so tests can render a Modelfile's TEMPLATE as
Ollama would without Ollama.

Template subset: text; actions `{{ pipeline }}` with trim markers `{{-` / `-}}`; comments;
`if` / `else if` / `else` / `end`; `range [$i, $v :=] pipeline`; `$x := value` and `$x = value`;
operands `.`, `.Field.Field`, `$`, `$x.Field`, "strings", numbers, true/false; calls of
eq, ne, and, or, not, len, slice, index; parenthesised calls.

Ollama's call (its template and server packages): a request with no system message first gets
the Modelfile's SYSTEM as one; consecutive messages of one role are joined with a blank line;
a template that mentions Messages is executed once with Messages (every message, system ones
too) and System (the system texts joined with a blank line).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*")|(\$\w*(?:\.\w+)*)|(\.(?:\w+(?:\.\w+)*)?)|'
                    r"(-?\d+)|(:=|=|,|\(|\))|(\w+))")


@dataclass
class _Node:
    kind: str                      # text, action, if, range
    text: str = ""
    expr: list = field(default_factory=list)
    body: list = field(default_factory=list)
    branches: list = field(default_factory=list)   # if: [(expr, body)]
    otherwise: list | None = None
    names: list = field(default_factory=list)      # range variables


def _lex(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", s)], trim markers applied, comments dropped."""
    out: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if m.group(1):
            text = text.rstrip()
        out.append(("text", text))
        body = m.group(2).strip()
        if not body.startswith("/*"):
            out.append(("action", body))
        pos = m.end()
        if m.group(3):
            rest = template[pos:]
            pos += len(rest) - len(rest.lstrip())
    out.append(("text", template[pos:]))
    return [t for t in out if t != ("text", "")]


def _tokens(src: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    kinds = ("string", "var", "field", "number", "punct", "ident")
    while pos < len(src.rstrip()):
        m = _TOKEN.match(src, pos)
        if not m:
            raise ValueError(f"cannot read {src[pos:]!r}")
        kind = next(k for k, g in zip(kinds, m.groups()) if g is not None)
        out.append((kind, m.group(m.lastindex)))
        pos = m.end()
    return out


def parse(template: str) -> list[_Node]:
    items = _lex(template)
    pos = 0

    def block(stop: tuple[str, ...]) -> tuple[list[_Node], str]:
        nonlocal pos
        nodes: list[_Node] = []
        while pos < len(items):
            kind, text = items[pos]
            pos += 1
            if kind == "text":
                nodes.append(_Node("text", text=text))
                continue
            word = text.split(None, 1)[0] if text else ""
            if word in stop or text.startswith("else"):
                return nodes, text
            if word == "if":
                nodes.append(_if(text[2:]))
            elif word == "range":
                nodes.append(_range(text[5:]))
            else:
                nodes.append(_Node("action", expr=_tokens(text)))
        if stop:
            raise ValueError(f"missing {{{{ end }}}} in {template!r}")
        return nodes, ""

    def _if(cond: str) -> _Node:
        node = _Node("if")
        while True:
            body, end = block(("end",))
            node.branches.append((_tokens(cond), body))
            if end.startswith("else if"):
                cond = end[len("else if"):]
                continue
            if end == "else":
                node.otherwise, end = block(("end",))
            return node

    def _range(spec: str) -> _Node:
        names: list[str] = []
        if ":=" in spec:
            left, spec = spec.split(":=", 1)
            names = [n.strip() for n in left.split(",")]
        node = _Node("range", expr=_tokens(spec), names=names)
        node.body, end = block(("end",))
        if end == "else":
            node.otherwise, _ = block(("end",))
        return node

    nodes, _ = block(())
    return nodes


def _truth(value) -> bool:
    return bool(value)  # Go: false, 0, "", nil and empty collections are false


def _field(value, path: str):
    for name in [p for p in path.split(".") if p]:
        value = value.get(name) if isinstance(value, dict) else getattr(value, name, None)
    return value


_FUNCS = {
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "not": lambda a: not _truth(a),
    "len": len,
    "index": lambda a, *ks: _index(a, ks),
    "slice": lambda a, *ks: a[ks[0]:ks[1]] if len(ks) > 1 else a[ks[0]:] if ks else a,
}


def _index(value, keys):
    for k in keys:
        value = value[k]
    return value


class _Scope:
    def __init__(self, root, dot):
        self.root, self.dot, self.vars = root, dot, [{"$": root}]

    def lookup(self, name: str):
        for frame in reversed(self.vars):
            if name in frame:
                return frame[name]
        raise ValueError(f"undefined variable {name}")

    def assign(self, name: str, value) -> None:
        for frame in reversed(self.vars):
            if name in frame:
                frame[name] = value
                return
        raise ValueError(f"undefined variable {name}")


def _eval(tokens: list, scope: _Scope):
    """One command: `operand`, `func args...`, `$x := cmd` or `$x = cmd`."""
    if len(tokens) > 2 and tokens[0][0] == "var" and tokens[1][1] in (":=", "="):
        value = _eval(tokens[2:], scope)
        if tokens[1][1] == ":=":
            scope.vars[-1][tokens[0][1]] = value
        else:
            scope.assign(tokens[0][1], value)
        return None
    args, pos = [], 0
    while pos < len(tokens):
        kind, text = tokens[pos]
        if text == "(":
            depth, end = 1, pos + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(tokens[end][1], 0)
                end += 1
            args.append(("value", _eval(tokens[pos + 1:end - 1], scope)))
            pos = end
            continue
        args.append((kind, text))
        pos += 1
    head_kind, head = args[0]
    if head_kind == "ident" and head in ("and", "or"):  # short-circuit, value of the deciding arg
        value = None
        for arg in args[1:]:
            value = _operand(arg, scope)
            if _truth(value) != (head == "and"):
                return value
        return value
    if head_kind == "ident" and head in _FUNCS:
        return _FUNCS[head](*[_operand(a, scope) for a in args[1:]])
    if len(args) != 1:
        raise ValueError(f"cannot evaluate {tokens!r}")
    return _operand(args[0], scope)


def _operand(arg, scope: _Scope):
    kind, text = arg
    if kind == "value":
        return text
    if kind == "string":
        return json.loads(text)  # Go's escapes in the strings templates use are JSON's
    if kind == "number":
        return int(text)
    if kind == "field":
        return _field(scope.dot, text)
    if kind == "var":
        name, _, path = text.partition(".")
        return _field(scope.lookup(name), path)
    if kind == "ident" and text in ("true", "false"):
        return text == "true"
    raise ValueError(f"cannot evaluate {text!r}")


def _run(nodes: list[_Node], scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        if node.kind == "text":
            out.append(node.text)
        elif node.kind == "action":
            value = _eval(node.expr, scope)
            if value is not None and not (len(node.expr) > 1 and node.expr[1][1] in (":=", "=")):
                out.append(str(value) if not isinstance(value, bool) else str(value).lower())
        elif node.kind == "if":
            for cond, body in node.branches:
                if _truth(_eval(cond, scope)):
                    _block(body, scope, out, scope.dot)
                    break
            else:
                if node.otherwise is not None:
                    _block(node.otherwise, scope, out, scope.dot)
        elif node.kind == "range":
            items = _eval(node.expr, scope) or []
            if not items and node.otherwise is not None:
                _block(node.otherwise, scope, out, scope.dot)
            for i, item in enumerate(items):
                bound = dict(zip(node.names, [i, item])) if len(node.names) == 2 else (
                    {node.names[0]: item} if node.names else {})
                _block(node.body, scope, out, item, bound)


def _block(nodes, scope: _Scope, out: list[str], dot, bound: dict | None = None) -> None:
    saved = scope.dot
    scope.dot = dot
    scope.vars.append(dict(bound or {}))
    try:
        _run(nodes, scope, out)
    finally:
        scope.vars.pop()
        scope.dot = saved


def execute(template: str, data: dict) -> str:
    out: list[str] = []
    _block(parse(template), _Scope(data, data), out, data)
    return "".join(out)


def ollama_prompt(template: str, messages: list[dict], system: str | None = None) -> str:
    """The prompt Ollama's /api/chat builds from `messages` for a model whose Modelfile has
    TEMPLATE `template` and SYSTEM `system`."""
    if "Messages" not in template:
        raise ValueError("only templates that range over .Messages are rendered here")
    msgs = [dict(m) for m in messages]
    if system and msgs and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    collated: list[dict] = []
    for m in msgs:
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    joined = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")
    return execute(template, {"System": joined, "Messages": collated, "Tools": None, "Response": ""})
