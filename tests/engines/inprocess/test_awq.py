"""AWQ int4 checkpoints: the published packing, loading (dequantised on the CPU, packed on CUDA),
and our runner over packed weights against transformers over the dequantised ones. The ``cuda``
cases run the W4A16 kernels on a GPU (the device tool)."""

from __future__ import annotations

import json

import pytest
import torch

from ragllm.engines.inprocess.quantized.awq_format import (
    ORDER,
    AwqConfig,
    AwqWeights,
    dequantise,
    pack,
    quantise,
    unpack,
)
from ragllm.engines.inprocess.quantized.awq_linear import AwqLinear
from ragllm.engines.inprocess.quantized.awq_loader import checkpoint_awq_config, load_awq_model
from ragllm.engines.inprocess.quantized.awq_writer import save_awq_checkpoint
from ragllm.engines.inprocess.runner.cpu import KVCacheOptions
from ragllm.engines.inprocess.runner.cuda import CudaGraphRunner, CudaRunnerOptions
from ragllm.errors import ModelLoadError
from tests.support.tiny_models import ARCHITECTURES, tiny_model

CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ],
)
DEVICES = ["cpu", CUDA]
GROUP = 32  # divides the tiny models' widths (64 and 96)


def test_packing_is_autoawqs_order():
    # Nibble i of a packed word holds column ORDER[i] = (0, 2, 4, 6, 1, 3, 5, 7)[i], as AutoAWQ packs.
    word = pack(torch.arange(8)[None])[0, 0].item() & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == list(ORDER)
    values = torch.randint(0, 16, (7, 40))
    assert torch.equal(unpack(pack(values)), values.int())


