"""
The training loss without the logits, and the evaluation loss.

model.GPT.forward computes nanoGPT's loss: every position's logits, then F.cross_entropy over those with a target.
On instruction data that is wasteful twice over: most positions (the prompt, the padding) have no target, and the
B x T x vocab logits are the largest tensor of a step. `LossAtTargets(model)` is the same loss, computed only where
a target exists and a chunk of logits at a time, with its gradient formed chunk by chunk (LinearCrossEntropy);
train.py trains through it. tests/test_loss.py checks it against F.cross_entropy, values and gradients.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from support.common import autocast_context


class LossAtTargets(nn.Module):
    """loss = model(idx, targets, segment_ids=...)[1] of a GPT, without forming logits where no target is. Wrap the
    model once (train.py does; DDP and torch.compile then wrap this module) and call it as (idx, targets, segment_ids)
    -> loss. It holds no parameters of its own: the model's are its parameters."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, targets, segment_ids=None):
        hidden = self.model.hidden_states(idx, segment_ids=segment_ids)
        return cross_entropy_at_targets(hidden, self.model.lm_head.weight, targets)


LOSS_CHUNK_ELEMENTS = 2**24  # most logits cross_entropy_at_targets computes at once: 64 MiB in fp32, 333 rows of GPT-2's vocabulary


@torch.compiler.disable  # under train.py --compile the trunk is compiled and this runs as it is: its row count
# (the targets in the batch) changes every step, and torch.compile would break the graph at hidden[keep] and compile
# the rest again for each new count (up to its recompile limit); it is a few matmuls that are efficient as they are
def cross_entropy_at_targets(hidden, weight, targets, chunk_elements=None):
    """Mean cross-entropy of the logits hidden @ weight^T against targets, over the positions whose target is not
    -100; equal to F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100) (NaN if no position has a target).

    hidden (..., n_embd), targets (...) of the same leading shape, weight (vocab, n_embd) the output layer. Two savings
    over computing every logit: positions without a target (a masked prompt, padding) never reach the output layer,
    whose vocab x n_embd matmul is GPT-2's largest, and the rest go through it in chunks of at most chunk_elements
    logits (default LOSS_CHUNK_ELEMENTS), so only one chunk of logits exists at a time. When a gradient is wanted,
    LinearCrossEntropy computes it chunk by chunk in the forward pass, so backward keeps no logits either. The chunks
    are as few as that allows and of equal size: each chunk's matmul reads all of `weight` (154 MB for GPT-2), and
    matmuls of few rows are inefficient (20-row chunks made GPT-2's loss 2x slower than 256-row ones)."""
    keep = targets != -100
    hidden, targets = hidden[keep], targets[keep]  # (N, n_embd), (N,): the positions that have a target
    chunks = max(1, math.ceil(targets.numel() * weight.size(0) / (chunk_elements or LOSS_CHUNK_ELEMENTS)))
    chunk_rows = max(1, math.ceil(targets.numel() / chunks))
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_rows):  # no gradient wanted (evaluation): the loss alone
        logits = (hidden[start : start + chunk_rows] @ weight.t()).float()
        total += F.cross_entropy(logits, targets[start : start + chunk_rows], reduction="sum")
    return total / targets.numel()


class LinearCrossEntropy(torch.autograd.Function):
    """loss = mean over rows of cross_entropy(hidden @ weight^T, targets), with its gradients computed in forward.

    The gradient of the mean cross-entropy with respect to a row's logits is (softmax(logits) - onehot(target)) / N,
    so once a chunk's logits exist, its share of d loss / d hidden (that matrix @ weight) and of d loss / d weight
    (its transpose @ hidden) costs two matmuls, and the chunk can be freed. Backward then only scales the stored
    (N, n_embd) and (vocab, n_embd) gradients by d(whatever comes after) / d loss, which is exact because the
    gradients are linear in it. Plain autograd would instead keep every chunk's log-softmax (N x vocab floats) alive
    until backward. Liger-Kernel's "fused linear cross-entropy" is the same idea on the GPU."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):
        n = targets.numel()
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, n, chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, t = hidden[rows], targets[rows]
            log_probs = torch.log_softmax((h @ weight.t()).float(), dim=-1)
            total -= log_probs.gather(1, t[:, None]).sum()
            grad_logits = log_probs.exp_()  # softmax, in place: d(sum of the chunk's losses) / d logits = softmax - onehot
            grad_logits[torch.arange(t.numel(), device=t.device), t] -= 1
            del log_probs
            if grad_hidden is not None:  # the 1/n of the mean is applied to the small results, not to this chunk
                grad_hidden[rows] = (grad_logits.to(h.dtype) @ weight) / n
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ h.float()
        ctx.save_for_backward(grad_hidden, grad_weight.div_(n).to(weight.dtype) if grad_weight is not None else None)
        return total / n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype),
                None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype), None, None)


@torch.no_grad()
def mean_token_loss(model, batches, device):
    """Mean cross-entropy per target token of a language model over (inputs, targets) batches, targets -100 left
    out (in nats; per byte for the byte tokenizer). The model is put back in training mode afterwards."""
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast_context(device):
            logits, _ = model(x)
        n = (y != -100).sum().item()
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=-100, reduction="sum")
        total, count = total + loss.item(), count + n
    model.train()
    if count == 0:
        raise ValueError("no target tokens to evaluate on: an empty split, or every target masked")
    return total / count
