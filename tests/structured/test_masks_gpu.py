"""Token masks on a GPU (whole batch, pinned buffers, copied without blocking) against the CPU path,
over a tiny byte-level tokenizer trained on the spot. Run on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from ragllm.engines.inprocess.sample.masks import TokenMasks
from ragllm.structured.grammars import GrammarCompiler
from ragllm.structured.spec import StructuredOutput

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    trainer = ByteLevelBPETokenizer()
    corpus = ['{"city": "Paris", "population": 2100000}', "yes no maybe 0123456789 [1] [2]"] * 50
    trainer.train_from_iterator(corpus, vocab_size=400, special_tokens=["<|end|>"])
    return PreTrainedTokenizerFast(tokenizer_object=trainer._tokenizer, eos_token="<|end|>")


def test_gpu_masks_equal_cpu_masks_step_after_step(tokenizer):
    vocab = len(tokenizer) + 37  # a model's logits are often wider than its tokenizer
    stop = frozenset({tokenizer.eos_token_id})
    specs = [
        StructuredOutput(
            "json_schema", '{"type": "object", "properties": {"city": {"type": "string"}}}'
        ),
        None,
        StructuredOutput("regex", "[0-9]{2,6}"),
        StructuredOutput("choice", '["yes", "no"]'),
    ]
    on_gpu = GrammarCompiler(tokenizer, vocab, stop)
    on_cpu = GrammarCompiler(tokenizer, vocab, stop)
    gpu_grammars = [on_gpu.grammar(s) if s else None for s in specs]
    cpu_grammars = [on_cpu.grammar(s) if s else None for s in specs]
    gpu_masks, cpu_masks = (
        TokenMasks(vocab, torch.device("cuda")),
        TokenMasks(vocab, torch.device("cpu")),
    )
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        logits = torch.randn(len(specs), vocab, generator=generator)
        gpu, gpu_failures = gpu_masks.apply(logits.cuda(), gpu_grammars)
        cpu, cpu_failures = cpu_masks.apply(logits, cpu_grammars)
        assert gpu_failures == cpu_failures == [None] * len(specs)
        assert torch.equal(gpu.cpu(), cpu)
        assert torch.equal(gpu[1].cpu(), logits[1])  # the free row is untouched
        chosen = cpu.argmax(dim=-1).tolist()
        for gpu_grammar, cpu_grammar, token in zip(gpu_grammars, cpu_grammars, chosen):
            if gpu_grammar is not None and not gpu_grammar.finished and token not in stop:
                gpu_grammar.accept(token)
                cpu_grammar.accept(token)
