"""Tool calling over the OpenAI API (official client) against the tiny random Llama served with a
Qwen2.5-style template that renders tools (tests/data/hermes_tools.jinja; the hermes parser is
found in it): "required" and named tool_choice give calls whose arguments follow the tool's
schema (the grammar forces them), whole and streamed; "auto" leaves the random model's text as
content; a tool call and its result render into the next prompt; bad tools are 400s naming the
field, and the server keeps serving."""

import json
from collections import defaultdict

import jsonschema
import openai
import pytest

from kiln.errors import KilnError
from kiln.runtime.server import build_app

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city over the next days",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
MESSAGES = [{"role": "user", "content": "What's the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_time"}}


def check_calls(calls: list[tuple[str, str]]) -> None:
    """Each (name, arguments) names a tool, and its arguments are JSON that follows its schema."""
    assert calls
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def whole_calls(choice) -> list[tuple[str, str]]:
    assert all(call.type == "function" and call.id.startswith("call_") for call in choice.message.tool_calls)
    assert len({call.id for call in choice.message.tool_calls}) == len(choice.message.tool_calls)
    return [(call.function.name, call.function.arguments) for call in choice.message.tool_calls]


def streamed(stream) -> dict[int, tuple[str, list[tuple[str, str]], str]]:
    """Per choice index: its content, its calls (deltas accumulated by call index, as clients do)
    and its finish_reason."""
    content: dict[int, str] = defaultdict(str)
    calls: dict[int, dict[int, dict]] = defaultdict(dict)
    finish = {}
    for chunk in stream:
        for choice in chunk.choices:
            content[choice.index] += choice.delta.content or ""
            for delta in choice.delta.tool_calls or ():
                call = calls[choice.index].setdefault(delta.index, {"id": delta.id, "name": "", "arguments": ""})
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    assert all(call["id"].startswith("call_") for per_choice in calls.values() for call in per_choice.values())
    return {i: (content[i], [(c["name"], c["arguments"]) for _, c in sorted(calls[i].items())], finish[i])
            for i in finish}


@pytest.mark.parametrize("parallel", [True, False])
def test_required_gives_calls_that_follow_the_schemas(tool_server, parallel):
    client = tool_server.client()
    request = dict(model=tool_server.model, messages=MESSAGES, tools=TOOLS, tool_choice="required", n=3,
                   temperature=1.0, seed=7, max_tokens=200, parallel_tool_calls=parallel)
    reply = client.chat.completions.create(**request)
    assert len(reply.choices) == 3
    whole = {}
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        whole[choice.index] = whole_calls(choice)
        check_calls(whole[choice.index])
        assert parallel or len(whole[choice.index]) == 1
    stream = streamed(client.chat.completions.create(**request, stream=True))
    assert stream == {i: ("", calls, "tool_calls") for i, calls in whole.items()}  # same seed, same calls


def test_a_named_function_is_called(tool_server):
    client = tool_server.client()
    request = dict(model=tool_server.model, messages=MESSAGES, tools=TOOLS, tool_choice=NAMED, temperature=1.0,
                   max_tokens=100, seed=3)
    [choice] = client.chat.completions.create(**request).choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = whole_calls(choice)
    assert [name for name, _ in calls] == ["get_time"]
    check_calls(calls)
    assert streamed(client.chat.completions.create(**request, stream=True)) == {0: ("", calls, "tool_calls")}


def test_auto_leaves_the_random_text_as_content(tool_server, tool_llm):
    """The random model's reply is no call: it is the content, exactly what the same prompt
    (with the tools rendered into it) completes to."""
    client = tool_server.client()
    reply = client.chat.completions.create(model=tool_server.model, messages=MESSAGES, tools=TOOLS, temperature=0,
                                           max_tokens=12)
    prompt = tool_llm.tokenizer.encode(tool_llm.chat_template.render(MESSAGES, tools=TOOLS), add_special_tokens=False).ids
    completion = client.completions.create(model=tool_server.model, prompt=prompt, temperature=0, max_tokens=12)
    [choice] = reply.choices
    assert choice.message.tool_calls is None and choice.finish_reason == "length"
    assert choice.message.content == completion.choices[0].text
    assert reply.usage.prompt_tokens == len(prompt)
    stream = client.chat.completions.create(model=tool_server.model, messages=MESSAGES, tools=TOOLS, temperature=0,
                                            max_tokens=12, stream=True)
    assert streamed(stream) == {0: (completion.choices[0].text, [], "length")}
    schema = {"type": "json_schema", "json_schema": {"name": "time", "schema": SCHEMAS["get_time"]}}
    [json_choice] = client.chat.completions.create(model=tool_server.model, messages=MESSAGES, tools=TOOLS,
                                                   tool_choice="auto", response_format=schema, max_tokens=64).choices
    assert json_choice.finish_reason == "stop" and json_choice.message.tool_calls is None
    jsonschema.validate(json.loads(json_choice.message.content), SCHEMAS["get_time"])


