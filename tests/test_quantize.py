"""quantize.py against bitsandbytes (its CPU build here; its CUDA build too where a GPU and that build exist): the
code books, the stored codes and scales, dequantized values in fp32, bf16 and fp16, Linear4bit against bitsandbytes'
Linear4bit and matmul_4bit; then quantize_model, memory_report and QLoRA steps."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import bitsandbytes_on

import lora
import quantize as Q
from model import GPT, GPTConfig, count_parameters
from support.adapters import disable_adapters


@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes.functional")


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=64))


# ---------------------------------------------------------------------------------------------- code books


def test_nf4_code_book_matches_bitsandbytes_table(bnb):
    ours, theirs = Q.nf4_code_book(), bnb.get_4bit_type("nf4", device="cpu")
    assert (ours - theirs).abs().max().item() <= 1e-7
    assert torch.equal(ours, theirs)  # bit for bit: the rounding midpoints depend on it


def test_nf4_code_book_shape():
    code = Q.nf4_code_book()
    assert code.numel() == 16 and bool((code[1:] > code[:-1]).all())
    assert (code < 0).sum() == 7 and (code > 0).sum() == 8 and (code == 0).sum() == 1  # asymmetric, exact zero
    assert code.min() == -1 and code.max() == 1
    # every value is a quantile of N(0, 1) rescaled: Phi(code * Q(offset)) are the evenly spaced probabilities
    scale = torch.special.ndtri(torch.tensor(0.9677083, dtype=torch.float64))
    p_positive = torch.special.ndtr(code[code > 0].double() * scale)
    assert torch.allclose(p_positive.diff(), p_positive.diff().mean().expand(7), atol=1e-6)


def test_dynamic_8bit_code_book_matches_bitsandbytes(bnb):
    assert torch.equal(Q.dynamic_8bit_code_book(), bnb.create_dynamic_map())


def test_fp4_and_int4_code_books():
    e2m1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6]) / 6
    assert torch.allclose(Q.fp4_code_book(), torch.cat([-e2m1.flip(0)[:-1], e2m1]))
    assert torch.allclose(Q.int4_code_book(), torch.linspace(-1, 1, 15), atol=1e-6)


# ------------------------------------------------------------------------------- NF4 against bitsandbytes


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(768, 2304), (3072, 768), (1000, 37), (4097,)])  # 37000, 4097: not multiples of 64
def test_codes_and_absmax_identical_to_bitsandbytes(bnb, shape, seed):
    torch.manual_seed(seed)
    w = torch.randn(shape) * 0.02
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    q = Q.quantize_nf4(w, block_size=64, double_quant=False)
    assert q.codes.dtype == torch.uint8 and q.codes.numel() == math.ceil(w.numel() / 2)
    assert torch.equal(q.codes, packed.view(-1))
    assert torch.equal(q.absmax, state.absmax)
    if shape[-1] % 2 == 0:  # (bitsandbytes dequantizes odd widths with torch.compile: seconds of compiling)
        assert torch.equal(Q.dequantize_nf4(q), bnb.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [32, 128])
def test_identical_for_half_precision_and_other_block_sizes(bnb, dtype, block_size):
    torch.manual_seed(3)
    w = (torch.randn(300, 77) * 0.05).to(dtype)
    packed, state = bnb.quantize_4bit(w, blocksize=block_size, quant_type="nf4")
    q = Q.quantize_nf4(w, block_size=block_size, double_quant=False)
    assert torch.equal(q.codes, packed.view(-1)) and torch.equal(q.absmax, state.absmax)
    assert Q.dequantize_nf4(q).dtype == dtype


def stored_like_bitsandbytes(packed, state):
    """bitsandbytes' stored 4-bit tensor (its packed codes and QuantState) as our QuantizedTensor: the same bits."""
    nested = state.state2 is not None
    return Q.QuantizedTensor(
        packed.reshape(-1),
        state.absmax,
        state.shape,
        state.dtype,
        state.blocksize,
        state.quant_type,
        absmax_scale=state.state2.absmax if nested else None,
        absmax_mean=state.offset if nested else None,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantized_values_equal_bitsandbytes_in_every_dtype(dtype, double_quant, device):
    """From the same stored bits (bitsandbytes' own codes and scales, double-quantized or not), dequantize_4bit gives
    bitsandbytes' dequantize_4bit values bit for bit, in fp32, bf16 and fp16, on every device bitsandbytes supports."""
    bnb = bitsandbytes_on(device)
    torch.manual_seed(4)
    w = (torch.randn(300, 78) * 0.05).to(dtype).to(device)  # 23,400 weights: 366 blocks, the last one partial
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    theirs = bnb.dequantize_4bit(packed, state)
    ours = Q.dequantize_4bit(stored_like_bitsandbytes(packed, state))
    assert ours.dtype == theirs.dtype == dtype and ours.shape == theirs.shape
    assert torch.equal(ours, theirs)
    if not double_quant:  # and our own quantization stores those very bits
        q = Q.quantize_nf4(w, double_quant=False)
        assert torch.equal(q.codes, packed.view(-1)) and torch.equal(Q.dequantize_nf4(q), theirs)


def test_fp4_differs_from_bitsandbytes_only_in_its_smallest_value(bnb):
    """Our FP4 is E2M1 with exponent bias 1; bitsandbytes' 'fp4' puts its smallest non-zero magnitude at 0.0052 where
    ours has 1/12 (quantize.fp4_code_book). Every other value is shared, so weights that round to neither (scaled
    magnitudes above both books' midpoint 0.125 next to them) dequantize to bitsandbytes' values exactly."""
    theirs = bnb.get_4bit_type("fp4", device="cpu")
    ours = Q.fp4_code_book()
    shared = {round(v, 6) for v in ours.tolist()} & {round(v, 6) for v in theirs.tolist()}
    assert {round(v, 6) for v in ours.tolist()} - shared == {-0.083333, 0.083333}
    assert {round(v, 6) for v in theirs.tolist()} - shared == {-0.005208, 0.005208}
    torch.manual_seed(5)
    w = torch.sign(torch.randn(64, 128)) * (0.5 + 2 * torch.rand(64, 128))  # |w| in [0.5, 2.5]: |w| / absmax >= 0.2
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="fp4", compress_statistics=False)
    q = Q.quantize_4bit(w, "fp4", block_size=64, double_quant=False)
    assert bool(((w.view(-1, 64).abs() / q.absmax[:, None]) > 0.19).all())
    assert torch.equal(q.absmax, state.absmax)
    assert torch.equal(Q.dequantize_4bit(q), bnb.dequantize_4bit(packed, state))  # another code layout, the same values


