"""Incremental detokenization with stop strings.

Decoding token by token is wrong for byte-level vocabularies (a character's UTF-8 bytes may
span tokens) and for SentencePiece-style ones (a token's leading space depends on its left
neighbour). So, like vLLM and TGI, each new token decodes the window [prefix_offset, end) and
subtracts the decode of [prefix_offset, read_offset); a window ending in U+FFFD is an
incomplete character and is held back until a later token completes it.

The prefix window is most often the one token read at the step before, so `TokenDecoder`, shared
by every sequence of an engine, keeps the decode of each single token it has seen: one tokenizer
call per token in the steady state instead of two, with the same strings.

Stop strings: the output ends just before the first stop string; while the text ends with a
proper prefix of a stop string that prefix is held back (never shown), until the next tokens
either complete the stop string or break it. The text returned is append-only across calls.
When the sequence finishes, bytes still pending decode as U+FFFD (as UTF-8 with "replace"
does), so a finished text equals the decode of its tokens up to any stop string.
"""

from tokenizers import Tokenizer

from kiln.runtime.sampling_params import SamplingParams

PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded with the output so its first token reads right
REPLACEMENT_CHAR = "\ufffd"


class TokenDecoder:
    """`tokenizer.decode`, with the decode of every single token seen kept (at most the
    vocabulary, per skip_special_tokens value): decoding is a pure function of its input."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._single: dict[bool, dict[int, str]] = {False: {}, True: {}}

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if len(ids) != 1:
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        known = self._single[skip_special_tokens]
        text = known.get(ids[0])
        if text is None:
            text = known[ids[0]] = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        return text


class IncrementalDetokenizer:
    """The text of one sequence's generated tokens. Stop tokens are never added to it."""

    __slots__ = ("_decoder", "_skip_special", "_stop", "_ids", "_prefix_offset", "_read_offset", "_prefix_text",
                 "_text", "_stopped")

    def __init__(self, decoder: TokenDecoder, prompt_token_ids: list[int], params: SamplingParams):
        self._decoder = decoder
        self._skip_special = params.skip_special_tokens
        self._stop = params.stop
        self._ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text: str | None = None  # the decode of [prefix_offset, read_offset), once made
        self._text = ""
        self._stopped = False

    def add_token(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append one generated token; return the stop string it completed (the text then ends
        before it), or None. `check_stop=False` while min_tokens is not yet reached."""
        self._ids.append(token_id)
        prefix_text = self._prefix_text
        if prefix_text is None:
            prefix_text = self._prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return None  # nothing new yet, or an incomplete character: the prefix window stays
        old_len = len(self._text)
        self._text += new_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = None
        if not check_stop or not self._stop:
            return None
        return self._truncate_at_stop(old_len)

    def output_text(self, finished: bool) -> str:
        """The text so far; while unfinished, minus a tail that could start a stop string."""
        if finished:
            return self._text if self._stopped else self._text + self._pending_text()
        if not self._stop:
            return self._text
        return self._text[: len(self._text) - self._partial_stop_len()]

    def _pending_text(self) -> str:
        """The decode of tokens held back as incomplete characters."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        return self._decode(self._ids[self._prefix_offset:])[len(prefix_text):]

    def _decode(self, ids: list[int]) -> str:
        return self._decoder.decode(ids, self._skip_special)

    def _truncate_at_stop(self, old_len: int) -> str | None:
        """Find the earliest stop string overlapping the text added after `old_len`; cut it off."""
        first: tuple[int, str] | None = None
        for stop in self._stop:
            at = self._text.find(stop, max(0, old_len - len(stop) + 1))
            if at != -1 and (first is None or at < first[0]):
                first = (at, stop)
        if first is None:
            return None
        self._text = self._text[: first[0]]
        self._stopped = True
        return first[1]

    def _partial_stop_len(self) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
