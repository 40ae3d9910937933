"""Chat templates against transformers' apply_chat_template, and the errors a user can cause."""

import json
from pathlib import Path

import pytest

from kiln.errors import KilnError
from kiln.runtime.chat import ChatTemplate

CHATML = (  # SmolLM2-Instruct's template
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ALTERNATING = (  # Mistral-style: bos_token, eos_token, raise_exception, whitespace control
    "{{ bos_token }}\n"
    "{% for message in messages %}\n"
    "    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {% endif %}\n"
    "    {% if message['role'] == 'user' %}\n"
    "        {{ '[INST] ' + message['content'] + ' [/INST]' }}\n"
    "    {% else %}\n"
    "        {{ message['content'] + eos_token }}\n"
    "    {% endif %}\n"
    "{% endfor %}\n"
    "{% if messages | length > 1 %}{{ messages | tojson }}{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo 🦊"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! ünïcode"},
     {"role": "user", "content": "Tell me a joke"}],
]


CASES = [(CHATML, c) for c in range(3)] + [(ALTERNATING, 0), (ALTERNATING, 2)]  # ALTERNATING rejects system


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("template, conversation", CASES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_matches_transformers(hf_tokenizer, template, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    expected = hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                add_generation_prompt=add_generation_prompt)
    ours = ChatTemplate(template, bos_token="<s>", eos_token="</s>").render(messages, add_generation_prompt)
    assert ours == expected


def test_text_parts_are_joined():
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert ChatTemplate(CHATML).render(parts) == ChatTemplate(CHATML).render([{"role": "user", "content": "a\nb"}])


@pytest.mark.parametrize("messages, match", [
    ([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}], "roles must alternate"),
    ([], "non-empty list"),
    ([{"content": "no role"}], r"messages\[0\]"),
    ([{"role": "user", "content": 3}], r"messages\[0\]\.content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "only text"),
])
def test_bad_messages_raise_kiln_error(messages, match):
    with pytest.raises(KilnError, match=match):
        ChatTemplate(ALTERNATING).render(messages)


def test_bad_template_raises_kiln_error():
    with pytest.raises(KilnError, match="does not parse"):
        ChatTemplate("{% for m in messages %}{{ m.content }")
    with pytest.raises(KilnError, match="failed on these messages"):
        ChatTemplate("{{ messages[0].content.missing_method() }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(KilnError, match="failed on these messages.*TypeError"):  # a template that adds a null content
        ChatTemplate("{{ messages[0].content + '!' }}").render([{"role": "user", "content": None}])
    with pytest.raises(KilnError):  # the sandbox refuses attribute access to internals
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([{"role": "user", "content": "x"}])


HERMES_TOOLS = (Path(__file__).resolve().parents[1] / "data" / "hermes_tools.jinja").read_text()  # Qwen2.5-style
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Today's weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
TOOL_CONVERSATION = [  # a whole tool-calling turn: the call (arguments as JSON text, as OpenAI sends), its result
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"},
]


def test_tools_and_tool_calls_render_as_transformers_does(hf_tokenizer):
    """transformers gets the arguments as a dict (as vLLM hands them to templates); we get JSON text."""
    as_dicts = [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                                     for c in m["tool_calls"]]} if "tool_calls" in m else m for m in TOOL_CONVERSATION]
    expected = hf_tokenizer.apply_chat_template(as_dicts, tools=TOOLS, chat_template=HERMES_TOOLS, tokenize=False,
                                                add_generation_prompt=True)
    ours = ChatTemplate(HERMES_TOOLS).render(TOOL_CONVERSATION, tools=TOOLS)
    assert ours == expected
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in ours
    assert "<tool_response>\n22 C, sunny\n</tool_response>" in ours
    assert json.dumps(TOOLS[0]) in ours
    assert "<tools>" not in ChatTemplate(HERMES_TOOLS).render(TOOL_CONVERSATION[:1])


def test_tools_need_a_template_that_renders_them():
    assert ChatTemplate(HERMES_TOOLS).renders_tools and not ChatTemplate(CHATML).renders_tools
    with pytest.raises(KilnError, match="does not render tools") as error:
        ChatTemplate(CHATML).render(TOOL_CONVERSATION[:1], tools=TOOLS)
    assert error.value.param == "tools"
    bad = [{**TOOL_CONVERSATION[1], "tool_calls": [{"function": {"name": "get_weather", "arguments": "{city"}}]}]
    with pytest.raises(KilnError, match=r"messages\[0\] has a tool call whose arguments are not JSON"):
        ChatTemplate(HERMES_TOOLS).render(bad, tools=TOOLS)
