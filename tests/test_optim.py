"""optim.py: the schedule's warmup and cosine ends, which parameters decay, and LoRA+'s rate for B."""

import math

import pytest
import torch

from lora import apply_lora
from model import GPT, GPTConfig
from support.optim import clip_gradients, lr_at_step, make_optimizer, set_learning_rate


def test_warmup_rises_linearly_then_cosine_decays_to_the_floor():
    lr = [lr_at_step(step, 1.0, warmup_iters=4, max_iters=20, min_lr_ratio=0.1) for step in range(22)]
    assert lr[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lr[4] == 1.0 and lr[12] == pytest.approx(0.55)  # halfway through the decay: the mean of peak and floor
    assert lr[20] == pytest.approx(0.1) and lr[21] == pytest.approx(0.1)  # past max_iters it stays at the floor
    assert all(a >= b for a, b in zip(lr[3:], lr[4:]))


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=257, n_layer=1, n_head=2, n_embd=8))


def test_matrices_decay_and_vectors_do_not():
    model = tiny_gpt()
    optimizer = make_optimizer(model, 1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert decay == {id(p) for p in model.parameters() if p.dim() >= 2}
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def test_loraplus_gives_b_ratio_times_the_rate_and_the_schedule_keeps_it():
    model = apply_lora(tiny_gpt(), rank=2, alpha=4, targets=("q", "v"))
    optimizer = make_optimizer(model, 1e-3, weight_decay=0.0, betas=(0.9, 0.999), loraplus_ratio=16)
    set_learning_rate(optimizer, 5e-4)
    rate = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert rate[id(p)] == pytest.approx(5e-4 * (16 if ".lora_B." in name else 1)), name


def test_clip_gradients_returns_the_norm_before_clipping():
    model = tiny_gpt()
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    count = sum(p.numel() for p in model.parameters())
    assert clip_gradients(model, 0) == pytest.approx(3.0 * math.sqrt(count), rel=1e-5)  # 0: measured, not clipped
    clip_gradients(model, 1.0)
    assert clip_gradients(model, 0) == pytest.approx(1.0, rel=1e-4)
