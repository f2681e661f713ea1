"""
4-bit NormalFloat (NF4) quantization, double quantization and QLoRA, read top to bottom.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv 2305.14314) fine-tunes
a model whose frozen base weights are stored in 4 bits. Each forward pass dequantizes a weight to bf16 just
in time, multiplies, and throws the dense copy away (§3 Eq. 5); only the small LoRA adapters next to it are
trained, in higher precision. The pieces, in the order this file builds them:

    code books     16 (or 15) values in [-1, 1] that a 4-bit index can name: NF4 (§3 Eq. 4), FP4, int4
    blockwise      per block of 64 weights: divide by the block's absmax, round to the nearest code
                   (§2 Eq. 1-2); pack two 4-bit indices per byte
    double quant   quantize the fp32 absmax scales themselves to 8 bits (§3 "Double Quantization")
    Linear4bit     a frozen nn.Linear whose weight lives in those bytes
    quantize_model swap a GPT's linear layers for Linear4bit; memory_report says what it saved
    merge          fold a trained adapter into a dequantized copy (merge_lora_into_dequantized)

Storage per weight, for blocks of 64:   4 bits of code
                                      + 32/64           = 0.5   bits of fp32 absmax          (no DQ)
                                      + 8/64 + 32/(64*256) = 0.127 bits of 8-bit absmax + fp32 scales (DQ)
so NF4 costs 4.5 bits/param, NF4 + double quantization 4.127 bits/param.

The layout (sorted code book, first element of a pair in the high nibble, fp32 absmax, and the rounding rule)
follows bitsandbytes, so our codes and scales are bit-identical to bitsandbytes.functional.quantize_4bit's
(tests/test_quantize.py checks this). This file does not use bitsandbytes; it only matches its semantics.
"""

import copy
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import merge_lora, replace_module

QUANT_TYPES = ("nf4", "fp4", "int4")
DOUBLE_QUANT_BLOCK_SIZE = 256  # §3: the absmax scales are quantized in blocks of 256

# ----------------------------------------------------------------------------------------------------------
# Code books: the values a 4-bit index stands for, sorted, in [-1, 1].


def nf4_code_book():
    """The 16 NormalFloat-4 values (QLoRA §3 "4-bit NormalFloat Quantization", Eq. 4).

    If weights are N(0, sigma), the information-theoretically best 4-bit code puts the same number of weights
    in every bin: bins bounded by quantiles of N(0, 1), each code value inside its bin. Eq. 4 takes
    q_i = (Q(i / 17) + Q((i + 1) / 17)) / 2, but Q(0) = -inf and Q(1) = +inf, so the outermost probability is
    trimmed to `offset` = 0.9677083, the mean of 1 - 1/(2*15) and 1 - 1/(2*16) rounded to 7 digits.

    A symmetric code has no exact zero (an even number of values), yet zero must be exact: the padding and
    any weights that really are zero would otherwise come back as noise. So the code is asymmetric: 8 positive values at
    quantiles of probabilities evenly spaced from `offset` down to 0.5 (excluded), 7 negative values likewise,
    plus 0. Dividing by the largest value normalizes to [-1, 1] so that the block's absmax maps to +-1.

    The probabilities are spaced in float32 and the division is done in float32, as in the reference
    implementation, so that the table (and so the rounding midpoints between its entries) matches
    bitsandbytes' to the last bit: with float64 spacing the values differ by up to 2e-7.
    """
    offset = 0.9677083
    positive_p = torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1]  # 8 probabilities in (0.5, offset]
    negative_p = torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1]  # 7 probabilities
    positive = torch.special.ndtri(positive_p.double())  # ndtri = Q, the inverse CDF of N(0, 1)
    negative = -torch.special.ndtri(negative_p.double())
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    return values / values.max()


