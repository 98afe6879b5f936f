"""Constrained rows in the continuous-batching scheduler, stepped by hand on a tiny random model over
a byte-level tokenizer trained on the spot: with a step launched ahead, a constrained batch's next
masks and tokens are chosen before the step is recorded (``Scheduler._choose_ahead``); the answers
must be the ones chosen step by step."""

from __future__ import annotations

import json

import pytest
import torch

from ragllm.engines.base import SamplingParams
from ragllm.engines.model_runner import KVCacheOptions, ModelRunner
from ragllm.engines.scheduler import Scheduler, SchedulerLimits
from ragllm.engines.sequence import Sequence
from ragllm.engines.text import IncrementalDetokenizer, StopMatcher
from ragllm.structured.grammars import GrammarCompiler
from ragllm.structured.spec import StructuredOutput

SPECS = [StructuredOutput("json_schema", json.dumps({
             "type": "object", "required": ["city", "population"],
             "properties": {"city": {"type": "string", "maxLength": 12}, "population": {"type": "integer"}}})),
         None, StructuredOutput("regex", "[0-9]{2,6}"), StructuredOutput("choice", '["yes", "no"]'), None]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    trainer = ByteLevelBPETokenizer()
    corpus = ['{"city": "Paris", "population": 2100000}', "yes no maybe 0123456789 [1] [2]"] * 50
    trainer.train_from_iterator(corpus, vocab_size=400, special_tokens=["<|end|>"])
    return PreTrainedTokenizerFast(tokenizer_object=trainer._tokenizer, eos_token="<|end|>")


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=len(tokenizer) + 20, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def _answers(model, tokenizer, launch_ahead: bool, calls: list) -> list[Sequence]:
    stop = frozenset({tokenizer.eos_token_id})
    compiler = GrammarCompiler(tokenizer, len(tokenizer), stop)
    runner = ModelRunner(model, max_model_len=256, kv=KVCacheOptions(block_size=16, num_blocks=100))
    scheduler = Scheduler(runner, SchedulerLimits(max_num_seqs=8, max_batch_size=8, max_num_batched_tokens=256,
                                                  chunked_prefill=False),
                          deliver=lambda results: None, launch_ahead=launch_ahead, choosable=len(tokenizer))
    choose_ahead = scheduler._choose_ahead
    scheduler._choose_ahead = lambda *args: calls.append(1) or choose_ahead(*args)
    sequences = []
    for index, spec in enumerate(SPECS):
        prompt = tokenizer.encode(f"question {index}: the city and its population")
        sequences.append(Sequence(
            request_id=f"r{index}", prompt_ids=prompt, params=SamplingParams(temperature=0.0),
            max_tokens=30 if spec is None else 60, stop_token_ids=stop,
            detokenizer=IncrementalDetokenizer(tokenizer, prompt), stop_matcher=StopMatcher(()), sink=None,
            grammar=compiler.grammar(spec) if spec is not None else None))
        scheduler.submit(sequences[-1])
    for _ in range(200):
        scheduler.run_once()
        if not scheduler.running and not scheduler.waiting:
            return sequences
    raise AssertionError("scheduler did not drain")


def test_constrained_rows_choose_ahead_the_tokens_they_would_choose_step_by_step(model, tokenizer):
    calls_ahead, calls_in_turn = [], []
    ahead = _answers(model, tokenizer, launch_ahead=True, calls=calls_ahead)
    in_turn = _answers(model, tokenizer, launch_ahead=False, calls=calls_in_turn)
    assert calls_ahead and not calls_in_turn  # the early path ran, and only with a step launched ahead
    for early, reference in zip(ahead, in_turn):
        assert early.output_ids == reference.output_ids, early.request_id
        assert all(token < len(tokenizer) for token in early.output_ids)  # no padded id
    # The constrained answers that ended on their own follow their constraint.
    text = [tokenizer.decode(s.output_ids, skip_special_tokens=True) for s in ahead]
    assert text[3] in ("yes", "no")
    assert text[2].isdigit() and 2 <= len(text[2]) <= 6
    assert ahead[0].grammar.finished or len(ahead[0].output_ids) == 60
    if ahead[0].grammar.finished:
        assert set(json.loads(text[0])) == {"city", "population"}
