"""intrinsic.py: the Walsh-Hadamard transform, Fastfood's norms, DID and SAID (identity start, exactly d (+ layers)
trainable numbers, only they move), errors, save/load."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GPT, GPTConfig, count_parameters
from other_methods.intrinsic import Fastfood, IntrinsicDimension, fast_walsh_hadamard

TINY = GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32)


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(TINY).eval()


def tokens(seed=1):
    return torch.randint(0, TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))


def hadamard(L):
    H = torch.ones(1, 1)
    while H.size(0) < L:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


@pytest.mark.parametrize("L", [1, 2, 4, 8, 64])
def test_fast_walsh_hadamard_is_the_hadamard_matrix(L):
    x = torch.randn(3, L, dtype=torch.float64)
    torch.testing.assert_close(fast_walsh_hadamard(x), x @ hadamard(L).double().T)
    torch.testing.assert_close(fast_walsh_hadamard(fast_walsh_hadamard(x)), L * x)  # H H = L I


def test_fast_walsh_hadamard_rejects_other_lengths():
    with pytest.raises(ValueError, match="power-of-two"):
        fast_walsh_hadamard(torch.randn(6))


def projection_matrix(P):
    """P as a dense D x d matrix, column j = P e_j (only for tests: the module never builds it)."""
    return torch.stack([P(torch.eye(P.d)[j]) for j in range(P.d)], dim=1)


def test_fastfood_columns_have_unit_norm_when_D_is_a_power_of_two():
    M = projection_matrix(Fastfood(d=20, D=64, seed=3))
    assert M.shape == (64, 20)
    torch.testing.assert_close(M.norm(dim=0), torch.ones(20))


def test_fastfood_columns_are_random_directions_not_orthogonal_ones():
    """With D = L, columns i != j of P have the inner product (1/L) sum_k g_k^2 s_k, s a +-1 pattern with sum 0 (H's
    columns multiplied): zero without the Gaussian diagonal G, of mean square Var(g^2) / L = 2 / L with it. Averaged
    over 8 draws of P the mean square of the off-diagonal Gram entries is 2 / L give or take 20%; an orthogonal P
    (G left out) gives 0, a P whose columns repeat gives 1."""
    L, scaled = 256, []
    for seed in range(8):
        M = projection_matrix(Fastfood(d=16, D=L, seed=seed))
        off_diagonal = (M.T @ M)[~torch.eye(16, dtype=torch.bool)]
        assert off_diagonal.square().mean() > 0.1 / L  # every draw, not only on average
        scaled.append(L * off_diagonal.square().mean().item())
    assert 1.4 < sum(scaled) / len(scaled) < 2.8


def test_fastfood_preserves_norms_in_expectation():
    """D = 300 is not a power of two (L = 512): one draw keeps a random part of each column, so ||P x||² / ||x||²
    scatters around 1; its mean over many draws of P is 1."""
    x = torch.randn(40, generator=torch.Generator().manual_seed(0))
    ratios = torch.tensor([Fastfood(d=40, D=300, seed=s)(x).square().sum() / x.square().sum() for s in range(300)])
    assert abs(ratios.mean().item() - 1) < 0.03
    assert ratios.std() > 0.01  # they do scatter: the test above averages something random


def test_fastfood_is_linear_and_seeded():
    P = Fastfood(d=10, D=100, seed=1)
    a, b = torch.randn(10), torch.randn(10)
    torch.testing.assert_close(P(2 * a - b), 2 * P(a) - P(b), rtol=1e-5, atol=1e-6)
    assert torch.equal(Fastfood(10, 100, seed=1)(a), P(a)) and not torch.equal(Fastfood(10, 100, seed=2)(a), P(a))


@pytest.mark.parametrize(
    "d,match", [(0, "positive integer"), (-5, "positive integer"), (2.0, "positive integer"), (10**9, "larger than")]
)
def test_bad_d(d, match):
    with pytest.raises(ValueError, match=match):
        IntrinsicDimension(tiny_gpt(), d)


@pytest.mark.parametrize("said", [False, True])
def test_identity_at_start_and_exact_trainable_count(said):
    model, idx = tiny_gpt(), tokens()
    before, _ = model(idx)
    wrapped = IntrinsicDimension(model, d=50, said=said)
    assert torch.equal(wrapped(idx)[0], before)
    layers = len(list(model.parameters()))  # tied lm_head / wte counted once
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 50 + (layers if said else 0)
    assert wrapped.D == sum(p.numel() for p in model.parameters()) == count_parameters(model)[1]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    assert sum(p.numel() for group in optimizer.param_groups for p in group["params"]) == 50 + (layers if said else 0)


@pytest.mark.parametrize("said", [False, True])
def test_a_step_moves_only_theta_d_and_changes_the_model(said):
    model, idx = tiny_gpt(), tokens()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrapped = IntrinsicDimension(model, d=50, said=said)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-1)
    for _ in range(2):  # SAID's λ gets its first gradient once θ_d is no longer zero
        optimizer.zero_grad()
        wrapped(idx, idx)[1].backward()
        optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters())  # θ0 never changes
    assert wrapped.theta_d.abs().min() > 0
    if said:
        assert (wrapped.said_scales != 1).all()
    weights = wrapped.weights()
    offsets = wrapped.projection(wrapped.theta_d).split(
        wrapped.sizes
    )  # θ - θ0 = P θ_d, per tensor λ_i times it for SAID
    for i, (n, offset) in enumerate(zip(wrapped.names, offsets)):
        scale = wrapped.said_scales[i] if said else 1.0
        torch.testing.assert_close(weights[n] - frozen[n], (scale * offset).view(frozen[n].shape), rtol=1e-4, atol=1e-6)
    assert not torch.equal(wrapped(idx)[0], model(idx)[0])


def test_classifier_head_is_in_the_subspace_too():
    gpt = tiny_gpt()
    model = nn.ModuleDict(dict(gpt=gpt, head=nn.Linear(32, 2)))

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt, self.head = gpt, model["head"]

        def forward(self, idx):
            return self.head(self.gpt.hidden_states(idx)[:, -1])

    wrapped = IntrinsicDimension(Classifier(), d=8)
    assert "head.weight" in wrapped.names and wrapped.D == count_parameters(gpt)[1] + 32 * 2 + 2
    F.cross_entropy(wrapped(tokens()), torch.tensor([0, 1])).backward()
    assert wrapped.theta_d.grad is not None and wrapped.theta_d.grad.abs().sum() > 0


def test_save_load_bit_exact(tmp_path):
    wrapped = IntrinsicDimension(tiny_gpt(), d=30, said=True, seed=7)
    with torch.no_grad():
        wrapped.theta_d.normal_()
        wrapped.said_scales.uniform_(0.5, 1.5)
    idx = tokens()
    expected = wrapped(idx)[0]
    wrapped.save(tmp_path)
    loaded = IntrinsicDimension.load(tiny_gpt(), tmp_path)
    assert torch.equal(loaded(idx)[0], expected)
    with pytest.raises(ValueError, match="P would project onto different weights"):
        IntrinsicDimension.load(GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2, n_embd=32)), tmp_path)


def test_fast_walsh_hadamard_gradient():
    x = torch.randn(2, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fast_walsh_hadamard, (x,))
    big = torch.randn(1 << 15, dtype=torch.float64)  # more than one 128-wide factor
    torch.testing.assert_close(fast_walsh_hadamard(fast_walsh_hadamard(big)), (1 << 15) * big)