def fp4_code_book():
    """FP4 in the E2M1 layout (1 sign, 2 exponent, 1 mantissa bit, exponent bias 1): the 15 distinct values
    +-{0, 0.5, 1, 1.5, 2, 3, 4, 6} / 6. The two bit patterns for +0 and -0 name the same value, so one of
    the 16 codes is wasted. (bitsandbytes' "fp4" uses a different bias: its smallest non-zero value is
    0.0052 instead of 0.0833; every other value is the same.)"""
    bias, magnitudes = 1, set()
    for exponent in range(4):
        for mantissa in (0, 1):
            if exponent == 0:  # subnormal: 0.m x 2^(1 - bias), no implicit leading 1
                magnitudes.add(mantissa / 2 * 2.0 ** (1 - bias))
            else:  # normal: 1.m x 2^(exponent - bias)
                magnitudes.add((1 + mantissa / 2) * 2.0 ** (exponent - bias))
    values = torch.tensor(sorted({sign * m for m in magnitudes for sign in (1.0, -1.0)}), dtype=torch.float32)
    return values / values.max()


def int4_code_book():
    """Symmetric absmax int4: round(7 * w / absmax) for integers -7..7, i.e. 15 evenly spaced values in [-1, 1]
    (§2 Eq. 1 with 127 -> 7). Using -8 too would make the range asymmetric, so one code goes unused."""
    return torch.arange(-7, 8, dtype=torch.float32) / 7


def dynamic_8bit_code_book():
    """The signed 8-bit "dynamic" code of Dettmers 2015 ("8-Bit Approximations for Parallelism in Deep
    Learning"), which double quantization uses for the absmax scales. Values span seven decades: for
    i = 0..6, 2^i linearly spaced bin midpoints in [0.1, 1] * 10^(i-6), both signs; plus 0 and 1.
    Small magnitudes get relative precision, large ones absolute precision: 256 sorted values."""
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        midpoints = ((edges[:-1] + edges[1:]) / 2 * 10 ** (i - 6)).tolist()
        values += midpoints + [-m for m in midpoints]
    return torch.tensor(sorted(values), dtype=torch.float32)


CODE_BOOKS = {"nf4": nf4_code_book(), "fp4": fp4_code_book(), "int4": int4_code_book()}
DYNAMIC_8BIT_CODE_BOOK = dynamic_8bit_code_book()


@functools.cache
def code_book_on(quant_type, device):
    """(code book, the same padded to 16 values) on `device`, copied there once: dequantize runs in every forward
    and backward. 15-value books never use index 15; the padding makes any 4-bit index a valid lookup."""
    code = CODE_BOOKS[quant_type]
    return code.to(device), torch.cat([code, code.new_zeros(16 - code.numel())]).to(device)


@functools.cache
def dynamic_8bit_code_on(device):
    """DYNAMIC_8BIT_CODE_BOOK on `device`, copied there once (dequantize runs in every forward and backward)."""
    return DYNAMIC_8BIT_CODE_BOOK.to(device)


# ----------------------------------------------------------------------------------------------------------
# Blockwise absmax quantization (§2 Eq. 1-2): one outlier only spoils the scale of its own block.


def check_quant_type(quant_type):
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}: use one of {', '.join(QUANT_TYPES)}")


def check_block_size(block_size):
    is_int = isinstance(block_size, int) and not isinstance(block_size, bool)
    if not is_int or block_size < 2 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two such as 64, got {block_size!r}")


def quantize_blocks(flat, code, block_size):
    """Split a 1-D float32 tensor into blocks (the last one padded with zeros), scale each by 1/absmax into
    [-1, 1] and round to the nearest value of the sorted `code`. Returns the uint8 code indices (a whole
    number of blocks) and the fp32 absmax of each block.

    Rounding: torch.bucketize against the midpoints between neighbouring codes; a value exactly on a
    midpoint goes to the lower code. Scaling multiplies by the reciprocal of absmax rather than dividing,
    like bitsandbytes (the two can differ in the last bit, which would move values sitting on a midpoint)."""
    padding = -flat.numel() % block_size
    if padding:
        flat = F.pad(flat, (0, padding))  # zeros never raise a block's absmax
    blocks = flat.view(-1, block_size)
    # abs().amax() rather than vector_norm(ord=inf), which gives the same (NaN included) but is slower on the CPU
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]  # clamp: an all-zero block stays 0, not NaN
    midpoints = (code[:-1] + code[1:]) / 2
    # no need to clamp `scaled` to [-1, 1]: anything past the outer midpoints lands on the end codes anyway
    indices = torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)
    return indices.view(-1), absmax


