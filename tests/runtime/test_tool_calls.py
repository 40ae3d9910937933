"""Tool-call parsers on hand-written model outputs (whole and streamed in every split), their
detection from chat templates, the grammar schemas of tool_choice "required" / named, and
markers that are special tokens."""

import json
from pathlib import Path

import jsonschema
import pytest
from tokenizers import Tokenizer

from kiln.errors import KilnError
from kiln.runtime.detokenizer import IncrementalDetokenizer, TokenDecoder
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.tool_calls import (
    PARSERS,
    CallStream,
    Hermes,
    Llama3Json,
    Mistral,
    NamedCall,
    ParsedOutput,
    RequiredCalls,
    ToolCall,
    ToolUse,
    detect_parser,
    keeps_special_tokens,
    parser_named,
    required_schema,
)

NAMES = ("get_weather", "add")
WEATHER = ToolCall("get_weather", '{"city": "Paris"}')
ADD = ToolCall("add", '{"a": 1, "b": [2, "x;y"]}')


def as_content(parser_class, text: str) -> tuple:
    """A case whose whole output is content: it holds no well-formed calls to known functions."""
    return parser_class, text, text, []


# (parser class, model output, expected content, expected calls)
CASES = [
    # hermes
    (Hermes, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None, [WEATHER]),
    (Hermes, 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": [2, "x;y"]}}\n</tool_call>',
     "Let me check.", [WEATHER, ADD]),
    (Hermes, '<tool_call>{"name": "add", "arguments": {"a": 1, "b": [2, "x;y"]}}', None, [ADD]),  # left open at EOS
    as_content(Hermes, "No tools needed: 2 + 2 = 4."),
    as_content(Hermes, 'Hi <tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>'),  # bad JSON
    as_content(Hermes, '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>'),  # not one of the tools
    as_content(Hermes, '<tool_call>\n{"name": "add", "arguments": {}}\n</tool_call> and more text'),
    as_content(Hermes, '<tool_call>\n{"name": "get_weather", "arguments": "Paris"}\n</tool_call>'),  # not an object
    # llama3_json
    (Llama3Json, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [WEATHER]),
    (Llama3Json, ' {"name": "get_weather", "parameters": {"city": "Paris"}}', None, [WEATHER]),
    (Llama3Json, '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                 '{"name": "add", "parameters": {"a": 1, "b": [2, "x;y"]}}', None, [WEATHER, ADD]),
    as_content(Llama3Json, 'The answer is {"name": "add", "parameters": {}}.'),  # calls begin the output
    as_content(Llama3Json, '{"name": "get_weather", "parameters": {"city": "Par'),  # cut short
    as_content(Llama3Json, '{"name": "get_weather", "arguments": {"city": "Paris"}}'),  # Llama 3 says "parameters"
    as_content(Llama3Json, '{"name": "add", "parameters": {}} {"name": "add", "parameters": {}}'),  # no `;`
    as_content(Llama3Json, '{"name": "nope", "parameters": {}}'),
    # mistral
    (Mistral, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', None, [WEATHER]),
    (Mistral, 'Sure. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
              '{"name": "add", "arguments": {"a": 1, "b": [2, "x;y"]}}]', "Sure.", [WEATHER, ADD]),
    as_content(Mistral, '[TOOL_CALLS]{"name": "get_weather", "arguments": {}}'),  # not an array
    as_content(Mistral, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}'),  # unclosed
    as_content(Mistral, "[TOOL_CALL] is not the marker, nor is [TOOL_CALLS"),
]


@pytest.mark.parametrize("parser_class, text, content, calls", CASES)
def test_parse(parser_class, text, content, calls):
    assert parser_class(NAMES).parse(text) == ParsedOutput(content, tuple(calls))


def stream(parser, pieces: list[str]) -> tuple[str, tuple[ToolCall, ...]]:
    """The content a stream sends over `pieces`, and its calls."""
    s = CallStream(parser)
    sent = [s.feed(piece) for piece in pieces]
    rest = s.finish()
    return "".join(sent) + (rest.content or ""), rest.calls


@pytest.mark.parametrize("parser_class, text, content, calls", CASES)
def test_a_stream_split_anywhere_reads_as_the_whole(parser_class, text, content, calls):
    """Every split into 3 deltas (empty ones included), and one character a delta."""
    parser = parser_class(NAMES)
    expected = (content or "", tuple(calls))
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            assert stream(parser, [text[:i], text[i:j], text[j:]]) == expected, (i, j)
    assert stream(parser, list(text)) == expected


@pytest.mark.parametrize("parser_class, text, held", [
    (Hermes, "Let me check. <tool_", " <tool_"), (Hermes, "x <", " <"), (Hermes, "a<tool_calX", ""),
    (Hermes, "fine\n\n", "\n\n"), (Mistral, "Sure [TOOL", " [TOOL"), (Llama3Json, "  <|pyth", "  <|pyth"),
    (Llama3Json, " ", " "), (Llama3Json, "Hello", ""),
])
def test_a_stream_holds_back_only_what_may_open_a_call(parser_class, text, held):
    s = CallStream(parser_class(NAMES))
    assert s.feed(text) == text[:len(text) - len(held)]


def test_content_before_a_call_streams_before_the_call_ends():
    s = CallStream(Hermes(NAMES))
    assert s.feed("The weather") == "The weather"
    assert s.feed(" is\n<tool_call>\n{\"name\": ") == " is"
    assert s.feed('"get_weather", "arguments": {"city": "Paris"}}</tool_call>') == ""
    assert s.finish() == ParsedOutput("", (WEATHER,))


def test_forced_outputs():
    required = RequiredCalls(NAMES)
    assert required.parse('[{"name": "get_weather", "parameters": {"city": "Paris"}}, '
                          '{"name": "add", "parameters": {"a": 1, "b": [2, "x;y"]}}]') == ParsedOutput(None, (WEATHER, ADD))
    assert required.parse('[{"name": "get_weather", "parameters": {"ci') == \
        ParsedOutput('[{"name": "get_weather", "parameters": {"ci')  # cut by max_tokens: content
    assert NamedCall(["get_weather"]).parse('{"city": "Paris"}') == ParsedOutput(None, (WEATHER,))
    assert stream(NamedCall(["get_weather"]), ['{"city"', ': "Paris"}']) == ("", (WEATHER,))


QWEN_LIKE = (Path(__file__).resolve().parents[1] / "data" / "hermes_tools.jinja").read_text()
MISTRAL_LIKE = ("{%- for message in messages %}{%- if message.tool_calls %}{{ '[TOOL_CALLS]' + message.tool_calls | "
                "tojson }}{%- endif %}{%- endfor %}")
LLAMA31_LIKE = ("{%- if message.tool_calls %}{{- '<|python_tag|>' + tool_call.name }}{% endif %}"
                "{{- '<|start_header_id|>ipython<|end_header_id|>' }}")
LLAMA32_LIKE = ("{{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name '"
                " }}{%- if message.role == 'ipython' %}{{ message.content }}{% endif %}")
CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


@pytest.mark.parametrize("template, name", [(QWEN_LIKE, "hermes"), (MISTRAL_LIKE, "mistral"),
                                            (LLAMA31_LIKE, "llama3_json"), (LLAMA32_LIKE, "llama3_json"),
                                            (CHATML, None)])
def test_detect_parser(template, name):
    assert detect_parser(template) == name
    assert parser_named(None, template) is (PARSERS[name] if name else None)


def test_a_parser_named_overrides_the_template():
    assert parser_named("mistral", QWEN_LIKE) is Mistral
    with pytest.raises(KilnError, match="unknown tool-call parser 'qwen'; choose one of hermes, llama3_json, mistral"):
        parser_named("qwen", QWEN_LIKE)


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city"], "additionalProperties": False}}}
PING_TOOL = {"type": "function", "function": {"name": "ping", "description": "no parameters"}}


@pytest.mark.parametrize("parallel", [True, False])
def test_required_schema(parallel):
    schema = json.loads(ToolUse([WEATHER_TOOL, PING_TOOL], "required", parallel).grammar().schema)
    assert schema == required_schema([WEATHER_TOOL, PING_TOOL], parallel)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    one = [{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}]
    two = [*one, {"name": "ping", "parameters": {}}]
    assert validator.is_valid(one)
    assert validator.is_valid(two) == parallel
    for bad in ([], [{"name": "get_weather"}], [{"name": "get_weather", "parameters": {"days": 2}}],
                [{"name": "get_weather", "parameters": {"city": "Paris", "country": "FR"}}],
                [{"name": "ping", "parameters": {"x": 1}}], [{"name": "pong", "parameters": {}}],
                [{"name": "ping", "parameters": {}, "id": 3}], {"name": "ping", "parameters": {}}):
        assert not validator.is_valid(bad), bad


def test_named_schema():
    weather = ToolUse([WEATHER_TOOL, PING_TOOL], "get_weather").grammar()
    assert weather.origin == "tools" and json.loads(weather.schema) == WEATHER_TOOL["function"]["parameters"]
    ping = jsonschema.Draft202012Validator(json.loads(ToolUse([WEATHER_TOOL, PING_TOOL], "ping").grammar().schema))
    assert ping.is_valid({}) and not ping.is_valid({"x": 1}) and not ping.is_valid([])
    assert ToolUse([WEATHER_TOOL], "auto").grammar() is None


def test_tool_use_parsers():
    use = ToolUse([WEATHER_TOOL, PING_TOOL], "auto")
    parser = use.parser(Hermes)
    assert isinstance(parser, Hermes) and parser.names == {"get_weather", "ping"} and not parser.single
    two = '<tool_call>{"name": "ping", "arguments": {}}</tool_call><tool_call>{"name": "ping", "arguments": {}}</tool_call>'
    assert len(parser.parse(two).calls) == 2
    assert ToolUse([WEATHER_TOOL, PING_TOOL], "auto", parallel=False).parser(Hermes).parse(two).calls == \
        (ToolCall("ping", "{}"),)  # parallel_tool_calls: false reads the first call only
    with pytest.raises(KilnError, match="hermes, llama3_json, mistral") as error:
        use.parser(None)
    assert error.value.param == "tools"
    assert isinstance(ToolUse([WEATHER_TOOL], "required").parser(None), RequiredCalls)
    named = ToolUse([WEATHER_TOOL, PING_TOOL], "ping").parser(None)
    assert isinstance(named, NamedCall) and named.names == {"ping"}


@pytest.mark.parametrize("parser_class", [Llama3Json, Mistral, Hermes])
def test_a_marker_that_is_a_special_token_is_kept(tokenizer, parser_class):
    """When the tokenizer holds the marker as a special token, skip_special_tokens would drop it
    and the call would read as content; the server then keeps special tokens."""
    marker = parser_class.special_tokens[0]
    with_marker = Tokenizer.from_str(tokenizer.to_str())
    with_marker.add_special_tokens([marker])
    assert keeps_special_tokens(parser_class(NAMES), with_marker)
    assert not keeps_special_tokens(parser_class(NAMES), tokenizer)
    [text] = [t for p, t, _, calls in CASES if p is parser_class and calls == [WEATHER] and t.startswith(marker)]
    ids = with_marker.encode(text).ids
    assert with_marker.token_to_id(marker) in ids

    def detokenized(skip_special_tokens: bool) -> str:
        detokenizer = IncrementalDetokenizer(TokenDecoder(with_marker), [1],
                                             SamplingParams(skip_special_tokens=skip_special_tokens))
        for token in ids:
            detokenizer.add_token(token)
        return detokenizer.output_text(finished=True)

    assert parser_class(NAMES).parse(detokenized(False)).calls == (WEATHER,)
    if parser_class is not Llama3Json:  # without its tag, a Llama 3 call is still a call
        assert parser_class(NAMES).parse(detokenized(True)).calls == ()
