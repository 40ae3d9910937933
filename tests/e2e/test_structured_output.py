"""Structured output through the engine (xgrammar masks each constrained row's logits): on a tiny
random model with SmolLM2's tokenizer, 100 requests sampled at temperature 1 under a JSON schema
all end in JSON that parses and validates; unconstrained requests batched with them get the tokens
they get alone; a schema that cannot be enforced is refused before anything is queued."""

import json

import jsonschema
import pytest

import kiln
from kiln.errors import KilnError
from kiln.runtime.sampling_params import SamplingParams, StructuredOutput

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["name", "age", "member", "color", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return kiln.LLM(str(tiny_model_dir), kv_cache_memory=64 << 20, max_model_len=512, progress=False)


def test_sampled_outputs_always_follow_the_schema(llm):
    params = SamplingParams(temperature=1.0, max_tokens=96, seed=None,
                            structured_output=StructuredOutput("json_schema", json.dumps(SCHEMA)))
    outs = llm.generate([f"Person {i}:" for i in range(100)], params)
    texts = [out.outputs[0].text for out in outs]
    for out, text in zip(outs, texts):
        assert out.outputs[0].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 90  # sampled, not one answer


def test_the_grammar_ends_the_output_despite_ignore_eos_and_min_tokens(llm):
    params = SamplingParams(temperature=1.0, max_tokens=96, ignore_eos=True, min_tokens=40, seed=3,
                            structured_output=StructuredOutput("json_schema", json.dumps(SCHEMA)))
    for out in llm.generate(["A:", "B:", "C:"], params):
        assert out.outputs[0].finish_reason == "stop" and len(out.outputs[0].token_ids) < 96
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)


def test_unconstrained_requests_in_the_batch_are_untouched(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(["The sky is", "One two"], greedy)]
    constrained = SamplingParams(temperature=0.0, max_tokens=64, structured_output=StructuredOutput("json_object"))
    engine = llm.engine
    engine.add_request("a", llm.encode("The sky is"), greedy)
    engine.add_request("json", llm.encode("Data:"), constrained)
    engine.add_request("b", llm.encode("One two"), greedy)
    final = {}
    while engine.has_unfinished_requests():
        final.update({o.request_id: o.outputs[0] for o in engine.step() if o.finished})
    assert [final["a"].token_ids, final["b"].token_ids] == alone
    assert final["json"].text.startswith("{")
    if final["json"].finish_reason == "stop":
        assert isinstance(json.loads(final["json"].text), dict)


def test_a_schema_that_cannot_be_enforced_is_refused(llm):
    bad = StructuredOutput("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "nonsense"}}}))
    with pytest.raises(KilnError, match="response_format's JSON schema cannot be enforced: .*nonsense"):
        llm.engine.add_request("bad", [1, 2, 3], SamplingParams(structured_output=bad))
    assert not llm.engine.has_unfinished_requests()