def test_ties_zero_blocks_and_outliers_like_bitsandbytes(bnb):
    """Values exactly on a rounding midpoint (ties), an all-zero block, heavy tails."""
    code = Q.nf4_code_book()
    midpoints = (code[:-1] + code[1:]) / 2
    ties = torch.cat([torch.tensor([1.0]), midpoints, -midpoints, torch.zeros(64 - 31)])  # absmax 1: scaled == value
    heavy = torch.distributions.StudentT(2.0).sample((5 * 64 + 3,))
    w = torch.cat([ties, torch.zeros(64), heavy])
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    q = Q.quantize_nf4(w, double_quant=False)
    assert torch.equal(q.codes, packed.view(-1)) and torch.equal(q.absmax, state.absmax)
    assert q.absmax[1] == 0 and bool((Q.dequantize_nf4(q)[64:128] == 0).all())


@pytest.mark.parametrize("shape", [(768, 2304), (3072, 768), (1000, 38)])
def test_double_quant_error_and_storage(bnb, shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    theirs = (w - bnb.dequantize_4bit(packed, state)).abs().mean().item()
    q = Q.quantize_nf4(w, block_size=64, double_quant=True)
    ours = (w - Q.dequantize_nf4(q)).abs().mean().item()
    assert abs(ours / theirs - 1) < 0.01
    assert torch.equal(q.codes, packed.view(-1))  # the 4-bit codes do not depend on double quantization
    assert torch.equal(q.absmax_mean, state.offset) and torch.equal(q.absmax_scale, state.state2.absmax)
    assert q.absmax.dtype == torch.uint8 and q.absmax_scale.dtype == torch.float32
    n, blocks = w.numel(), math.ceil(w.numel() / 64)
    assert q.nbytes == math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4
    if n >= 1_000_000:
        assert abs(q.bits_per_param - (4 + 8 / 64 + 32 / (64 * 256))) < 0.002
        assert abs(q.bits_per_param - 4.127) < 0.002


def test_double_quant_rounds_absmax_to_the_nearest_8bit_code(bnb):
    """bitsandbytes' CPU 8-bit kernel uses an approximate binary search and picks the second-nearest code for
    a few in a thousand absmax values; ours always takes the nearest, so it is never further off."""
    torch.manual_seed(1)
    w = torch.randn(3072, 768) * 0.02
    _, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    q = Q.quantize_nf4(w)
    absmax = Q.quantize_nf4(w, double_quant=False).absmax
    target = (absmax - q.absmax_mean) / q.absmax_scale.repeat_interleave(256)[: absmax.numel()]
    code = Q.DYNAMIC_8BIT_CODE_BOOK
    our_error = (target - code[q.absmax.long()]).abs()
    their_error = (target - code[state.absmax.long()]).abs()
    assert bool((our_error <= their_error + 1e-7).all())
    assert (q.absmax != state.absmax).float().mean() < 0.01
    assert our_error.max() <= (code.diff().max() / 2) + 1e-7


def test_storage_without_double_quant_is_4_5_bits():
    q = Q.quantize_nf4(torch.randn(256, 256), double_quant=False)
    assert q.nbytes == 256 * 256 // 2 + 4 * 256 * 256 // 64 and q.bits_per_param == 4.5


# ---------------------------------------------------------------------------------- round trip, comparison


@pytest.mark.parametrize("quant_type", Q.QUANT_TYPES)
@pytest.mark.parametrize("shape", [(5,), (3, 7, 11), (130, 64)])
def test_round_trip_shape_dtype_and_error(quant_type, shape):
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=torch.bfloat16)
    q = Q.quantize_4bit(w, quant_type, block_size=64, double_quant=True)
    back = Q.dequantize_4bit(q)
    assert back.shape == w.shape and back.dtype == torch.bfloat16
    assert Q.dequantize_4bit(q, torch.float32).dtype == torch.float32
    # worst case: half the largest gap between codes, times the block's absmax (plus double-quant slack)
    flat = F.pad(w.float().reshape(-1), (0, -w.numel() % 64)).view(-1, 64)
    bound = (Q.CODE_BOOKS[quant_type].diff().max() / 2 * flat.abs().amax(1, keepdim=True) * 1.02).expand(-1, 64)
    error = F.pad((w.float() - back.float()).reshape(-1), (0, -w.numel() % 64)).view(-1, 64).abs()
    assert bool((error <= bound + 1e-2).all())


