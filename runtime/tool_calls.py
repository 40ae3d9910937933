"""Tool calls in chat outputs: the parsers that find them in a model's text, one per format, and
what a request's `tools` and `tool_choice` ask of the server (`ToolUse`).

Formats (`PARSERS`; `detect_parser` picks one from the chat template's text):
  hermes       Hermes, Qwen2.5: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one or
               more, after any content.
  llama3_json  Llama 3.x: the output is `[<|python_tag|>]{"name": ..., "parameters": {...}}`, several
               joined by `;`; an output that begins otherwise is content.
  mistral      Mistral: `[TOOL_CALLS]` then a JSON array of {"name", "arguments"}, after any content.
A parser reads all or nothing: when a call's JSON does not parse, or names a function the request
does not offer, the whole output is content. `tool_choice` "required" or a named function needs no
parser: the grammar forces the output (`ToolUse.grammar`), read by `RequiredCalls` or `NamedCall`.

Streaming (`CallStream`): content passes through as it comes, except a tail that may still begin a
call (a partial marker and the whitespace before it); from a call's marker on the text is held
until the output ends, then read as a whole, so a stream gives what a whole response gives.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from kiln.errors import KilnError
from kiln.runtime.sampling_params import StructuredOutput


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True)
class ParsedOutput:
    """An output text read for tool calls: the content (None when calls alone make the output)."""

    content: str | None
    calls: tuple[ToolCall, ...] = ()


class ToolCallParser(abc.ABC):
    """Reads the calls to the functions `names` in one output text; `single` (a request's
    parallel_tool_calls: false): the first call only.

    markers: the texts that open the calls; special_tokens: texts of the format that a tokenizer
    may hold as special tokens (which `skip_special_tokens` would drop from the output)."""

    markers: tuple[str, ...] = ()
    special_tokens: tuple[str, ...] = ()

    def __init__(self, names: Collection[str], single: bool = False):
        self.names = frozenset(names)
        self.single = single

    def calls_start(self, text: str) -> int | None:
        """Where the calls begin in `text`; None while none has begun."""
        return min((i for i in (text.find(m) for m in self.markers) if i >= 0), default=None)

    def held_back(self, text: str) -> int:
        """How many characters at the end of `text` (no call begun) may still open a call: the
        longest proper prefix of a marker that `text` ends with, and the whitespace before it."""
        partial = max((k for m in self.markers for k in range(1, len(m)) if text.endswith(m[:k])), default=0)
        return len(text) - len(text[:len(text) - partial].rstrip())

    def parse(self, text: str) -> ParsedOutput:
        """The content before the calls and the calls; the whole text as content if it holds no
        well-formed calls to known functions."""
        start = self.calls_start(text)
        if start is None:
            return ParsedOutput(text)
        try:
            calls = tuple(ToolCall(name, json.dumps(arguments, ensure_ascii=False))
                          for name, arguments in self.decode(text[start:]))
        except (ValueError, RecursionError):  # RecursionError: JSON nested past Python's limit
            return ParsedOutput(text)
        if not calls or not all(call.name in self.names for call in calls):
            return ParsedOutput(text)
        return ParsedOutput(text[:start].rstrip() or None, calls[:1] if self.single else calls)

    @abc.abstractmethod
    def decode(self, calls: str) -> list[tuple[str, Any]]:
        """(name, arguments) of each call in `calls` (the text from the calls' start on);
        ValueError unless it is exactly calls in this format."""


def _call(value: Any, arguments_key: str) -> tuple[str, dict]:
    """(name, arguments) of one call's decoded JSON; ValueError if it is not such an object."""
    if not (isinstance(value, dict) and isinstance(value.get("name"), str)
            and isinstance(value.get(arguments_key), dict)):
        raise ValueError(f'a call is {{"name": ..., "{arguments_key}": {{...}}}}')
    return value["name"], value[arguments_key]


class Hermes(ToolCallParser):
    markers = ("<tool_call>",)
    special_tokens = ("<tool_call>", "</tool_call>")

    def decode(self, calls: str) -> list[tuple[str, Any]]:
        """Each call: `<tool_call>` JSON `</tool_call>` (the last one may be left open)."""
        pieces = calls.split(self.markers[0])[1:]
        return [_call(json.loads(piece.strip().removesuffix("</tool_call>")), "arguments") for piece in pieces]


class Llama3Json(ToolCallParser):
    markers = ("<|python_tag|>", "{")
    special_tokens = ("<|python_tag|>",)

    def calls_start(self, text: str) -> int | None:
        body = text.lstrip()
        return len(text) - len(body) if body.startswith(self.markers) else None

    def held_back(self, text: str) -> int:
        """All of it while it may still begin with a marker (blank, or a marker's prefix)."""
        body = text.lstrip()
        return len(text) if any(m.startswith(body) for m in self.markers) else 0

    def decode(self, calls: str) -> list[tuple[str, Any]]:
        """JSON objects joined by `;` (one inside a JSON string is part of the string)."""
        rest, found = calls.removeprefix(self.markers[0]), []
        while True:
            rest = rest.lstrip()
            value, end = json.JSONDecoder().raw_decode(rest)
            found.append(_call(value, "parameters"))
            rest = rest[end:].lstrip()
            if not rest:
                return found
            if rest[0] != ";":
                raise ValueError("calls are joined by `;`")
            rest = rest[1:]


class Mistral(ToolCallParser):
    markers = special_tokens = ("[TOOL_CALLS]",)

    def decode(self, calls: str) -> list[tuple[str, Any]]:
        value = json.loads(calls.removeprefix(self.markers[0]))
        if not isinstance(value, list):
            raise ValueError("[TOOL_CALLS] is followed by a JSON array")
        return [_call(item, "arguments") for item in value]


class _Forced(ToolCallParser):
    """An output the grammar made a tool call from its first token: all of it is the calls."""

    def calls_start(self, text: str) -> int | None:
        return 0


class RequiredCalls(_Forced):
    """tool_choice "required": a JSON array of {"name", "parameters"} (`required_schema`)."""

    def decode(self, calls: str) -> list[tuple[str, Any]]:
        value = json.loads(calls)
        if not isinstance(value, list):
            raise ValueError("the calls are a JSON array")
        return [_call(item, "parameters") for item in value]


class NamedCall(_Forced):
    """A named tool_choice: the output is the arguments of the one function in `names`."""

    def decode(self, calls: str) -> list[tuple[str, Any]]:
        [name] = self.names
        arguments = json.loads(calls)
        if not isinstance(arguments, dict):
            raise ValueError("the arguments are a JSON object")
        return [(name, arguments)]


PARSERS: dict[str, type[ToolCallParser]] = {"hermes": Hermes, "llama3_json": Llama3Json, "mistral": Mistral}


def detect_parser(template: str) -> str | None:
    """The parser of the format a chat template's text teaches, or None if it shows none."""
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or ('"parameters"' in template and "ipython" in template):
        return "llama3_json"
    return None


def parser_named(name: str | None, template: str | None) -> type[ToolCallParser] | None:
    """The parser `name` (None: the one `template` shows, if any). KilnError for an unknown name."""
    if name is None:
        name = detect_parser(template or "")
        return None if name is None else PARSERS[name]
    if name not in PARSERS:
        raise KilnError(f"unknown tool-call parser {name!r}; choose one of {', '.join(PARSERS)}")
    return PARSERS[name]


def keeps_special_tokens(parser: ToolCallParser, tokenizer: Tokenizer) -> bool:
    """Whether outputs read by `parser` must keep special tokens: some of its markers are special
    tokens of `tokenizer`, which `skip_special_tokens` would drop from the text."""
    special = {token.content for token in tokenizer.get_added_tokens_decoder().values() if token.special}
    return not special.isdisjoint(parser.special_tokens)


NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def parameters_schema(tool: dict) -> dict:
    """The JSON schema of a tool's arguments (a function without `parameters` takes none)."""
    return tool["function"].get("parameters") or NO_PARAMETERS


def required_schema(tools: list[dict], parallel: bool) -> dict:
    """The JSON schema of tool_choice "required": an array of one call or more (one alone unless
    `parallel`), each {"name": <a tool's name>, "parameters": <its arguments>}."""
    calls = [{"type": "object", "properties": {"name": {"const": tool["function"]["name"]},
                                               "parameters": parameters_schema(tool)},
              "required": ["name", "parameters"], "additionalProperties": False} for tool in tools]
    return {"type": "array", "minItems": 1, **({} if parallel else {"maxItems": 1}), "items": {"anyOf": calls}}


@dataclass(frozen=True)
class ToolUse:
    """What a request's tools ask of the server (validated: unique names, known choice).

    tools: the request's tools as sent ([{"type": "function", "function": {"name", ...}}]), for the
    chat template. choice: "auto", "required", or the name of the function the output must call.
    parallel: whether the output may hold several calls ("required": the grammar allows one alone
    otherwise; "auto": only the first call is read)."""

    tools: list[dict]
    choice: str
    parallel: bool = True

    def grammar(self) -> StructuredOutput | None:
        """The JSON the output must be: none for "auto"; for "required" an array of calls; for a
        named function its arguments."""
        if self.choice == "auto":
            return None
        if self.choice == "required":
            schema = required_schema(self.tools, self.parallel)
        else:
            [schema] = [parameters_schema(t) for t in self.tools if t["function"]["name"] == self.choice]
        return StructuredOutput("json_schema", json.dumps(schema), origin="tools")

    def parser(self, auto: type[ToolCallParser] | None) -> ToolCallParser:
        """The parser of this request's outputs; `auto`: the server's parser for "auto" (KilnError
        naming `tools` when there is none)."""
        names = [tool["function"]["name"] for tool in self.tools]
        if self.choice == "required":
            return RequiredCalls(names)
        if self.choice != "auto":
            return NamedCall([self.choice])
        if auto is None:
            raise KilnError("the model's chat template shows no tool-call format kiln can read, so tool_choice "
                            f"\"auto\" cannot find calls; serve with a tool-call parser ({', '.join(PARSERS)}), "
                            'or use tool_choice "required" or a named function', param="tools")
        return auto(names, single=not self.parallel)


class CallStream:
    """One streamed output read for tool calls: `feed` each delta of its text (it returns the
    content to send now), then `finish` once the output ended."""

    def __init__(self, parser: ToolCallParser):
        self._parser = parser
        self._text = ""
        self._sent = 0  # characters of _text sent as content; always a prefix of the final content
        self._calls_begun = False

    def feed(self, delta: str) -> str:
        self._text += delta
        if self._calls_begun:
            return ""
        start = self._parser.calls_start(self._text)
        self._calls_begun = start is not None
        end = len(self._text) - self._parser.held_back(self._text) if start is None else \
            len(self._text[:start].rstrip())
        piece = self._text[self._sent:end]
        self._sent = max(self._sent, end)
        return piece

    def finish(self) -> ParsedOutput:
        """The content not sent yet, and the calls (as `parse` reads the whole text)."""
        parsed = self._parser.parse(self._text)
        return ParsedOutput((parsed.content or "")[self._sent:], parsed.calls)