def pack_4bit(indices):
    """Two 4-bit indices per byte (an even count of them), the first in the high nibble, as bitsandbytes."""
    pairs = indices.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


@dataclass
class QuantizedTensor:
    """A tensor in 4-bit blockwise form. `codes` holds ceil(numel / 2) bytes; `absmax` one scale per block:
    fp32, or uint8 indices into the dynamic 8-bit code when double quantized, in which case `absmax_scale`
    (fp32, one per 256 blocks) and `absmax_mean` (fp32 scalar) undo the second level."""

    codes: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    block_size: int = 64
    quant_type: str = "nf4"
    absmax_scale: torch.Tensor | None = None
    absmax_mean: torch.Tensor | None = None

    @property
    def double_quant(self):
        return self.absmax_scale is not None

    def numel(self):
        return math.prod(self.shape)

    @property
    def nbytes(self):
        """Bytes of tensor storage: codes + scales (the shape/dtype metadata, a few bytes, is not counted)."""
        tensors = (self.codes, self.absmax, self.absmax_scale, self.absmax_mean)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def bits_per_param(self):
        return 8 * self.nbytes / self.numel()


def quantize_4bit(w, quant_type="nf4", block_size=64, double_quant=True):
    """Blockwise 4-bit quantization of any float tensor with the code book `quant_type` ("nf4", "fp4",
    "int4"). Any size works: the last block is padded with zeros, which the codes do not store."""
    check_quant_type(quant_type)
    check_block_size(block_size)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        got = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
        raise TypeError(f"quantize_4bit needs a floating-point tensor, got {got}; convert it with .float() first")
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    flat = w.detach().reshape(-1).float()
    code, _ = code_book_on(quant_type, flat.device)
    indices, absmax = quantize_blocks(flat, code, block_size)
    if not torch.isfinite(absmax).all():  # a NaN or inf anywhere shows up in its block's absmax
        raise ValueError("tensor has NaN or infinite values; absmax scaling would turn their whole block into NaN")
    n = w.numel()
    codes = pack_4bit(indices[: n + n % 2])  # an odd count keeps one padding zero to fill the last byte
    q = QuantizedTensor(codes, absmax, w.shape, w.dtype, block_size, quant_type)
    if double_quant:
        q.absmax, q.absmax_scale, q.absmax_mean = double_quantize_absmax(absmax)
    return q


def double_quantize_absmax(absmax):
    """QLoRA §3 "Double Quantization": treat the fp32 absmax scales c2 as a tensor and quantize them too.
    They are all positive, so their mean is subtracted first to use the signed code's full range; then 8-bit
    blockwise quantization with the dynamic code, blocks of 256. Costs 8/64 + 32/(64*256) = 0.127 instead of
    32/64 = 0.5 bits per parameter. Returns (uint8 indices, fp32 scale per 256 blocks, fp32 mean)."""
    mean = absmax.mean()
    indices, scale = quantize_blocks(absmax - mean, dynamic_8bit_code_on(absmax.device), DOUBLE_QUANT_BLOCK_SIZE)
    return indices[: absmax.numel()], scale, mean


def dequantize_absmax(q):
    """The fp32 per-block scales of q, undoing double quantization if present (§3 Eq. 6, inner dequant)."""
    # .float(): a no-op unless model.to(torch.bfloat16) has cast these floating-point buffers as well
    if not q.double_quant:
        return q.absmax.float()
    code = dynamic_8bit_code_on(q.absmax.device)
    values = code[q.absmax.long()]
    padding = -values.numel() % DOUBLE_QUANT_BLOCK_SIZE
    scaled = F.pad(values, (0, padding)).view(-1, DOUBLE_QUANT_BLOCK_SIZE) * q.absmax_scale.float()[:, None]
    return scaled.view(-1)[: q.absmax.numel()] + q.absmax_mean.float()