def test_nf4_beats_fp4_and_int4_on_normal_weights():
    """The paper's Table 2 in miniature: on N(0, sigma) weights NF4 has the smallest error."""
    torch.manual_seed(0)
    w = torch.randn(512, 512) * 0.02
    error = {t: (w - Q.dequantize_4bit(Q.quantize_4bit(w, t))).abs().mean().item() for t in Q.QUANT_TYPES}
    assert error["nf4"] < error["fp4"] < error["int4"]
    assert error["nf4"] < 0.95 * error["fp4"]


def test_nf4_alias_refuses_other_quant_types():
    q = Q.quantize_4bit(torch.randn(64), "fp4")
    with pytest.raises(ValueError, match="dequantize_4bit"):
        Q.dequantize_nf4(q)


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_input_errors():
    with pytest.raises(TypeError, match="floating-point"):
        Q.quantize_nf4(torch.arange(128))
    with pytest.raises(TypeError, match="floating-point"):
        Q.quantize_nf4([0.1, 0.2])
    for bad in (48, 0, -64, 64.0, True):
        with pytest.raises(ValueError, match="power of two"):
            Q.quantize_nf4(torch.randn(128), block_size=bad)
    with pytest.raises(ValueError, match="unknown quant_type 'nf3'"):
        Q.quantize_4bit(torch.randn(128), quant_type="nf3")
    with pytest.raises(ValueError, match="NaN or infinite"):
        Q.quantize_nf4(torch.tensor([0.1, float("nan"), 0.3]))
    with pytest.raises(ValueError, match="empty"):
        Q.quantize_nf4(torch.zeros(0))
    model = tiny_gpt()
    with pytest.raises(ValueError, match="unknown quant_type"):
        Q.quantize_model(model, quant_type="int8")
    with pytest.raises(ValueError, match="power of two"):
        Q.quantize_model(model, block_size=100)
    assert type(model.transformer.h[0].attn.q_proj) is nn.Linear  # nothing was changed
    with pytest.raises(ValueError, match="2-D"):
        Q.Linear4bit(Q.quantize_nf4(torch.randn(4, 4, 4)))
    with pytest.raises(TypeError, match="nn.Linear"):
        Q.Linear4bit.from_linear(nn.Conv1d(3, 3, 1))