def _autoawq_pack(values: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's own packing loop (``WQLinear_GEMM.from_linear``), transcribed: for each word, value
    ``order_map[i]`` of its eight columns is shifted to bit 4 * i. Written out here, independently of
    ``ORDER``/``SHIFTS``, so the comparison is with AutoAWQ and not with the code under test."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    rows, columns = values.shape
    words = torch.zeros((rows, columns // 8), dtype=torch.int64)
    for word in range(columns // 8):
        for i in range(8):
            words[:, word] |= values[:, word * 8 + order_map[i]].to(torch.int64) << (4 * i)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def test_packing_matches_a_golden_word_packed_in_autoawqs_order():
    # Columns 0..7 hold 1..8: nibbles from the lowest are columns 0, 2, 4, 6, 1, 3, 5, 7, i.e. values
    # 1, 3, 5, 7, 2, 4, 6, 8, so the word is 0x86427531 (negative as an int32).
    golden = 0x86427531 - (1 << 32)
    values = torch.arange(1, 9)[None]
    assert _autoawq_pack(values)[0, 0].item() == golden
    assert pack(values)[0, 0].item() == golden
    assert torch.equal(unpack(torch.tensor([[golden]], dtype=torch.int32)), values.int())
    rows = torch.randint(0, 16, (5, 64), generator=torch.Generator().manual_seed(7))
    assert torch.equal(pack(rows), _autoawq_pack(rows))


def test_dequantised_weights_are_within_half_a_step_of_the_originals():
    """Half a step, plus what storing the step in float16 costs at the top of a group's range: the scale
    is (high - low) / 15 rounded to 11 bits, so 15 steps can fall short of the range by 15 * 2^-11 of a
    step, and a value there is clamped to the grid's last point."""
    for seed in range(20):
        torch.manual_seed(seed)
        weight = torch.randn(48, 96)
        packed = quantise(weight, GROUP)
        step = packed.scales.float().repeat_interleave(GROUP, dim=0).t()  # [N, K]
        error = (dequantise(packed) - weight).abs()
        assert (error <= step * (0.5 + 15 * 2.0**-11)).all(), seed
    assert error.max() > 0  # int4 does lose something: the comparison above is not vacuous


def test_the_config_says_which_checkpoints_run():
    assert AwqConfig.from_checkpoint_config({"torch_dtype": "bfloat16"}) is None
    config = {
        "quantization_config": {
            "quant_method": "awq",
            "bits": 4,
            "group_size": 128,
            "version": "gemm",
            "zero_point": True,
        }
    }
    assert AwqConfig.from_checkpoint_config(config).group_size == 128
    for change in ({"bits": 8}, {"version": "gemv"}, {"zero_point": False}, {"group_size": -1}):
        bad = {"quantization_config": {**config["quantization_config"], **change}}
        with pytest.raises(ModelLoadError, match="AWQ"):
            AwqConfig.from_checkpoint_config(bad)


def _awq_checkpoint(tmp_path, architecture: str = "qwen2"):
    model = tiny_model(architecture)
    save_awq_checkpoint(model, tmp_path, GROUP)
    return tmp_path


def test_written_checkpoints_have_the_published_layout(tmp_path):
    from safetensors import safe_open

    directory = _awq_checkpoint(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    assert config["quantization_config"] == {
        "bits": 4,
        "group_size": GROUP,
        "modules_to_not_convert": None,
        "quant_method": "awq",
        "version": "gemm",
        "zero_point": True,
    }
    with safe_open(str(directory / "model.safetensors"), framework="pt") as reader:
        tensors = {key: reader.get_tensor(key) for key in reader.keys()}
    prefix = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{prefix}.qweight"].dtype == torch.int32 and tensors[
        f"{prefix}.qweight"
    ].shape == (64, 64 // 8)
    assert tensors[f"{prefix}.qzeros"].shape == (64 // GROUP, 64 // 8)
    assert tensors[f"{prefix}.scales"].dtype == torch.float16 and tensors[
        f"{prefix}.scales"
    ].shape == (2, 64)
    assert tensors[f"{prefix}.bias"].dtype == torch.float16
    assert tensors["model.layers.0.mlp.down_proj.qweight"].shape == (96, 64 // 8)
    assert "model.layers.0.mlp.down_proj.weight" not in tensors
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16


def test_a_checkpoint_missing_a_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = _awq_checkpoint(tmp_path)
    tensors = load_file(str(directory / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.scales"]
    save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="up_proj lacks .*up_proj.scales"):
        load_awq_model(
            directory,
            checkpoint_awq_config(directory),
            torch.float32,
            torch.device("cpu"),
            packed=False,
        )


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_packed_layers_compute_what_the_dequantised_model_computes(tmp_path, architecture):
    directory = _awq_checkpoint(tmp_path, architecture)
    awq = checkpoint_awq_config(directory)
    dense = load_awq_model(directory, awq, torch.float32, torch.device("cpu"), packed=False)
    packed = load_awq_model(directory, awq, torch.float32, torch.device("cpu"), packed=True)
    assert isinstance(packed.model.layers[0].mlp.down_proj, AwqLinear)
    ids = torch.randint(0, 211, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, dense(ids).logits, atol=1e-4, rtol=1e-4)


def _dequantised_reference(directory, device: str, dtype: torch.dtype):
    model = load_awq_model(
        directory,
        checkpoint_awq_config(directory),
        torch.float32,
        torch.device("cpu"),
        packed=False,
    )
    return model.to(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_our_runner_over_packed_weights_matches_transformers_over_dequantised(
    tmp_path, device, architecture
):
    """Prefill then teacher-forced decode; fused q/k/v and gate/up stay packed. On CUDA: bf16, graphs,
    the W4A16 kernels (decode rows and a prefill past the decode kernel's row limit)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    directory = _awq_checkpoint(tmp_path, architecture)
    packed = load_awq_model(
        directory, checkpoint_awq_config(directory), dtype, torch.device(device), packed=True
    )
    reference = _dequantised_reference(directory, device, dtype)
    runner = CudaGraphRunner(
        packed,
        512,
        CudaRunnerOptions(max_batch_size=4, max_num_batched_tokens=512),
        KVCacheOptions(block_size=16, num_blocks=100),
    )
    ids = torch.randint(1, 211, (90,), generator=torch.Generator().manual_seed(1)).tolist()
    prompt = ids[:70]
    table = list(range(1, 8))
    logits = runner.prefill(table, prompt, 0)
    with torch.inference_mode():
        expected = reference(torch.tensor([ids], device=device)).logits[0].float()
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    _assert_close(logits, expected[len(prompt) - 1], tolerance)
    for position in range(len(prompt), len(ids)):
        logits = runner.decode([table], [ids[position]], [position])[0]
        _assert_close(logits, expected[position], tolerance)


@pytest.mark.parametrize("device", DEVICES)
def test_one_row_steps_that_fold_norms_into_the_products_match_steps_that_do_not(
    tmp_path, monkeypatch, device
):
    """One-row decode steps over packed layers fold RMSNorm into q/k/v and gate/up and the residual adds
    into o and down (on the GPU, inside the int4 kernels; on the CPU, forced here, through the same layer
    loop with the products' plain fallbacks): the logits are those of steps that do not."""
    from dataclasses import replace

    from ragllm.engines.inprocess.layers import w4a16
    from ragllm.engines.inprocess.runner import cuda as runner_module

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    directory = _awq_checkpoint(tmp_path)
    ids = torch.randint(1, 211, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    prompt, table = ids[:30], list(range(1, 5))

    def decode_logits(fold: bool) -> list[torch.Tensor]:
        if device == "cpu":
            monkeypatch.setattr(
                runner_module, "folds_norms", lambda hidden: fold and hidden.shape[0] == 1
            )
        else:
            monkeypatch.setattr(w4a16, "TUNING", replace(w4a16.TUNING, gemv_folds_norms=fold))
        model = load_awq_model(
            directory, checkpoint_awq_config(directory), dtype, torch.device(device), packed=True
        )
        runner = CudaGraphRunner(
            model,
            512,
            CudaRunnerOptions(max_batch_size=4, max_num_batched_tokens=512),
            KVCacheOptions(block_size=16, num_blocks=40),
        )
        assert runner._folds_norms
        runner.prefill(table, prompt, 0)
        return [
            runner.decode([table], [ids[position]], [position])[0].clone()
            for position in range(len(prompt), len(ids))
        ]

    folded, unfolded = decode_logits(True), decode_logits(False)
    for position, (actual, expected) in enumerate(zip(folded, unfolded)):
        _assert_close(actual, expected.float(), 1e-5 if device == "cpu" else 2e-2)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    scale = expected.abs().max()
    error = (actual.float() - expected).abs().max()
    assert error <= tolerance * scale, f"max error {float(error):.3g} vs scale {float(scale):.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 33, 64, 65, 257, 2048])
@pytest.mark.parametrize(
    "shape", [(1536, 2048), (1536, 1536), (8960, 1536), (1536, 17920), (384, 200)]
)
def test_w4a16_products_match_dequantise_then_matmul(rows, shape):
    """The Qwen2.5-1.5B layer shapes (q/k/v, o, down, gate/up), and one whose outputs fill no whole block,
    at decode and prefill row counts, against float32 over the dequantised weights; repeated calls give
    the same bits (the split-K counters reset and the shares add up in a fixed order)."""
    from ragllm.engines.inprocess.layers.w4a16 import awq_matmul, counters_for

    torch.manual_seed(rows)
    k, n = shape
    weights = quantise(torch.randn(n, k, device="cuda") * 0.02, 128)
    weights = AwqWeights(
        weights.qweight,
        weights.qzeros,
        weights.scales.to(torch.bfloat16),
        torch.randn(n, device="cuda", dtype=torch.bfloat16),
        128,
    )
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    expected = x.float() @ dequantise(weights).t() + weights.bias.float()
    counters = counters_for(n, x.device)
    first = awq_matmul(x, weights, counters)
    _assert_close(first, expected, 1e-2)
    for _ in range(3):
        assert torch.equal(awq_matmul(x, weights, counters), first)
    assert not counters.any()


def _random_awq(k: int, n: int, seed: int) -> AwqWeights:
    torch.manual_seed(seed)
    weights = quantise(torch.randn(n, k, device="cuda") * 0.02, 128)
    return AwqWeights(
        weights.qweight,
        weights.qzeros,
        weights.scales.to(torch.bfloat16),
        torch.randn(n, device="cuda", dtype=torch.bfloat16),
        128,
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("words, wide_words", [(8, 0), (16, 0), (16, 32), (16, 64)])
@pytest.mark.parametrize("shape", [(1536, 2048), (8960, 1536), (1536, 17920), (384, 200)])
def test_one_row_products_in_either_arithmetic(monkeypatch, words, wide_words, shape):
    """The one-row kernel with rows of 8 words (float32), 16 (float16 pairs) and, for the products wide
    enough, 32 or 64, against float32 over the dequantised weights."""
    from dataclasses import replace

    from ragllm.engines.inprocess.layers import w4a16

    monkeypatch.setattr(
        w4a16, "TUNING", replace(w4a16.TUNING, gemv_words=words, gemv_wide_words=wide_words)
    )
    k, n = shape
    weights = _random_awq(k, n, seed=k + n)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    expected = x.float() @ dequantise(weights).t() + weights.bias.float()
    _assert_close(w4a16.awq_matmul(x, weights, w4a16.counters_for(n, x.device)), expected, 1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_row_products_in_half_pairs_take_inputs_beyond_float16s_range(monkeypatch):
    """Inputs of ±69,000 (float16 ends at 65,504) on some channels: the float16 pairs see them scaled
    by 2^-7, so nothing overflows and the outputs keep float32's answer."""
    from dataclasses import replace

    from ragllm.engines.inprocess.layers import w4a16

    monkeypatch.setattr(w4a16, "TUNING", replace(w4a16.TUNING, gemv_wide_words=32))
    k, n = 8960, 1536
    weights = _random_awq(k, n, seed=5)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    x[0, ::97] = 69_000.0 * torch.sign(torch.randn(x[0, ::97].shape, device="cuda"))
    expected = x.float() @ dequantise(weights).t() + weights.bias.float()
    assert w4a16._row_words(n, k // 128, x.device) == 32  # the float16 pairs are what runs
    out = w4a16.awq_matmul(x, weights, w4a16.counters_for(n, x.device))
    assert torch.isfinite(out).all()
    _assert_close(out, expected, 1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("words, wide_words", [(8, 0), (16, 32)])
def test_one_row_gated_product_reads_silu_of_gate_times_up(monkeypatch, words, wide_words):
    """The down projection reading gate/up itself gives what SiLU-and-multiply followed by the product
    gives, and float32's answer."""
    from dataclasses import replace

    from ragllm.engines.inprocess.layers import w4a16
    from ragllm.engines.inprocess.layers.kernels import silu_and_mul

    monkeypatch.setattr(
        w4a16, "TUNING", replace(w4a16.TUNING, gemv_words=words, gemv_wide_words=wide_words)
    )
    k, n = 8960, 1536
    weights = _random_awq(k, n, seed=11)
    gate_up = torch.randn(1, 2 * k, device="cuda", dtype=torch.bfloat16) * 3
    counters = w4a16.counters_for(n, gate_up.device)
    activated = silu_and_mul(gate_up)
    gated = w4a16.awq_gated_matmul(gate_up, weights, counters)
    torch.testing.assert_close(
        gated, w4a16.awq_matmul(activated, weights, counters), atol=1e-3, rtol=1e-3
    )
    _assert_close(gated, activated.float() @ dequantise(weights).t() + weights.bias.float(), 1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "words, wide_words, early", [(8, 0, True), (16, 32, True), (16, 32, False), (16, 0, True)]
)
def test_one_row_products_fold_the_norm_and_the_residual_add(monkeypatch, words, wide_words, early):
    """q/k/v and gate/up normalising their input themselves give what RMSNorm followed by the product gives
    (to bfloat16's rounding of the normed input); o and down (reading gate/up) adding their products
    into the residual give residual + product, bit for bit, in the residual's own storage. With and
    without the weights loaded before the wait (``gemv_early_loads``)."""
    from dataclasses import replace

    from ragllm.engines.inprocess.layers import w4a16
    from ragllm.engines.inprocess.layers.kernels import add_rms_norm

    monkeypatch.setattr(
        w4a16,
        "TUNING",
        replace(w4a16.TUNING, gemv_words=words, gemv_wide_words=wide_words, gemv_early_loads=early),
    )
    torch.manual_seed(words + wide_words)
    k = 1536
    residual = torch.randn(1, k, device="cuda", dtype=torch.bfloat16) * 4
    norm_weight = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
    before = residual.clone()
    for n in (2048, 17920):
        weights = _random_awq(k, n, seed=n)
        counters = w4a16.counters_for(n, residual.device)
        normed, _ = add_rms_norm(residual, None, norm_weight, 1e-6)
        folded = w4a16.awq_normed_matmul(residual, norm_weight, 1e-6, weights, counters)
        torch.testing.assert_close(
            folded, w4a16.awq_matmul(normed, weights, counters), atol=2e-2, rtol=2e-2
        )
        _assert_close(folded, normed.float() @ dequantise(weights).t() + weights.bias.float(), 1e-2)
        assert torch.equal(residual, before)
        assert not counters.any()
    for k, gated in ((1536, False), (8960, True)):
        n = 1536
        weights = _random_awq(k, n, seed=k)
        counters = w4a16.counters_for(n, residual.device)
        x = torch.randn(1, 2 * k if gated else k, device="cuda", dtype=torch.bfloat16)
        product = (
            w4a16.awq_gated_matmul(x, weights, counters)
            if gated
            else w4a16.awq_matmul(x, weights, counters)
        )
        target = torch.randn(1, n, device="cuda", dtype=torch.bfloat16) * 4
        expected = target + product
        added = w4a16.awq_add_product(target, x, weights, counters, gated)
        assert added.data_ptr() == target.data_ptr()
        assert torch.equal(added, expected), (
            gated,
            float((added.float() - expected.float()).abs().max()),
        )
        assert not counters.any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_row_products_keep_float32_inputs_in_float32():
    """A float32 input takes the float32 arithmetic whatever the row width: float32's answer to 1e-4
    (float16 pairs would round the input to 11 bits, an error near 1e-3)."""
    from ragllm.engines.inprocess.layers import w4a16

    k, n = 1536, 17920
    weights = _random_awq(k, n, seed=3)
    x = torch.randn(1, k, device="cuda", dtype=torch.float32)
    assert w4a16._row_words(n, k // 128, x.device) >= w4a16.HALF_PAIRS_FROM_WORDS
    expected = x @ dequantise(weights).t() + weights.bias.float()
    _assert_close(w4a16.awq_matmul(x, weights, w4a16.counters_for(n, x.device)), expected, 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "block_n, swapped", [(64, False), (64, True), (128, True), (256, False), (256, True)]
)
@pytest.mark.parametrize(
    "dtype, tolerance", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float32, 1e-4)]
)
@pytest.mark.parametrize("rows", [2, 40])
def test_tensor_core_products_at_every_tile_and_input_type(
    monkeypatch, block_n, swapped, dtype, tolerance, rows
):
    """The 2-64-row kernel with each tile width, either orientation and each input type, on a product
    whose outputs fill no whole tile and one split over many input groups, against float32 over the
    dequantised weights. Its weights are the exact ``q - z`` and the scales apply in float32, so the error
    is the input's own rounding: float32 inputs keep float32's answer."""
    from dataclasses import replace

    from ragllm.engines.inprocess.layers import w4a16

    monkeypatch.setattr(
        w4a16, "TUNING", replace(w4a16.TUNING, rows_block_n=block_n, rows_swapped=swapped)
    )
    for k, n in ((384, 200), (8960, 1536)):
        weights = _random_awq(k, n, seed=k + rows)
        weights = AwqWeights(
            weights.qweight, weights.qzeros, weights.scales, weights.bias.to(dtype), 128
        )
        x = torch.randn(rows, k, device="cuda", dtype=dtype)
        expected = x.float() @ dequantise(weights).t() + weights.bias.float()
        _assert_close(
            w4a16.awq_matmul(x, weights, w4a16.counters_for(n, x.device)), expected, tolerance
        )
