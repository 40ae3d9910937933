"""Render a model's jinja2 chat template over OpenAI-style messages.

The environment matches what Hugging Face templates expect: a sandboxed, immutable jinja2
environment with trim_blocks/lstrip_blocks, loop controls, `raise_exception(msg)`,
`strftime_now(fmt)` and a `tojson` filter that keeps non-ASCII text as is.
"""

import json
from datetime import datetime

import jinja2
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
        try:
            self._template = _environment().from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise KilnError(f"the model's chat template does not parse (line {e.lineno}: {e.message}); "
                            "fix chat_template in the tokenizer config") from e
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]); with
        add_generation_prompt the text ends where the assistant's reply begins."""
        try:
            return self._template.render(
                messages=normalize_messages(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token)
        except _TemplateRaised as e:
            raise KilnError(f"the chat template rejected the messages: {e}") from e
        except (jinja2.TemplateError, TypeError, ValueError) as e:  # e.g. a template adding a null content
            raise KilnError(f"the chat template failed on these messages ({type(e).__name__}: {e}); "
                            "check the roles and contents the model's template expects") from e


def normalize_messages(messages: list[dict]) -> list[dict]:
    """Validate OpenAI-style messages; list-of-parts content becomes its text parts joined by
    newlines. Other keys (name, tool_calls, tool_call_id) pass through."""
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
        normalized.append({**message, "content": content})
    return normalized


def _text_part(part, index: int) -> str:
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    raise KilnError(f"messages[{index}].content has a part that is not text ({part!r}); "
                    "only text content is supported")
