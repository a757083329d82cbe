"""Structured output in the engine: llguidance's mask makes every choice valid JSON of the
schema, a row without a grammar is untouched beside one with it, and bad input is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pd_local.config import EngineConfig
from pd_local.engine.engine import Engine
from pd_local.engine.sampling import SamplingParams
from pd_local.engine.structured import GrammarTokenizer, json_grammar, schema_of
from pd_local.model.weights import load_model
from pd_local.tokenizer import Tokenizer

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "population"],
          "properties": {"city": {"type": "string", "maxLength": 16}, "population": {"type": "integer"}}}


@pytest.mark.parametrize("schema,why", [({"type": "nonsense"}, "Invalid type"), ({"type": 5}, "type must be")])
def test_a_schema_llguidance_cannot_compile_is_refused(schema: dict, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        json_grammar(schema)


def test_response_format_names_its_schema() -> None:
    assert schema_of({"type": "json_object"}) is None
    assert schema_of({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}) == SCHEMA
    with pytest.raises(ValueError, match="json_schema must be"):
        schema_of({"type": "json_schema", "json_schema": "x"})


@pytest.mark.slow
def test_every_choice_is_json_of_the_schema_and_other_rows_are_untouched(smollm2_dir: Path) -> None:
    tok = Tokenizer.from_dir(smollm2_dir)
    model = load_model(smollm2_dir, torch.bfloat16)[0]
    prompt = tok.encode_chat([{"role": "user", "content": "Name a big city."}])
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    bare = Engine(model, EngineConfig(kv_cache_gb=0.05), stop_token_ids=tok.stop_token_ids)
    with pytest.raises(ValueError, match="grammar_tokenizer"):
        bare.add_request(1, prompt, SamplingParams(grammar=json_grammar(SCHEMA)))
    engine = Engine(model, EngineConfig(kv_cache_gb=0.05), stop_token_ids=tok.stop_token_ids,
                    grammar_tokenizer=GrammarTokenizer(tok))
    alone = engine.generate([prompt], plain)[0]
    params = SamplingParams(temperature=0.8, seed=2, max_tokens=48, grammar=json_grammar(SCHEMA))
    engine.add_request(10, prompt, params, followers=(11, 12))
    engine.add_request(20, prompt, plain)
    out: dict[int, list[int]] = {10: [], 11: [], 12: [], 20: []}
    while engine.has_unfinished():
        for ev in engine.step():
            out[ev.req_id].append(ev.token_id)
    assert out[20] == alone[0], "a row without a grammar changed beside rows with one"
    for req_id in (10, 11, 12):
        assert out[req_id][-1] in tok.stop_token_ids, "the JSON did not complete"
        city = json.loads(tok.decode(out[req_id]))
        assert set(city) == {"city", "population"} and isinstance(city["population"], int), city
    assert engine.num_free_blocks == engine.num_total_blocks