def dequantize_4bit(q, dtype=None):
    """Back to a dense tensor of q.shape (§2 Eq. 2): unpack the two 4-bit indices of each byte, look each one up in
    the code book, multiply it by its block's absmax. Computed in fp32, returned as `dtype` (default: the dtype the
    tensor had before quantization)."""
    indices = torch.stack([q.codes >> 4, q.codes & 0x0F], dim=1).view(-1)  # the first of a pair is the high nibble
    _, code = code_book_on(q.quant_type, q.codes.device)
    values = code[indices.long()]  # each 4-bit index -> its value in [-1, 1]
    absmax = dequantize_absmax(q)  # one fp32 scale per block
    values = F.pad(values, (0, absmax.numel() * q.block_size - values.numel()))  # the last block's padding
    values = (values.view(-1, q.block_size) * absmax[:, None]).view(-1)
    return values[: q.numel()].view(q.shape).to(dtype or q.dtype)


def quantize_nf4(w, block_size=64, double_quant=True):
    """NF4 quantization of w (QLoRA §3): see quantize_4bit."""
    return quantize_4bit(w, "nf4", block_size, double_quant)


def dequantize_nf4(q, dtype=None):
    if q.quant_type != "nf4":
        raise ValueError(f"this tensor was quantized as {q.quant_type!r}, not 'nf4'; use dequantize_4bit")
    return dequantize_4bit(q, dtype)


# ----------------------------------------------------------------------------------------------------------
# A frozen linear layer stored in 4 bits


class DequantizedLinear(torch.autograd.Function):
    """y = x W^T + b for the frozen 4-bit W of a Linear4bit, dequantized in forward and dequantized again in
    backward. With a plain F.linear, autograd would keep every layer's dense W from the forward pass until its
    backward, so training would hold all the fp32 weights that 4 bits were meant to save (QLoRA §3 dequantizes
    "just in time" in both passes). W gets no gradient: it is frozen."""

    @staticmethod
    def forward(ctx, x, layer, dtype, bias):
        ctx.layer = layer
        return F.linear(x, layer.dequantize(dtype), bias)

    @staticmethod
    def backward(ctx, grad_output):
        # under autocast the forward may have run in a lower precision than the layer's compute dtype: match the
        # gradient
        grad_x = grad_output @ ctx.layer.dequantize(grad_output.dtype) if ctx.needs_input_grad[0] else None
        # a bias is frozen in QLoRA, but if a user unfreezes it, it must still get its gradient
        grad_bias = grad_output.reshape(-1, grad_output.size(-1)).sum(0) if ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_bias