def test_tool_choice_none_renders_no_tools(tool_server):
    client = tool_server.client()
    plain = client.chat.completions.create(model=tool_server.model, messages=MESSAGES, temperature=0, max_tokens=6)
    none = client.chat.completions.create(model=tool_server.model, messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                          temperature=0, max_tokens=6)
    auto = client.chat.completions.create(model=tool_server.model, messages=MESSAGES, tools=TOOLS, temperature=0,
                                          max_tokens=6)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < auto.usage.prompt_tokens
    assert none.choices[0].message.content == plain.choices[0].message.content


def test_a_call_and_its_result_go_back_to_the_model(tool_server, tool_llm):
    """The whole flow: a forced call, then the assistant's call and the tool's result sent back."""
    client = tool_server.client()
    [call] = client.chat.completions.create(model=tool_server.model, messages=MESSAGES, tools=TOOLS,
                                            tool_choice=NAMED, max_tokens=100, seed=1).choices[0].message.tool_calls
    history = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "12:00 UTC"}]
    reply = client.chat.completions.create(model=tool_server.model, messages=history, tools=TOOLS, max_tokens=4)
    rendered = tool_llm.chat_template.render(history, tools=TOOLS)
    called = f'<tool_call>\n{{"name": "get_time", "arguments": {json.dumps(json.loads(call.function.arguments))}}}'
    assert called in rendered and "<tool_response>\n12:00 UTC\n</tool_response>" in rendered
    assert reply.usage.prompt_tokens == len(tool_llm.tokenizer.encode(rendered, add_special_tokens=False).ids)


def bad_tool(**function) -> list[dict]:
    return [{"type": "function", "function": function}]


UNENFORCEABLE = bad_tool(name="f", parameters={"type": "object", "properties": {"a": {"type": "nonsense"}}})
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}


@pytest.mark.parametrize("fields, param, fragment", [
    (dict(tools=bad_tool(description="no name")), "tools", "`tools[0].function.name` is required"),
    (dict(tools=bad_tool(name="get weather")), "tools", "tools[0].function.name"),
    (dict(tools=bad_tool(name="f" * 65)), "tools", "1 to 64 letters"),
    (dict(tools=[WEATHER, TIME, WEATHER]), "tools", "several functions named get_weather"),
    (dict(tools=bad_tool(name="f", parameters={"type": "string"})), "tools", '"type": "object"'),
    (dict(tools=bad_tool(name="f", parameters=["city"])), "tools", "tools[0].function.parameters"),
    (dict(tools=[{"type": "retrieval", "function": {"name": "f"}}]), "tools", "tools[0].type"),
    (dict(tools=[]), "tools", "tools"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_tide"}}), "tool_choice",
     "'get_tide', which is not among tools"),
    (dict(tool_choice="required"), "tool_choice", "tool_choice needs tools"),
    (dict(tools=TOOLS, tool_choice="sometimes"), "tool_choice", "tool_choice"),
    (dict(tools=UNENFORCEABLE, tool_choice="required"), "tools", "tools' JSON schema cannot be enforced"),
    (dict(tools=UNENFORCEABLE, tool_choice={"type": "function", "function": {"name": "f"}}), "tools",
     "cannot be enforced"),
    (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "response_format",
     "cannot be combined"),
    (dict(messages=[*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                    {"role": "tool", "content": "12:00"}]), "messages", "messages[2].tool_call_id"),
    (dict(messages=[*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {**CALL, "function": {"name": "get_time", "arguments": "{zone: UTC"}}]}]), "messages", "JSON text"),
])
def test_bad_tools_are_400s_naming_the_field(tool_server, fields, param, fragment):
    client = tool_server.client()
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(**{"model": tool_server.model, "messages": MESSAGES, "max_tokens": 4, **fields})
    assert error.value.param == param and fragment in error.value.message
    assert client.chat.completions.create(model=tool_server.model, messages=MESSAGES, max_tokens=2).choices


def test_tools_need_a_template_that_renders_them(tiny_server):
    """tiny_server's template (SmolLM2's) never reads `tools`: the model would not see them."""
    client = tiny_server.client()
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=tiny_server.model, messages=MESSAGES, tools=TOOLS, tool_choice="required")
    assert error.value.param == "tools" and "does not render tools" in error.value.message
    none = client.chat.completions.create(model=tiny_server.model, messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                          max_tokens=2)
    assert none.choices[0].message.tool_calls is None


def test_an_unknown_parser_is_refused_at_start(tool_llm):
    with pytest.raises(KilnError, match="unknown tool-call parser 'qwen'; choose one of hermes, llama3_json, mistral"):
        build_app(tool_llm, tool_call_parser="qwen")
