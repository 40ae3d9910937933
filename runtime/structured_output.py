"""Structured output: each constrained sequence carries a grammar matcher (llguidance), whose
allowed tokens mask its logits row in the sampler before any other step; the token drawn is fed
back to it.

`Grammars` is built once per engine, on the first constrained request: llguidance's view of the
tokenizer (read from the tokenizer's own JSON, with the model's vocab size and EOS). A JSON
object or a JSON schema (`SamplingParams.structured_output`) becomes a grammar of compact JSON (no
free whitespace: a model cannot stall in it); a schema llguidance cannot enforce is a KilnError (a
400 over HTTP) that names the reason. Once the JSON is complete the grammar allows only EOS; the
scheduler finishes a sequence on that EOS even with ignore_eos, and min_tokens does not mask it.

Chosen over xgrammar 0.2.9 by measurement (SmolLM2's 49k-token vocabulary, a schema with
length-bounded strings, integer ranges, an enum and an array; 30 random-logit walks each):
llguidance's outputs all parsed; xgrammar's grammar for a string with maxLength admits control
characters, which JSON forbids, and 1 of 30 outputs did not parse. xgrammar filled a row's mask
faster in that walk (~20 us median vs ~140 us, both beside a CI run); llguidance compiles a schema
in ~1 ms. A whole step's mask costs 0.19 / 0.74 / 2.4 ms at 1 / 16 / 64 constrained rows
(`bench/structured.py`, 2-core AMD EPYC).
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer

from kiln.errors import KilnError
from kiln.runtime.sampling_params import StructuredOutput


class Grammars:
    """Compiles structured-output specs into per-sequence grammar matchers."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: frozenset[int]):
        import llguidance  # imported on the first constrained request: it costs start-up time

        self._llguidance = llguidance
        self._tokenizer = llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size,
                                                 eos_token=min(stop_token_ids) if stop_token_ids else None)
        self._grammars: dict[StructuredOutput, str] = {}

    def matcher(self, spec: StructuredOutput) -> Any:
        """A fresh matcher of `spec`'s grammar (validated once per distinct spec). KilnError if
        llguidance cannot enforce the schema."""
        if spec not in self._grammars:
            self._grammars[spec] = self._grammar(spec.schema or '{"type": "object"}', spec.origin)
        return self._llguidance.LLMatcher(self._tokenizer, self._grammars[spec])

    def _grammar(self, schema: str, origin: str) -> str:
        """The llguidance grammar of a JSON schema's compact JSON (no whitespace beyond ", " and ": ");
        `origin`: the request field the schema came from."""
        try:
            grammar = self._llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
            error = self._llguidance.LLMatcher.validate_grammar(grammar, self._tokenizer)
        except ValueError as e:
            error = str(e)
        if error and not error.startswith("WARNING"):
            owner = origin + ("'" if origin.endswith("s") else "'s")
            raise KilnError(f"{owner} JSON schema cannot be enforced: {error.strip()}", param=origin)
        return grammar


def mask(logits: torch.Tensor, rows: list[int], matchers: list[Any]) -> None:
    """logits: [B, V] fp32, in place: row rows[i]'s tokens that matchers[i] does not allow become -inf.
    (llguidance applies the mask with a TorchScript kernel, compiled on its first use in a process:
    ~2 s on the dev CPU, paid by the first constrained request.)"""
    import llguidance.torch as llg_torch  # loaded already: the matchers are llguidance's

    bitmask = llg_torch.allocate_token_bitmask(len(rows), logits.shape[1])
    for index, matcher in enumerate(matchers):
        llg_torch.fill_next_token_bitmask(matcher, bitmask, index)
    if len(rows) == logits.shape[0]:  # every row constrained: in place, no copy of the logits
        llg_torch.apply_token_bitmask_inplace(logits, bitmask.to(logits.device))
        return
    sub = logits[rows]
    llg_torch.apply_token_bitmask_inplace(sub, bitmask.to(logits.device))
    logits[rows] = sub


def accept(matchers: list[Any], token_ids: list[int]) -> None:
    """Feeds each matcher the token drawn under its mask (it always accepts it)."""
    for matcher, token in zip(matchers, token_ids):
        if not matcher.consume_token(token):
            raise RuntimeError(f"the grammar rejected token {token}, drawn under its own mask: {matcher.get_error()}")


def is_finished(matcher: Any) -> bool:
    """Whether the matcher's grammar is complete (it allows EOS alone, or accepted it)."""
    return matcher.is_stopped()

