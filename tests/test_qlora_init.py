"""qlora_init.py: PiSSA and LoftQ starts equal PEFT's initialisations (PiSSA on the CPU as PEFT runs it, LoftQ with
PEFT's hard-coded CUDA device pointed at the CPU), they reduce the error at step 0 below plain QLoRA's, and the
quantized model trains only A and B."""

import copy
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
import quantize as Q
from model import GPT, GPTConfig
from other_methods.qlora_init import apply_qlora, loftq_start, pissa_start, start_error


def structured_weight(out_features=96, in_features=64, rank=6, seed=0):
    """A weight like a trained one: a few strong directions on top of Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    strong = torch.randn(out_features, rank, generator=g) @ torch.randn(rank, in_features, generator=g) * 0.05
    return strong + 0.02 * torch.randn(out_features, in_features, generator=g)


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=64))
    with torch.no_grad():  # a random init has no strong directions; give the projections some, as training does
        for i, (name, p) in enumerate(gpt.named_parameters()):
            if p.ndim == 2 and "wte" not in name and "wpe" not in name:
                p.copy_(structured_weight(*p.shape, seed=i))
    return gpt.eval()


def test_pissa_equals_peft_pissa_and_the_residual_quantizes_like_bitsandbytes():
    peft = pytest.importorskip("peft")
    bnb = pytest.importorskip("bitsandbytes.functional")
    weight, rank, alpha = structured_weight(), 4, 8
    module = nn.Sequential()
    module.add_module("proj", nn.Linear(64, 96))
    with torch.no_grad():
        module.proj.weight.copy_(weight)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"], init_lora_weights="pissa")
    theirs = peft.get_peft_model(module, config).base_model.model.proj
    q, A, B = pissa_start(weight, rank, alpha / rank, double_quant=False)
    assert torch.equal(A, theirs.lora_A["default"].weight) and torch.equal(B, theirs.lora_B["default"].weight)
    residual = theirs.base_layer.weight.detach()
    packed, state = bnb.quantize_4bit(residual, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(Q.dequantize_4bit(q), bnb.dequantize_4bit(packed, state))  # QPiSSA: the same 4-bit residual


def run_peft_loftq_on_the_cpu(weight, bits, rank, iterations):
    """PEFT's loftq_init moves its work to a CUDA (or XPU) device it names itself; send those moves to the CPU, where
    bitsandbytes quantizes as well, and change nothing else."""
    loftq_utils = pytest.importorskip("peft.utils.loftq_utils")
    bnb = pytest.importorskip("bitsandbytes")
    tensor_to, params_to = torch.Tensor.to, bnb.nn.Params4bit.to

    def on_cpu(original):
        def to(self, *args, **kwargs):
            args = tuple("cpu" if a == "cuda" else a for a in args)
            kwargs = {k: "cpu" if v == "cuda" else v for k, v in kwargs.items()}
            return original(self, *args, **kwargs)

        return to

    with (
        mock.patch.object(torch.Tensor, "to", on_cpu(tensor_to)),
        mock.patch.object(bnb.nn.Params4bit, "to", on_cpu(params_to)),
    ):
        return loftq_utils.loftq_init(weight, bits, rank, num_iter=iterations)


@pytest.mark.parametrize("iterations", [1, 3])
def test_loftq_equals_peft_loftq_when_alpha_equals_rank(iterations):
    """PEFT's LoftQ sets B A to the fitted error without dividing by the scaling alpha / r: with alpha = r (scaling 1)
    the two agree. PEFT quantizes without double quantization."""
    weight, rank = structured_weight(), 4
    dequantized, their_A, their_B = run_peft_loftq_on_the_cpu(weight, 4, rank, iterations)
    q, A, B = loftq_start(weight, rank, scaling=1.0, iterations=iterations, double_quant=False)
    assert torch.equal(Q.dequantize_4bit(q), dequantized)  # the same 4-bit weight,
    assert torch.equal(A, their_A) and torch.equal(B, their_B)  # and the same factors, to the last bit


def test_the_starts_cancel_part_of_the_quantization_error():
    weight, rank = structured_weight(), 4
    plain = torch.linalg.norm(weight - Q.dequantize_4bit(Q.quantize_4bit(weight))).item()

    def error(q, A, B, scaling):
        return torch.linalg.norm(weight - Q.dequantize_4bit(q) - scaling * B @ A).item()

    pissa = error(*pissa_start(weight, rank, 2.0), 2.0)
    loftq = [error(*loftq_start(weight, rank, 2.0, iterations=t), 2.0) for t in (1, 2, 5)]
    assert pissa < 0.7 * plain and loftq[0] < 0.9 * plain  # measured: 0.46 and 0.87 of plain QLoRA's error
    assert loftq[2] < loftq[1] < loftq[0]
    # the scaling is divided out: the same product s·BA for any alpha
    q2, A2, B2 = pissa_start(weight, rank, 0.5)
    assert error(q2, A2, B2, 0.5) == pytest.approx(pissa, rel=1e-5)


@pytest.mark.parametrize("init", ["pissa", "loftq"])
def test_apply_qlora_starts_closer_to_the_dense_model(init):
    dense_model, idx = tiny_gpt(), torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = dense_model(idx)[0]
    plain, dense = apply_qlora(copy.deepcopy(dense_model), rank=4, alpha=8, targets="all-linear", init="zeros")
    started, _ = apply_qlora(copy.deepcopy(dense_model), rank=4, alpha=8, targets="all-linear", init=init, iterations=3)
    errors = {}
    for name, model in (("plain", plain), ("started", started)):
        layers = lora.lora_layers(model)
        assert len(layers) == 12 and all(isinstance(layer.base, Q.Linear4bit) for _, layer in layers)
        errors[name] = sum(start_error(dense[n], layer) ** 2 for n, layer in layers) ** 0.5
        with torch.no_grad():
            errors[name + " logits"] = (model(idx)[0] - expected).abs().mean().item()
    assert errors["started"] < 0.9 * errors["plain"]
    assert errors["started logits"] < errors["plain logits"]


def test_zeros_is_plain_qlora_and_only_the_adapter_trains():
    dense_model = tiny_gpt()
    torch.manual_seed(5)
    reference = lora.apply_lora(Q.quantize_model(copy.deepcopy(dense_model)), rank=4, alpha=8, targets="q,v")
    torch.manual_seed(5)
    ours, _ = apply_qlora(copy.deepcopy(dense_model), rank=4, alpha=8, targets="q,v", init="zeros")
    assert ours.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), reference.state_dict().values()))
    model, _ = apply_qlora(copy.deepcopy(dense_model), rank=4, alpha=8, targets="q,v", init="loftq", iterations=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    F.cross_entropy(model(idx)[0].flatten(0, 1), idx.flatten()).backward()
    optimizer.step()
    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    assert changed == trainable


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown start 'svd'"):
        apply_qlora(tiny_gpt(), init="svd")
    with pytest.raises(ValueError, match="at least one iteration"):
        loftq_start(structured_weight(), 4, 1.0, iterations=0)
    with pytest.raises(ValueError, match="quantizes a dense model itself"):
        apply_qlora(Q.quantize_model(tiny_gpt()), init="pissa")
