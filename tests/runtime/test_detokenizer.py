"""Incremental detokenization against the tokenizer's one-shot decode, with a real byte-level BPE."""

import pytest

from kiln.runtime.detokenizer import IncrementalDetokenizer, TokenDecoder
from kiln.runtime.sampling_params import SamplingParams

TEXT = "Un café crème 🦊🐶 et 日本語のテキスト — the capital of France; the capital of Germany."


def _stream(tokenizer, token_ids, params, check_stop=True):
    """Feed tokens one by one; the visible text after each, and the stop string if one hit."""
    detok = IncrementalDetokenizer(TokenDecoder(tokenizer), tokenizer.encode("Prompt:").ids, params)
    visible = []
    for t in token_ids:
        stop = detok.add_token(t, check_stop)
        visible.append(detok.output_text(finished=stop is not None))
        if stop is not None:
            return visible, stop
    return visible, None


def test_multibyte_characters_are_never_cut(tokenizer):
    ids = tokenizer.encode(TEXT).ids
    assert any(tokenizer.decode([t]).endswith("\ufffd") for t in ids), "the test text should split a character"
    visible, _ = _stream(tokenizer, ids, SamplingParams())
    for text in visible:
        assert "\ufffd" not in text and TEXT.startswith(text)
    assert visible[-1] == TEXT


@pytest.mark.parametrize("stop", ["capital of Germany", "🐶", "of Fr", "; the"])
def test_stop_strings_are_never_leaked(tokenizer, stop):
    ids = tokenizer.encode(TEXT).ids
    visible, hit = _stream(tokenizer, ids, SamplingParams(stop=[stop, "never appears"]))
    expected = TEXT[: TEXT.index(stop)]
    assert hit == stop and visible[-1] == expected
    for before, after in zip(visible, visible[1:]):
        assert after.startswith(before)
    assert all(stop not in text and expected.startswith(text) for text in visible)


def _held_back(text: str, stop: str) -> int:
    """Naively: the longest k < len(stop) with text ending in stop[:k]."""
    return max([k for k in range(1, len(stop)) if text.endswith(stop[:k])], default=0)


def test_stop_string_split_across_tokens_is_held_back_until_resolved(tokenizer):
    stop = "capital of Germany"
    ids = tokenizer.encode(TEXT).ids
    assert not any(stop in tokenizer.decode([t]) for t in ids), "the stop string must span tokens"
    visible, hit = _stream(tokenizer, ids, SamplingParams(stop=[stop]))
    assert hit == stop
    held = 0
    for i, text in enumerate(visible[:-1]):
        decoded = tokenizer.decode(ids[: i + 1])
        if decoded.endswith("\ufffd"):
            continue
        expected = decoded[: len(decoded) - _held_back(decoded, stop)]
        assert text == expected
        held = max(held, len(decoded) - len(text))
    # "capital of France" starts like the stop string: shown only once it diverges.
    assert held >= len("capital of ")
    assert TEXT[: TEXT.index("France") + len("France")] in visible[-1]


def test_below_min_tokens_stop_strings_do_not_stop(tokenizer):
    ids = tokenizer.encode(TEXT).ids
    visible, hit = _stream(tokenizer, ids, SamplingParams(stop=["café"]), check_stop=False)
    assert hit is None and visible[-1] == TEXT


def test_engine_stop_string_in_generated_text(make_engine, run):
    prompt = [5, 17, 42, 99]
    base = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    free = run(make_engine(), {0: [("f", prompt, base)]})["f"].outputs[0]
    stop = free.text[10:14]
    assert stop and stop not in free.text[:10]
    engine = make_engine()
    engine.add_request("s", prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]))
    streamed, final = "", None
    while engine.has_unfinished_requests():
        for out in engine.step():
            streamed += out.outputs[0].delta_text
            assert stop not in streamed
            final = out
    completion = final.outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    assert completion.text == streamed == free.text[:10]
    assert list(completion.token_ids) == list(free.token_ids[: len(completion.token_ids)])


class _PlainDecoder:
    """TokenDecoder's interface without its memo: every window through tokenizer.decode."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def decode(self, ids, skip_special_tokens):
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_token_decoder_equals_the_tokenizer(tokenizer):
    decoder = TokenDecoder(tokenizer)
    ids = tokenizer.encode(TEXT).ids + [0, 1]  # <eos>, <pad>: special tokens
    for _ in range(2):  # the second pass reads the memo
        for skip in (True, False):
            for t in range(tokenizer.get_vocab_size()):
                assert decoder.decode([t], skip) == tokenizer.decode([t], skip_special_tokens=skip)
            for i in range(len(ids)):
                window = ids[max(0, i - 3):i + 1]
                assert decoder.decode(window, skip) == tokenizer.decode(window, skip_special_tokens=skip)


@pytest.mark.parametrize("skip", [True, False])
def test_shared_memoized_decoder_streams_as_plain_decodes(tokenizer, skip):
    """Sequences of an engine share one TokenDecoder, interleaved token by token: each streams
    exactly what it streams alone through plain decodes (characters split across tokens, stop
    strings, special tokens and min_tokens included)."""
    eos = 0
    texts = [TEXT, "日本語のテキストも少し", "🦊🐶🎉 and 👩‍💻 too", "the capital of France; the capital of Germany."]
    streams = [tokenizer.encode(t).ids for t in texts]
    streams[1] = streams[1][:4] + [eos] + streams[1][4:]
    params = [SamplingParams(skip_special_tokens=skip), SamplingParams(skip_special_tokens=skip, stop=["テキスト"]),
              SamplingParams(skip_special_tokens=skip, stop=["🎉 a"]), SamplingParams(skip_special_tokens=skip, stop=["Germ"])]
    prompt = tokenizer.encode("Prompt: é").ids

    def run(decoders):
        detoks = [IncrementalDetokenizer(d, prompt, p) for d, p in zip(decoders, params)]
        visible: list[list[tuple]] = [[] for _ in streams]
        for step in range(max(map(len, streams))):
            for i, (detok, ids) in enumerate(zip(detoks, streams)):
                if step < len(ids) and not (visible[i] and visible[i][-1][0]):  # not yet stopped
                    stop = detok.add_token(ids[step], check_stop=step >= 2)
                    visible[i].append((stop, detok.output_text(finished=stop is not None)))
        return visible, [d.output_text(finished=True) for d in detoks]

    shared = TokenDecoder(tokenizer)
    assert run([shared] * len(streams)) == run([_PlainDecoder(tokenizer) for _ in streams])
    visible, finals = run([shared] * len(streams))
    assert finals[0] == TEXT and [v[-1][0] for v in visible] == [None, "テキスト", "🎉 a", "Germ"]