# ---------------------------------------------------------------------------------------------- Linear4bit


def test_linear4bit_matches_functional_linear_and_stores_buffers():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    layer = Q.Linear4bit.from_linear(linear)
    x = torch.randn(3, 5, 96)
    expected = F.linear(x, Q.dequantize_nf4(layer.quantized_weight), linear.bias)
    assert torch.equal(layer(x), expected)
    assert torch.equal(layer.dequantize(), Q.dequantize_nf4(Q.quantize_nf4(linear.weight)))
    assert [n for n, _ in layer.named_parameters()] == ["bias"] and not layer.bias.requires_grad
    assert {n for n, _ in layer.named_buffers()} == {
        "weight_codes",
        "weight_absmax",
        "weight_absmax_scale",
        "weight_absmax_mean",
    }
    assert (layer.in_features, layer.out_features) == (96, 40)
    assert (layer(x) - linear(x)).abs().max() < 0.1 * linear(x).abs().max()  # close to the fp layer

    fresh = Q.Linear4bit.from_linear(nn.Linear(96, 40))
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), layer(x))


def bitsandbytes_linear4bit(linear, double_quant, compute_dtype, device):
    """bitsandbytes' Linear4bit holding `linear`'s weight (NF4, blocks of 64), quantized as it moves to `device`."""
    import bitsandbytes

    layer = bitsandbytes.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=True,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type="nf4",
    )
    layer.weight = bitsandbytes.nn.Params4bit(
        linear.weight.detach().clone(),
        requires_grad=False,
        blocksize=64,
        compress_statistics=double_quant,
        quant_type="nf4",
    )
    layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to(device)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_linear4bit_computes_what_bitsandbytes_linear4bit_and_matmul_4bit_compute(compute_dtype, double_quant, device):
    """Our Linear4bit holding bitsandbytes' stored weight gives bitsandbytes.nn.Linear4bit's outputs and input gradients
    (and bitsandbytes.matmul_4bit's), in fp32 and bf16 compute; without double quantization our own quantization of
    the layer stores the same bits, so Linear4bit.from_linear computes the same too."""
    bitsandbytes_on(device)  # skips where bitsandbytes cannot run on this device
    import bitsandbytes

    torch.manual_seed(6)
    linear = nn.Linear(256, 96)
    nn.init.normal_(linear.bias, std=0.5)
    theirs = bitsandbytes_linear4bit(linear, double_quant, compute_dtype, device)
    ours = Q.Linear4bit(
        stored_like_bitsandbytes(theirs.weight.data, theirs.weight.quant_state), theirs.bias, compute_dtype
    ).to(device)
    x = torch.randn(3, 5, 256, device=device)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
    assert y_ours.dtype == y_theirs.dtype == torch.float32  # computed in compute_dtype, returned as the input's dtype
    tolerance = 1e-5 if compute_dtype == torch.float32 else 2e-2  # bf16: one rounding of the output, 8 bits of mantissa
    assert (y_ours - y_theirs).abs().max().item() <= tolerance * y_theirs.abs().max().item()
    assert (y_ours - linear(x.cpu()).to(device)).abs().max().item() > 1e-3  # 4-bit weights: not the fp32 layer
    grad = torch.randn_like(y_ours)
    y_ours.backward(grad), y_theirs.backward(grad)
    assert (x_ours.grad - x_theirs.grad).abs().max().item() <= tolerance * x_theirs.grad.abs().max().item()
    state = theirs.weight.quant_state
    with torch.no_grad():
        functional = bitsandbytes.matmul_4bit(
            x.to(compute_dtype), theirs.weight.data.t(), state, bias=theirs.bias.to(compute_dtype)
        )
        assert (ours(x) - functional.float()).abs().max().item() <= tolerance * functional.float().abs().max().item()
    if not double_quant:
        from_linear = Q.Linear4bit.from_linear(linear.to(device), compute_dtype=compute_dtype, double_quant=False)
        assert torch.equal(from_linear.weight_codes, theirs.weight.data.view(-1))
        with torch.no_grad():
            assert torch.equal(from_linear(x), ours(x))


def test_linear4bit_gradient_reaches_input_not_weight():
    torch.manual_seed(0)
    layer = Q.Linear4bit.from_linear(nn.Linear(64, 32), double_quant=False)
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not b.requires_grad and b.grad is None for b in layer.buffers())
    assert layer.bias.grad is None
    expected = torch.func.grad(lambda x_: F.linear(x_, layer.dequantize(), layer.bias).square().sum())(x.detach())
    assert torch.allclose(x.grad, expected)


