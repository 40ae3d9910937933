"""response_format over the OpenAI API (official client, the tiny random model): a json_schema
reply parses and validates, streamed or not; a schema kiln cannot enforce, or json_schema without
a schema, is a 400 that names response_format."""

import json

import jsonschema
import openai
import pytest

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                           "rank": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["city", "rank"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
MESSAGES = [{"role": "user", "content": "Name a city."}]


def test_a_json_schema_reply_validates(tiny_server):
    client = tiny_server.client()
    reply = client.chat.completions.create(model=tiny_server.model, messages=MESSAGES, response_format=FORMAT,
                                           temperature=1.0, max_tokens=64, n=3)
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    stream = client.chat.completions.create(model=tiny_server.model, messages=MESSAGES, response_format=FORMAT, temperature=1.0,
                                            max_tokens=64, stream=True)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices)), SCHEMA)
    text = client.completions.create(model=tiny_server.model, prompt="City:", max_tokens=64,
                                     extra_body={"response_format": FORMAT})
    jsonschema.validate(json.loads(text.choices[0].text), SCHEMA)


@pytest.mark.parametrize("response_format, fragment", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, "cannot be enforced"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "needs json_schema.schema"),
    ({"type": "yaml"}, "response_format"),
])
def test_a_bad_response_format_is_a_400(tiny_server, response_format, fragment):
    with pytest.raises(openai.BadRequestError) as error:
        tiny_server.client().chat.completions.create(model=tiny_server.model, messages=MESSAGES, response_format=response_format)
    assert fragment in str(error.value)
    assert tiny_server.client().models.list().data  # still serving
