"""
Training in a random subspace: intrinsic dimension (Li et al. 2018, "Measuring the Intrinsic Dimension of
Objective Landscapes", arXiv:1804.08838; Aghajanyan et al. 2020, "Intrinsic Dimensionality Explains the
Effectiveness of Language Model Fine-Tuning", arXiv:2012.13255).

Freeze all D weights of a model at their pretrained values θ0 and train only d << D numbers θ_d, mapped into
the full weight space by a fixed random projection P (D x d):

    θ = θ0 + P θ_d                                  (Aghajanyan Eq. 1, "DID": direct intrinsic dimension)
    θ^i = θ0^i + λ_i (P θ_d)^i                      (Eq. 2, "SAID": structure-aware; one learned λ_i per layer)

The intrinsic dimension of a task is the smallest d for which this reaches a set fraction of full
fine-tuning's result; d90 for 90% (Aghajanyan §3). They found a few hundred to a few thousand for BERT and
RoBERTa on MRPC and QQP: fine-tuning a pretrained model is a low-dimensional problem, which is why LoRA's
low-rank updates (and every other method here) work at all.

P is never built: for GPT-2 124M it would be 124M x d numbers. It is a Fastfood transform (Le et al. 2013, as
used by Li et al. §2 and Aghajanyan §3), P θ_d = first D entries of

    (1/√(L·D)) · H G Π H B · pad(θ_d to length L),      L = the power of two >= D

with B a random diagonal of ±1, H the L x L Walsh-Hadamard matrix (applied by `fast_walsh_hadamard`
as a few products with small Hadamard matrices, never stored), Π a random permutation and G a random Gaussian diagonal rescaled so that
|G|² = L. Its storage is 3 vectors of length L, and each column of P has squared length 1 in expectation
(exactly 1 when D = L), so ||P θ_d|| ≈ ||θ_d||.

`IntrinsicDimension(model, d)` wraps any model: its trainable parameters are θ_d (and SAID's λ), its forward
computes θ0 + P θ_d and calls the model with those weights (torch.func.functional_call), so the model's own
tensors are never changed. Layer here means parameter tensor (each weight matrix and each bias), as in
Aghajanyan's implementation of SAID.
"""

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from support.files import read_saved_pair, save_safetensors_atomic, write_json_atomic

WEIGHTS, CONFIG = "intrinsic.safetensors", "intrinsic_config.json"


def hadamard_matrix(n):
    """The n x n Sylvester Walsh-Hadamard matrix: H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]] (n a power of two)."""
    H = torch.ones(1, 1)
    while H.size(0) < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def walsh_hadamard_transform(x, block_bits=7):
    """H x along the last dimension, without building H: Sylvester's H_L is a Kronecker product of small Hadamard
    matrices, H_(ab) = H_a ⊗ H_b, so viewing x as an (a, b, ...) array, H_L x applies H_a along the first axis, then
    H_b along the next, and so on. Factors of up to 2^block_bits = 128 make each step one small matrix product:
    O(L x 128) work per factor and about log2(L) / 7 factors, instead of L² for H_L itself."""
    L = x.size(-1)
    if L & (L - 1) or L == 0:
        raise ValueError(f"the Walsh-Hadamard transform needs a power-of-two length, got {L}")
    batch, bits, done = x.shape[:-1], L.bit_length() - 1, 0
    x = x.reshape(-1, L)
    while done < bits:
        n = 1 << min(block_bits, bits - done)
        # axes: (rows x everything already transformed, this factor's n, everything after); H_n acts on the middle one
        x = torch.matmul(hadamard_matrix(n).to(x), x.reshape(-1, n, L >> (done + n.bit_length() - 1)))
        done += n.bit_length() - 1
    return x.reshape(*batch, L)


class FastWalshHadamard(torch.autograd.Function):
    """y = H x. H is symmetric, so the gradient is H applied to the incoming gradient: one more transform, and no
    autograd graph through the reshapes and products of the forward pass."""

    @staticmethod
    def forward(ctx, x):
        return walsh_hadamard_transform(x)

    @staticmethod
    def backward(ctx, grad):
        return walsh_hadamard_transform(grad)


def fast_walsh_hadamard(x):
    """H x along the last dimension (a power-of-two length L), H the unnormalised L x L Sylvester Walsh-Hadamard
    matrix; differentiable; H is never built (walsh_hadamard_transform)."""
    return FastWalshHadamard.apply(x)