class Linear4bit(nn.Module):
    """Drop-in for a frozen nn.Linear whose weight is stored blockwise in 4 bits (QLoRA §3 Eq. 5-6):

        y = x doubleDequant(c1, c2, W_nf4)^T + b      computed in `compute_dtype`

    The packed codes and scales are buffers, not parameters: they move with .to(device) and are saved in
    the state_dict, but no optimizer sees them and no gradient reaches them. The dense weight exists only
    inside the forward call and again inside the backward call (DequantizedLinear), never in between. Nothing is cached
    between calls: a cache would make a second forward faster but cost the 4-8x memory quantization saved.
    The bias is tiny, so it stays in its original precision (frozen, as the base model is in QLoRA).

    compute_dtype None means bf16 on a GPU (QLoRA's choice) and fp32 on the CPU, where bf16 matmuls are slow.
    """

    def __init__(self, weight: QuantizedTensor, bias=None, compute_dtype=None):
        super().__init__()
        if len(weight.shape) != 2:
            shape = tuple(weight.shape)
            raise ValueError(f"Linear4bit needs a quantized 2-D (out_features, in_features) weight, got shape {shape}")
        self.out_features, self.in_features = weight.shape
        self.weight_dtype, self.block_size, self.quant_type = weight.dtype, weight.block_size, weight.quant_type
        self.compute_dtype = compute_dtype
        self.register_buffer("weight_codes", weight.codes)
        self.register_buffer("weight_absmax", weight.absmax)
        self.register_buffer("weight_absmax_scale", weight.absmax_scale)  # None (not saved) without double quant
        self.register_buffer("weight_absmax_mean", weight.absmax_mean)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # the definition, unless a program opts in to a faster way to the same values (support/fast_dequantize.py)
        self.dequantize_weight = dequantize_4bit

    @classmethod
    def from_linear(cls, linear, block_size=64, double_quant=True, compute_dtype=None, quant_type="nf4"):
        """Quantize an nn.Linear's weight; the new layer computes what the old one did, up to 4-bit rounding."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Linear4bit.from_linear needs an nn.Linear, got {type(linear).__name__}")
        weight = quantize_4bit(linear.weight, quant_type, block_size, double_quant)
        return cls(weight, linear.bias, compute_dtype)

    @property
    def weight_numel(self):
        """How many weights the packed buffers stand for (model.count_parameters counts these, not the bytes)."""
        return self.in_features * self.out_features

    @property
    def quantized_weight(self):
        """The buffers viewed as a QuantizedTensor again (wherever .to(device) has moved them)."""
        shape = torch.Size((self.out_features, self.in_features))
        return QuantizedTensor(
            self.weight_codes,
            self.weight_absmax,
            shape,
            self.weight_dtype,
            self.block_size,
            self.quant_type,
            absmax_scale=self.weight_absmax_scale,
            absmax_mean=self.weight_absmax_mean,
        )

    def dequantize(self, dtype=None):
        """The dense (out_features, in_features) weight, in its original dtype unless `dtype` is given."""
        return self.dequantize_weight(self.quantized_weight, dtype)

    def forward(self, x):
        dtype = self.compute_dtype or (torch.bfloat16 if x.is_cuda else torch.float32)
        bias = None if self.bias is None else self.bias.to(dtype)
        return DequantizedLinear.apply(x.to(dtype), self, dtype, bias).to(x.dtype)

    def to_linear(self):
        """A plain (frozen) nn.Linear holding the dequantized weight."""
        device, dtype = self.weight_codes.device, self.weight_dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dequantize())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def extra_repr(self):
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, block_size={self.block_size}, "
            f"double_quant={self.weight_absmax_scale is not None}"
        )


# ----------------------------------------------------------------------------------------------------------
# Whole models: quantize, report memory, and get back to dense weights


def tied_to_embedding(model, linear):
    return any(isinstance(m, nn.Embedding) and m.weight is linear.weight for m in model.modules())


def quantize_model(model, block_size=64, double_quant=True, quant_type="nf4", compute_dtype=None, skip=()):
    """Replace every nn.Linear of `model` with a Linear4bit, in place, and return the model.

    As in QLoRA, the embeddings stay as they are, and so does an output head whose weight is tied to the
    token embedding (GPT-2's lm_head is wte): quantizing it would quantize the embedding too. Layer norms
    and biases are a rounding error of the memory and stay in full precision. `skip` names more layers to
    keep (e.g. ("head",) for a classification head that is to be trained). Apply LoRA afterwards."""
    check_quant_type(quant_type)
    check_block_size(block_size)
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    if any(getattr(m, "merged", False) for m in model.modules()):
        raise ValueError(
            "a LoRA adapter is merged into this model's weights; call unmerge_lora(model) before quantizing"
        )
    replacements = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or tied_to_embedding(model, module):
            continue
        if any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip):
            continue
        replacements.append((name, module))
    for name, linear in replacements:
        replace_module(model, name, Linear4bit.from_linear(linear, block_size, double_quant, compute_dtype, quant_type))
    return model


def dequantize_model(model):
    """Replace every Linear4bit with an nn.Linear holding its dequantized weight, in place."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear4bit)]
    for name, layer in layers:
        replace_module(model, name, layer.to_linear())
    return model


def merge_lora_into_dequantized(model):
    """A plain floating-point copy of a QLoRA model with its active adapters merged: W = dequant(W_nf4) + ΔW.
    The model passed in is not changed.

    Why not merge into the 4-bit weight? Re-quantizing W0 + ΔW moves every weight to its nearest NF4 code. An
    update smaller than half a code step (about 0.1 sigma of W0 near zero, up to 0.4 sigma in the tails) is
    rounded away, a larger one survives only up to a rounding error as big as that step. Fine-tuning updates
    are usually small next to W0, so re-quantization erases or garbles much of what the adapter learned
    (notebook 03 measures how much). The dense copy keeps the update exactly, at 4x (bf16) to 8x (fp32) the
    memory of the 4-bit weights. Or do not merge at all: serve the 4-bit base with the adapter beside it,
    paying for the extra B A x matmuls."""
    merged = dequantize_model(copy.deepcopy(model))  # each LoRALinear's base becomes an nn.Linear
    return merge_lora(merged, unload=True)


def component_of(module, parameter_name, full_name):
    if any(part.startswith("lora_") for part in full_name.split(".")):
        return "LoRA adapters"
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if isinstance(module, (nn.Linear, Linear4bit)):
        return "linear weights" if parameter_name == "weight" else "linear biases"
    if isinstance(module, nn.LayerNorm):
        return "layer norms"
    return "other"


def memory_report(model):
    """Bytes and bits per parameter of each component of `model`, before and after quantization ("before"
    counts a Linear4bit's weight in the dtype it had). Returns a list of dicts, the last one the total;
    print(format_memory_report(rows)) shows them as a table. Tied tensors are counted once."""
    rows, seen, embeddings = {}, set(), []

    def add(component, params, before, after):
        row = rows.setdefault(component, dict(component=component, params=0, bytes_before=0, bytes_after=0))
        row["params"] += params
        row["bytes_before"] += before
        row["bytes_after"] += after

    for module_name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            q = module.quantized_weight
            add("linear weights", q.numel(), q.numel() * q.dtype.itemsize, q.nbytes)
            seen.update(id(t) for t in module.buffers())
        if isinstance(module, nn.Embedding) and id(module.weight) not in seen:
            embeddings.append(module_name.rpartition(".")[2])
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, t in tensors:
            if id(t) in seen:
                continue
            seen.add(id(t))
            full_name = f"{module_name}.{name}" if module_name else name
            add(component_of(module, name, full_name), t.numel(), t.nbytes, t.nbytes)
    if "embeddings" in rows:
        rows["embeddings"]["component"] = f"embeddings ({', '.join(embeddings)})"
    order = ["embeddings", "linear weights", "linear biases", "layer norms", "LoRA adapters", "other"]
    result = [rows[c] for c in order if c in rows]
    totals = {key: sum(row[key] for row in result) for key in ("params", "bytes_before", "bytes_after")}
    result.append(dict(component="total", **totals))
    for row in result:
        row["bits_before"] = 8 * row["bytes_before"] / max(row["params"], 1)
        row["bits_after"] = 8 * row["bytes_after"] / max(row["params"], 1)
    return result


def format_memory_report(rows):
    """memory_report's rows as a text table, sizes in MiB."""
    lines = [f"{'component':<28}{'params':>13}{'before MiB':>12}{'after MiB':>11}{'bits/param':>17}"]
    for r in rows:
        before, after = r["bytes_before"] / 2**20, r["bytes_after"] / 2**20
        bits = f"{r['bits_before']:.2f} -> {r['bits_after']:.3f}"
        lines.append(f"{r['component']:<28}{r['params']:>13,}{before:>12.2f}{after:>11.2f}{bits:>17}")
    return "\n".join(lines)
