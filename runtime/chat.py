"""Render a model's jinja2 chat template over OpenAI-style messages.

The environment matches what Hugging Face templates expect: a sandboxed, immutable jinja2
environment with trim_blocks/lstrip_blocks, loop controls, `raise_exception(msg)`,
`strftime_now(fmt)` and a `tojson` filter that keeps non-ASCII text as is. Tools reach the
template as its `tools` variable, and the `arguments` of an assistant's tool calls as objects
(sent as JSON text; templates such as Qwen2.5's apply `tojson` to them), as vLLM gives them.
"""

import json
from datetime import datetime

import jinja2
import jinja2.meta
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kiln.errors import KilnError


class _TemplateRaised(Exception):
    """What `raise_exception` raises inside a template: the template rejected the messages."""


def _raise_exception(message: str):
    raise _TemplateRaised(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """A compiled chat template with the model's special token strings."""

    def __init__(self, template: str, *, bos_token: str = "", eos_token: str = ""):
        env = _environment()
        try:
            self._template = env.from_string(template)
            self.renders_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(template))
        except jinja2.TemplateSyntaxError as e:
            raise KilnError(f"the model's chat template does not parse (line {e.lineno}: {e.message}); "
                            "fix chat_template in the tokenizer config") from e
        self.source = template
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: list[dict], add_generation_prompt: bool = True, *, tools: list[dict] | None = None) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]); with
        add_generation_prompt the text ends where the assistant's reply begins. `tools`: OpenAI
        tools ([{"type": "function", "function": {"name", ...}}]) for a template that renders them."""
        if tools and not self.renders_tools:
            raise KilnError("the model's chat template does not render tools (it never reads `tools`), so the model "
                            "would not see them; send the request without tools, or serve a model whose template "
                            "supports tool calling", param="tools")
        try:
            return self._template.render(
                messages=normalize_messages(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token, tools=tools)
        except _TemplateRaised as e:
            raise KilnError(f"the chat template rejected the messages: {e}") from e
        except (jinja2.TemplateError, TypeError, ValueError) as e:  # e.g. a template adding a null content
            raise KilnError(f"the chat template failed on these messages ({type(e).__name__}: {e}); "
                            "check the roles and contents the model's template expects") from e


def normalize_messages(messages: list[dict]) -> list[dict]:
    """Validate OpenAI-style messages; list-of-parts content becomes its text parts joined by
    newlines, and the JSON text `arguments` of tool_calls their value. Other keys (name,
    tool_call_id) pass through."""
    if not isinstance(messages, list) or not messages:
        raise KilnError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    normalized = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise KilnError(f"messages[{i}] must be an object with a string 'role', got {message!r}")
        content = message.get("content")
        if isinstance(content, list):
            content = "\n".join(_text_part(part, i) for part in content)
        elif content is not None and not isinstance(content, str):
            raise KilnError(f"messages[{i}].content must be a string or a list of text parts, got {content!r}")
        tool_calls = message.get("tool_calls")
        extra = {"tool_calls": [_parsed_arguments(call, i) for call in tool_calls]} if tool_calls else {}
        normalized.append({**message, "content": content, **extra})
    return normalized


def _parsed_arguments(call, index: int):
    """A tool call ({"function": {"name", "arguments"}, ...}) with its JSON text arguments parsed."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        return {**call, "function": {**function, "arguments": json.loads(function["arguments"])}}
    except (ValueError, RecursionError) as e:
        raise KilnError(f"messages[{index}] has a tool call whose arguments are not JSON ({e}); "
                        "send them as the JSON text the model gave") from e


def _text_part(part, index: int) -> str:
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    raise KilnError(f"messages[{index}].content has a part that is not text ({part!r}); "
                    "only text content is supported")
