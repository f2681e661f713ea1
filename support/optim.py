"""The optimizer and its schedule for every training loop here; each takes the numbers it uses, as nanoGPT's do."""

import math

import torch


def make_optimizer(model, learning_rate, weight_decay, betas, loraplus_ratio=1.0):
    """AdamW over the trainable parameters, weight decay on matrices only (decaying gains fights the normalisation);
    loraplus_ratio != 1: LoRA's B at that many times A's rate (LoRA+). Each group keeps its rate's "lr_scale"."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if loraplus_ratio != 1.0:
        from lora import lora_param_groups

        groups = lora_param_groups(model, learning_rate, loraplus_lr_ratio=loraplus_ratio, weight_decay=weight_decay)
    else:
        groups = [
            {"params": [p for n, p in named if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for n, p in named if p.dim() < 2], "weight_decay": 0.0},
        ]
    for g in groups:
        g["lr_scale"] = g.get("lr", learning_rate) / learning_rate
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)


def lr_at_step(step, learning_rate, warmup_iters, max_iters, min_lr_ratio):
    """Linear warmup, then cosine decay to min_lr_ratio x learning_rate at max_iters (GPT-3, nanoGPT)."""
    if step < warmup_iters:
        return learning_rate * (step + 1) / warmup_iters
    progress = min(1.0, (step - warmup_iters) / max(1, max_iters - warmup_iters))
    min_lr = learning_rate * min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def set_learning_rate(optimizer, lr):
    """Every group of make_optimizer's optimizer to lr times its own scale (1, or LoRA+'s ratio for B)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


def clip_gradients(model, max_norm):
    """Clip the trainable parameters' gradients to a global norm of max_norm (0: none) -> the norm before clipping."""
    params = [p for p in model.parameters() if p.requires_grad]
    # max_norm = inf only measures: the scale factor min(1, inf / norm) is exactly 1
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf))