class Fastfood(nn.Module):
    """The fixed random map P: R^d -> R^D of the module docstring, drawn from torch.Generator(seed) on the CPU
    (so the same seed gives the same P on any device). Buffers only: nothing here trains."""

    def __init__(self, d, D, seed=0):
        super().__init__()
        if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
            raise ValueError(f"d must be a positive integer (the subspace's dimension), got {d!r}")
        if d > D:
            raise ValueError(f"d={d} is larger than the {D} parameters it would project onto; use d <= {D}")
        self.d, self.D = d, D
        self.L = 1 << max(0, (D - 1).bit_length())  # the power of two >= D
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("signs", torch.randint(0, 2, (self.L,), generator=g).float() * 2 - 1)  # B
        self.register_buffer("permutation", torch.randperm(self.L, generator=g))  # Π
        gaussian = torch.randn(self.L, generator=g)
        self.register_buffer("gaussian", gaussian * math.sqrt(self.L) / gaussian.norm())  # G, with |G|² = L
        self.scale = 1 / math.sqrt(self.L * D)

    def forward(self, theta_d):
        x = F.pad(theta_d, (0, self.L - self.d))  # θ_d followed by zeros, length L
        x = fast_walsh_hadamard(x * self.signs.to(x.dtype))
        x = fast_walsh_hadamard(x[self.permutation] * self.gaussian.to(x.dtype))
        return x[: self.D] * self.scale


class IntrinsicDimension(nn.Module):
    """A model trained in a d-dimensional random subspace of its weights (DID; SAID with said=True).

    Every parameter of `model` is frozen and serves as θ0; the trainable parameters are `theta_d` (d numbers, zero
    at the start, so the wrapped model first computes exactly what `model` does) and, for SAID, `said_scales`
    (one λ per parameter tensor, starting at 1). Calling it calls model(*args, **kwargs) with θ0 + P θ_d."""

    def __init__(self, model, d, said=False, seed=0):
        super().__init__()
        self.model = model.requires_grad_(False)
        self.names = [n for n, _ in model.named_parameters()]  # tied weights appear once
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.sizes = [p.numel() for _, p in model.named_parameters()]
        weight = next(model.parameters())
        self.projection = Fastfood(d, sum(self.sizes), seed).to(weight.device)
        self.theta_d = nn.Parameter(torch.zeros(d, device=weight.device, dtype=weight.dtype))
        self.said = said
        self.said_scales = (
            nn.Parameter(torch.ones(len(self.names), device=weight.device, dtype=weight.dtype)) if said else None
        )
        self.seed = seed

    @property
    def d(self):
        return self.projection.d

    @property
    def D(self):
        return self.projection.D

    def weights(self):
        """{name: θ0 + P θ_d} for every parameter of the wrapped model (SAID: θ0 + λ_i (P θ_d)^i)."""
        offsets = self.projection(self.theta_d).split(self.sizes)
        params = dict(self.model.named_parameters())
        weights = {}
        for i, (name, shape, offset) in enumerate(zip(self.names, self.shapes, offsets)):
            if self.said:
                offset = self.said_scales[i] * offset
            weights[name] = params[name] + offset.view(shape).to(params[name].dtype)
        return weights

    def forward(self, *args, **kwargs):
        return functional_call(self.model, self.weights(), args, kwargs)

    def save(self, directory):
        """θ_d (and λ) in directory/intrinsic.safetensors, d, said, seed, D and the parameter names in
        directory/intrinsic_config.json: with the same base, that is all it takes to rebuild θ0 + P θ_d."""
        tensors = {"theta_d": self.theta_d.detach().cpu().contiguous()}
        if self.said:
            tensors["said_scales"] = self.said_scales.detach().cpu().contiguous()
        config = dict(d=self.d, said=self.said, seed=self.seed, D=self.D, parameter_names=self.names)
        os.makedirs(directory, exist_ok=True)
        save_safetensors_atomic(tensors, os.path.join(directory, WEIGHTS))
        write_json_atomic(config, os.path.join(directory, CONFIG))

    @classmethod
    def load(cls, model, directory):
        """Wrap `model` (the same base) with the subspace saved in `directory`."""
        from safetensors.torch import load_file

        config, weights_path = read_saved_pair(directory, CONFIG, WEIGHTS, "IntrinsicDimension.save")
        wrapped = cls(model, config["d"], config["said"], config["seed"])
        if wrapped.names != config["parameter_names"] or wrapped.D != config["D"]:
            raise ValueError(
                f"{directory} was trained on a model with {config['D']} parameters in {len(config['parameter_names'])} tensors; "
                f"this one has {wrapped.D} in {len(wrapped.names)}: P would project onto different weights"
            )
        stored = load_file(weights_path)
        with torch.no_grad():
            wrapped.theta_d.copy_(stored["theta_d"])
            if wrapped.said:
                wrapped.said_scales.copy_(stored["said_scales"])
        return wrapped
