"""SamplingParams validation: every bad value names its field and the allowed range."""

import pytest

from kiln.errors import KilnError
from kiln.runtime.sampling_params import SamplingParams


@pytest.mark.parametrize("field, value, allowed", [
    ("n", 0, r">= 1"),
    ("temperature", -0.1, r"\[0, 100\]"),
    ("temperature", float("nan"), r"\[0, 100\]"),
    ("top_k", -2, r">= 0"),
    ("top_p", 0.0, r"\(0, 1\]"),
    ("top_p", 1.5, r"\(0, 1\]"),
    ("min_p", -0.1, r"\[0, 1\]"),
    ("repetition_penalty", 0.0, r"> 0"),
    ("presence_penalty", 2.5, r"\[-2, 2\]"),
    ("frequency_penalty", -3, r"\[-2, 2\]"),
    ("seed", -1, r"\[0, "),
    ("max_tokens", 0, r">= 1"),
    ("min_tokens", -1, r"\[0, 16\]"),
    ("logprobs", 21, r"\[0, 20\]"),
    ("n", 1.5, r">= 1"),
    ("temperature", "hot", r"\[0, 100\]"),
    ("ignore_eos", 1, "true or false"),
])
def test_bad_values_name_the_field_and_range(field, value, allowed):
    with pytest.raises(KilnError, match=rf"SamplingParams\.{field} must be .*{allowed}"):
        SamplingParams(**{field: value})


def test_min_tokens_cannot_exceed_max_tokens():
    with pytest.raises(KilnError, match=r"min_tokens must be an integer in \[0, 4\]"):
        SamplingParams(max_tokens=4, min_tokens=5)
    assert SamplingParams(max_tokens=None, min_tokens=500).min_tokens == 500


def test_stop_lists():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"], stop_token_ids=[3]).stop_token_ids == (3,)
    with pytest.raises(KilnError, match="non-empty strings"):
        SamplingParams(stop=[""])
    with pytest.raises(KilnError, match="non-negative token ids"):
        SamplingParams(stop_token_ids=[-1])


def test_greedy_and_disabled_top_k():
    assert SamplingParams(temperature=0).is_greedy and not SamplingParams(temperature=0.5).is_greedy
    assert SamplingParams(top_k=-1).top_k == 0