def test_linear4bit_keeps_no_dense_weight_between_forward_and_backward():
    # QLoRA's memory saving holds in training only if autograd does not save the dequantized weight for backward
    torch.manual_seed(0)
    layer = Q.Linear4bit.from_linear(nn.Linear(512, 256, bias=False))
    x = torch.randn(2, 512, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    dense_bytes = 512 * 256 * 4
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    assert saved_bytes < dense_bytes / 4, f"autograd saved {saved_bytes} bytes, a dense weight is {dense_bytes}"
    y.square().sum().backward()
    expected = torch.func.grad(lambda x_: F.linear(x_, layer.dequantize()).square().sum())(x.detach())
    assert torch.allclose(x.grad, expected)


def test_linear4bit_backward_under_autocast():
    # autocast runs the forward matmul in bf16 even with fp32 compute: backward must take a bf16 gradient
    torch.manual_seed(0)
    layer = Q.Linear4bit.from_linear(nn.Linear(64, 32), compute_dtype=torch.float32)
    x = torch.randn(4, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().square().sum().backward()
    expected = torch.func.grad(lambda x_: F.linear(x_, layer.dequantize(), layer.bias).square().sum())(x.detach())
    assert x.grad.dtype == torch.float32 and torch.allclose(
        x.grad, expected, rtol=0.05, atol=0.05 * expected.abs().max().item()
    )


def test_linear4bit_unfrozen_bias_gets_its_gradient():
    torch.manual_seed(0)
    layer = Q.Linear4bit.from_linear(nn.Linear(64, 32))
    layer.bias.requires_grad_(True)
    x = torch.randn(3, 5, 64)
    layer(x).square().sum().backward()
    bias = layer.bias.detach().clone()
    expected = torch.func.grad(lambda b: F.linear(x, layer.dequantize(), b).square().sum())(bias)
    assert torch.allclose(layer.bias.grad, expected, atol=1e-5)


def test_linear4bit_compute_dtype():
    layer = Q.Linear4bit.from_linear(nn.Linear(64, 16), compute_dtype=torch.bfloat16)
    x = torch.randn(2, 64)
    y = layer(x)
    assert y.dtype == torch.float32  # computed in bf16, returned in the input's dtype
    expected = F.linear(x.bfloat16(), layer.dequantize(torch.bfloat16), layer.bias.bfloat16()).float()
    assert torch.equal(y, expected)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
def test_linear4bit_on_gpu_computes_in_bf16():
    layer = Q.Linear4bit.from_linear(nn.Linear(256, 128)).cuda()
    x = torch.randn(4, 256, device="cuda")
    y = layer(x)
    expected = F.linear(x.bfloat16(), layer.dequantize(torch.bfloat16), layer.bias.bfloat16()).float()
    assert y.device.type == "cuda" and torch.equal(y, expected)


# --------------------------------------------------------------------------------------- whole models


def test_quantize_model_replaces_linears_but_not_embeddings_or_tied_head():
    model = tiny_gpt()
    idx = torch.randint(0, 97, (2, 16))
    before, _ = model(idx)
    Q.quantize_model(model)
    for block in model.transformer.h:
        for layer in (
            block.attn.q_proj,
            block.attn.k_proj,
            block.attn.v_proj,
            block.attn.o_proj,
            block.mlp.fc_in,
            block.mlp.fc_out,
        ):
            assert isinstance(layer, Q.Linear4bit)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.transformer.wte.weight
    after, _ = model(idx)
    dense, _ = Q.dequantize_model(copy.deepcopy(model))(idx)
    assert torch.allclose(after, dense, atol=1e-6)  # exactly the model with the dequantized weights
    assert (after - before).abs().mean() < 0.2 * before.abs().mean()  # and close to the original

    model = Q.quantize_model(tiny_gpt(), skip=("fc_out",), double_quant=False, quant_type="fp4")
    assert type(model.transformer.h[0].mlp.fc_out) is nn.Linear
    assert model.transformer.h[0].mlp.fc_in.quant_type == "fp4"


def test_memory_report_gpt2_124m_shaped_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig())  # GPT-2 124M's shapes, random weights
    n_params = count_parameters(model)[1]  # 124,439,808: the tied head counted once
    Q.quantize_model(model)
    rows = {r["component"]: r for r in Q.memory_report(model)}
    linear = rows["linear weights"]
    assert linear["params"] == 12 * (4 * 768 * 768 + 2 * 768 * 3072)
    assert linear["bits_before"] == 32 and abs(linear["bits_after"] - 4.13) < 0.005
    embeddings = rows["embeddings (wte, wpe)"]
    assert embeddings["params"] == 50257 * 768 + 1024 * 768 and embeddings["bits_after"] == 32
    assert rows["layer norms"]["bits_after"] == 32 and rows["linear biases"]["bits_after"] == 32
    total = rows["total"]
    assert total["params"] == n_params == 124_439_808
    assert total["bytes_before"] == 4 * total["params"]
    assert total["bytes_after"] == sum(r["bytes_after"] for c, r in rows.items() if c != "total")
    table = Q.format_memory_report(Q.memory_report(model))
    assert "linear weights" in table and "4.127" in table


def test_memory_report_counts_lora_adapters_separately():
    model = lora.apply_lora(Q.quantize_model(tiny_gpt()), rank=4, alpha=8, targets="all-linear")
    rows = {r["component"]: r for r in Q.memory_report(model)}
    n_lora = sum(p.numel() for n, p in model.named_parameters() if ("lora_" in n))
    assert rows["LoRA adapters"]["params"] == n_lora
    assert rows["linear weights"]["params"] == 2 * (4 * 64 * 64 + 2 * 64 * 256)


# ----------------------------------------------------------------------------------------------- QLoRA


def test_qlora_training_step_updates_only_adapters(device):
    torch.manual_seed(0)
    model = lora.apply_lora(Q.quantize_model(tiny_gpt().to(device)), rank=4, alpha=8, targets="all-linear")
    assert all(isinstance(layer.base, Q.Linear4bit) for _, layer in lora.lora_layers(model))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_" in n) for n in trainable)
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers_before = {n: b.clone() for n, b in model.named_buffers()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(0, 97, (4, 16)).to(device)
    losses = []
    for _ in range(3):  # B starts at 0, so A only gets a gradient from the second step on
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    for n, p in model.named_parameters():
        assert torch.equal(p, params_before[n]) != ("lora_" in n), n  # adapters all changed, nothing else
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers_before[n]), n
    assert losses[-1] < losses[0]


def test_merge_lora_into_dequantized_copy_matches_qlora_model():
    torch.manual_seed(0)
    model = lora.apply_lora(Q.quantize_model(tiny_gpt()), rank=4, alpha=8, targets=("q", "v", "mlp_in"))
    for _, layer in lora.lora_layers(model):  # a trained-looking adapter: B != 0
        nn.init.normal_(layer.lora_B.weight, std=0.05)
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        expected, _ = model(idx)
        merged = Q.merge_lora_into_dequantized(model)
        got, _ = merged(idx)
    assert not any(isinstance(m, (Q.Linear4bit, lora.LoRALinear)) for m in merged.modules())
    assert isinstance(model.transformer.h[0].attn.q_proj.base, Q.Linear4bit)  # the original is untouched
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        plain_base, _ = Q.dequantize_model(disable_adapters(model))(idx)
    assert (got - plain_base).abs().max() > 1e-2  # the adapter's update really is in the merged weights


def test_quantize_model_refuses_a_merged_adapter():
    model = lora.merge_lora(lora.apply_lora(tiny_gpt(), rank=4, alpha=8))
    with pytest.raises(ValueError, match="unmerge_lora"):
        Q.quantize_model(model)
    with pytest.raises(TypeError, match="merge_lora_into_dequantized"):  # lora.py points 4-bit users here
        lora.merge_lora(lora.apply_lora(Q.quantize_model(tiny_gpt()), rank=4, alpha=8))


def test_requantizing_a_merged_weight_rounds_a_small_update_away():
    """Why merge_lora_into_dequantized keeps the merged weight dense: a small ΔW mostly rounds away."""
    torch.manual_seed(0)
    W0 = Q.dequantize_nf4(Q.quantize_nf4(torch.randn(256, 256) * 0.02))
    delta = 1e-4 * torch.randn(256, 8) @ torch.randn(8, 256) / 8**0.5  # rank 8, |ΔW| = 0.5% of |W0|
    requantized = Q.dequantize_nf4(Q.quantize_nf4(W0 + delta))
    kept = (requantized - W0).flatten() @ delta.flatten() / delta.norm() ** 2
    assert kept < 0.5  # less than half of the update survives re-quantization
