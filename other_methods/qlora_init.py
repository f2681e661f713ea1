"""
Starting QLoRA where it cancels the quantization error: PiSSA (Meng et al. 2024, arXiv:2404.02948, §3-4) and LoftQ
(Li et al. 2023, arXiv:2310.08659, §3).

QLoRA (quantize.py) trains W ≈ dequant(Q(W)) + s·BA from B = 0, s = alpha / r. At step 0 the model is the 4-bit base,
and the quantization error E = W - dequant(Q(W)) is never compensated: the adapter spends its first steps (and some of
its rank) undoing noise. Two starts put the adapter where it cancels part of that error before training begins:

  PiSSA   the top r singular directions of W go into the adapter and only the residual is quantized:
              W = U S V^T,    B = U_r sqrt(S_r / s),   A = sqrt(S_r / s) V_r^T,   so s·BA = U_r S_r V_r^T
              Q = Q(W - s·BA)
          The residual lacks W's largest directions, so its blocks have smaller absmax and smaller rounding errors;
          what is left at step 0 is the residual's quantization error alone. Training then moves the principal
          directions, which PiSSA argues are the ones that matter (QPiSSA, §4, is this start on a 4-bit base).
  LoftQ   alternate between quantizing and fitting the error with rank r (Algorithm 1), from B_0 A_0 = 0:
              Q_t = Q(W - s·B_{t-1} A_{t-1}),     s·B_t A_t = the best rank-r approximation of W - dequant(Q_t)
          One iteration is QLoRA's own Q(W) plus the SVD of its error; each further one lets the quantization
          absorb what the low-rank part cannot and vice versa.

Both return a 4-bit weight and (A, B) for it, so the start error ||W - (dequant(Q) + s·BA)||_F is below QLoRA's
||W - dequant(Q(W))||_F (start_error measures it; experiments.peft_family records it per run).

PEFT has both (`init_lora_weights="pissa"` and `"loftq"`). PiSSA here equals PEFT's to the last bit (its SVD split and
residual; our NF4 is bit-identical to bitsandbytes', so QPiSSA follows). PEFT's LoftQ puts B A = W - dequant(Q) without
dividing by s, which is exact only for alpha = r; here it is divided by s, and for alpha = r it equals PEFT's
loftq_init to the last bit too (tests/test_qlora_init.py; PEFT hard-codes a CUDA device there, which the test points
at the CPU).

Both starts change the frozen base: Q holds a residual, not W. The adapter (A, B) means something only on that base,
so keep the quantized model's state_dict with it, not the adapter alone; and one base serves one such adapter.
"""

import torch
import torch.nn as nn

from lora import apply_lora, dense_weight, lora_layers, replace_module, resolve_targets
from quantize import Linear4bit, dequantize_4bit, quantize_4bit, quantize_model

STARTS = ("zeros", "pissa", "loftq")  # zeros: plain QLoRA, B = 0 on Q(W)


def rank_r_factors(matrix, rank, scaling):
    """(A, B) with scaling · B A the best rank-r approximation of `matrix` (Eckart-Young: the top r singular values and
    vectors), the singular values split evenly between them: B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    root = torch.sqrt(S[:rank] / scaling)
    return root[:, None] * Vh[:rank], U[:, :rank] * root


def pissa_start(weight, rank, scaling, quant_type="nf4", block_size=64, double_quant=True):
    """PiSSA: (the quantized residual, A, B) with s·BA = W's top r singular directions and the residual W - s·BA."""
    weight = weight.detach().float()
    A, B = rank_r_factors(weight, rank, scaling)
    return quantize_4bit(weight - scaling * B @ A, quant_type, block_size, double_quant), A, B


def loftq_start(weight, rank, scaling, iterations=5, quant_type="nf4", block_size=64, double_quant=True):
    """LoftQ, `iterations` alternations of quantizing W - s·BA and fitting s·BA to W - dequant(Q) with rank r."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"LoftQ needs at least one iteration, got {iterations!r}; the paper uses 1 to 5")
    weight = weight.detach().float()
    low_rank = torch.zeros_like(weight)
    for _ in range(iterations):
        q = quantize_4bit(weight - low_rank, quant_type, block_size, double_quant)
        A, B = rank_r_factors(weight - dequantize_4bit(q, torch.float32), rank, scaling)
        low_rank = scaling * B @ A
    return q, A, B


def start_error(weight, layer):
    """||W - (dequant(Q) + s·BA)||_F of a lora.LoRALinear on a 4-bit base against the dense weight W it stands for."""
    with torch.no_grad():
        approximation = dense_weight(layer.base).float() + layer.delta_weight().float()
        return torch.linalg.norm(weight.float() - approximation).item()


def apply_qlora(
    model,
    rank=8,
    alpha=16,
    targets=("q", "v"),
    init="loftq",
    iterations=5,
    quant_type="nf4",
    block_size=64,
    double_quant=True,
    trainable=(),
):
    """QLoRA on a dense model (a model.GPT, or a model holding one): every linear layer quantized as
    quantize.quantize_model does (the tied output layer and `trainable` ones stay as they are), LoRA on `targets`,
    and each target started as `init` says: 'zeros' (plain QLoRA: Q(W), B = 0), 'pissa' or 'loftq'. Returns
    (model, {layer name: its dense weight W}), the weights to measure start_error against."""
    if init not in STARTS:
        raise ValueError(f"unknown start {init!r}; use one of {', '.join(STARTS)}")
    suffixes = resolve_targets(targets)
    trainable = (trainable,) if isinstance(trainable, str) else tuple(trainable)
    dense = {
        name: m.weight.detach().float().clone()
        for name, m in model.named_modules()
        if type(m) is nn.Linear and any(name.endswith("." + s) for s in suffixes)
    }
    if not dense:
        raise ValueError(
            f"no dense nn.Linear of this {type(model).__name__} is named like {', '.join(suffixes)}; "
            f"apply_qlora quantizes a dense model itself"
        )
    quantize_model(model, block_size, double_quant, quant_type, skip=(*trainable, *suffixes))
    starts = {}
    for name, weight in dense.items():
        linear = model.get_submodule(name)
        scaling = alpha / rank  # what LoRALinear will use (plain LoRA scaling)
        if init == "pissa":
            q, A, B = pissa_start(weight, rank, scaling, quant_type, block_size, double_quant)
        elif init == "loftq":
            q, A, B = loftq_start(weight, rank, scaling, iterations, quant_type, block_size, double_quant)
        else:
            q, A, B = quantize_4bit(weight, quant_type, block_size, double_quant), None, None
        replace_module(model, name, Linear4bit(q, linear.bias).requires_grad_(False))
        starts[name] = (A, B)
    apply_lora(model, rank, alpha, targets, trainable=trainable)
    with torch.no_grad():
        for name, layer in lora_layers(model):
            A, B = starts.get(name, (None, None))
            if A is not None:
                layer.lora_A.weight.copy_(A)
                layer.lora_B.weight.copy_(B)
    return model, dense
