"""Tool calling for ``/v1/chat/completions``: ``tools`` / ``tool_choice``, the grammar that
forces a call, and the parser that finds calls in generated text.

- ``tool_choice`` ``{"type": "function", "function": {"name": N}}``: the output is constrained
  (a grammar from N's ``parameters`` schema) to N's arguments; the answer is one call of N.
- ``"required"``: constrained to a JSON list of ``{"name": ..., "parameters": {...}}`` over
  the given tools (vLLM's shape; one item when ``parallel_tool_calls`` is false); the answer
  is those calls.
- ``"auto"`` (the default with tools): free text, parsed by the gateway's
  ``--tool-call-parser``; ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}
  </tool_call>`` blocks become calls and the rest stays content.
- ``"none"``: tools are shown to the chat template, no call is parsed.

The tools go to the chat template as ``tools=`` (the template decides how to show them), and
``role: "tool"`` messages and assistant ``tool_calls`` pass through to it.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from services.gateway.errors import bad_request

TOOL_CALL_PARSERS = ("hermes", "none")
_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"
_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = ""

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id or f"chatcmpl-tool-{uuid.uuid4().hex}",
                               "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            out["index"] = index
        return out


@dataclass(frozen=True)
class ToolPlan:
    """What a request's ``tools`` / ``tool_choice`` ask of generation and of the answer."""

    tools: list[dict[str, Any]]        # as the chat template takes them
    mode: str                          # "none", "auto", "required" or "named"
    named: str | None = None           # the function of "named"
    schema: dict[str, Any] | None = None  # what the output must match (required / named)
    parallel: bool = True              # parallel_tool_calls: False keeps the first call only


def plan(tools: list[Any] | None, tool_choice: Any, parser: str, parallel: bool = True
         ) -> ToolPlan | None:
    """Validate ``tools`` and ``tool_choice`` (400 naming the field); None without tools.
    ``parallel`` False (``parallel_tool_calls``) allows one call only."""
    if tool_choice is not None and not tools and tool_choice != "none":
        raise bad_request("tool_choice needs tools", "tool_choice")
    if not tools:
        return None
    schemas: dict[str, dict[str, Any]] = {}
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise bad_request(f"tools.{i}: a tool must be {{\"type\": \"function\", "
                              "\"function\": {...}}", "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise bad_request(f"tools.{i}.function.name must be 1..64 letters, digits, _ . -",
                              "tools")
        params = fn.get("parameters", {"type": "object"})
        if not isinstance(params, dict):
            raise bad_request(f"tools.{i}.function.parameters must be a JSON schema object",
                              "tools")
        schemas[name] = params
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or name not in schemas:
            raise bad_request("tool_choice must name one of the tools: {\"type\": \"function\","
                              " \"function\": {\"name\": ...}}", "tool_choice")
        return ToolPlan(tools, "named", name, schemas[name], parallel)
    if choice == "required":
        items = [{"type": "object", "properties": {"name": {"enum": [n]}, "parameters": s},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for n, s in schemas.items()]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        if not parallel:
            schema["maxItems"] = 1
        return ToolPlan(tools, "required", schema=schema, parallel=parallel)
    if choice == "auto":
        if parser == "none":
            raise bad_request("tool_choice \"auto\" needs a tool-call parser: start the gateway "
                              "with --tool-call-parser hermes", "tool_choice")
        return ToolPlan(tools, "auto", parallel=parallel)
    if choice == "none":
        return ToolPlan(tools, "none")
    raise bad_request("tool_choice must be \"none\", \"auto\", \"required\" or a named function",
                      "tool_choice")


def calls_of(p: ToolPlan, text: str) -> tuple[str | None, list[ToolCall]]:
    """The answer's ``(content, tool_calls)`` for generated ``text`` (the first call only
    unless ``p.parallel``)."""
    content, calls = _calls_of(p, text)
    return content, calls if p.parallel else calls[:1]


def _calls_of(p: ToolPlan, text: str) -> tuple[str | None, list[ToolCall]]:
    if p.mode == "named":
        return None, [ToolCall(p.named or "", text)]
    if p.mode == "required":
        try:
            items = json.loads(text)
        except ValueError:
            return text, []  # cut short (max_tokens): no complete call
        return None, [ToolCall(c["name"], json.dumps(c["parameters"])) for c in items]
    if p.mode == "auto":
        return parse_hermes(text)
    return text, []


def parse_hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    """Hermes-style calls: each ``<tool_call>{"name", "arguments"}</tool_call>`` block with a
    JSON object becomes a call; a block that is not one stays in the content."""
    calls, kept, pos = [], [], 0
    for m in _HERMES_BLOCK.finditer(text):
        try:
            obj = json.loads(m.group(1))
            call = ToolCall(obj["name"], json.dumps(obj.get("arguments", {})))
            if not isinstance(obj["name"], str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            continue
        kept.append(text[pos:m.start()])
        pos = m.end()
        calls.append(call)
    kept.append(text[pos:])
    content = "".join(kept).strip() if calls else text
    return (content or None), calls


class ToolStream:
    """Streaming: text deltas -> (content delta, finished tool calls), for ``auto`` (hermes).

    Content is passed through until a ``<tool_call>`` could begin; from there text is held
    until its ``</tool_call>`` arrives, then the call goes out whole (one ``tool_calls``
    delta per call, ``arguments`` complete). For ``named`` / ``required`` the whole output is
    the call(s): arguments stream as they come (named) or at the end (required).
    """

    def __init__(self, p: ToolPlan) -> None:
        self.plan = p
        self._buf = ""
        self.count = 0  # calls sent so far
        self._named_open = False

    def push(self, text: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        p = self.plan
        if p.mode == "named":
            deltas = []
            if not self._named_open:
                self._named_open = True
                self.count = 1
                deltas.append(ToolCall(p.named or "", "").to_openai(0))
            if text:
                deltas.append({"index": 0, "function": {"arguments": text}})
            return "", deltas
        if p.mode == "required":
            self._buf += text
            if not final:
                return "", []
            content, calls = calls_of(p, self._buf)
            return self._emit(content or "", calls)
        if p.mode != "auto":
            return text, []
        self._buf += text
        out, calls = "", []
        while True:
            start = self._buf.find(_HERMES_OPEN)
            if start < 0:
                keep = 0 if final else _partial_suffix(self._buf, _HERMES_OPEN)
                out += self._buf[: len(self._buf) - keep]
                self._buf = self._buf[len(self._buf) - keep:]
                break
            out += self._buf[:start]
            self._buf = self._buf[start:]
            end = self._buf.find(_HERMES_CLOSE)
            if end < 0:
                if final:  # never closed: it was text after all
                    out += self._buf
                    self._buf = ""
                break
            block = self._buf[: end + len(_HERMES_CLOSE)]
            self._buf = self._buf[end + len(_HERMES_CLOSE):]
            content, found = parse_hermes(block)
            if found:
                calls += found
            else:
                out += block
        return self._emit(out, calls)

    def _emit(self, content: str, calls: list[ToolCall]) -> tuple[str, list[dict[str, Any]]]:
        deltas = []
        for c in calls:
            if self.count and not self.plan.parallel:
                break  # parallel_tool_calls false: the first call only
            deltas.append(c.to_openai(self.count))
            self.count += 1
        return content, deltas


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0
