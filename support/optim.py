"""
The optimizer and its schedule, shared by train.py and finetune_classifier.py (and the experiments' own loops). Each
function takes the numbers it uses, as nanoGPT's configure_optimizers(weight_decay, learning_rate, betas) and
get_lr(it) do, so any loop can call them without a config object.
"""

import math

import torch


def make_optimizer(model, learning_rate, weight_decay, betas, loraplus_ratio=1.0):
    """AdamW (Loshchilov & Hutter 2019) over the trainable parameters. Matrices (dim >= 2) get weight decay; biases and
    LayerNorm gains do not (decaying them only fights the normalisation). With loraplus_ratio != 1, LoRA's B matrices
    get that many times A's rate (LoRA+, lora.lora_param_groups). Each group remembers its rate as a multiple of
    learning_rate ("lr_scale"), which set_learning_rate keeps as the schedule moves."""
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
    """Linear warmup over warmup_iters steps, then cosine decay to min_lr_ratio x learning_rate at max_iters (as in
    GPT-3 / nanoGPT)."""
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
    """Scale the trainable parameters' gradients to a global norm of at most max_norm (0 = no clipping); returns the
    norm before clipping, which the loops check for NaN and infinity."""
    params = [p for p in model.parameters() if p.requires_grad]
    # max_norm = inf only measures: the scale factor min(1, inf / norm) is exactly 1
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf))
