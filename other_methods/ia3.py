"""
(IA)³, "Infused Adapter by Inhibiting and Amplifying Inner Activations" (Liu et al. 2022, "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", arXiv:2205.05638, §3.3).

The smallest method in the family: learn one number per feature that rescales it. Three vectors per block,

    keys      l_k ⊙ K        (d numbers)        attention: softmax(Q (l_k ⊙ K)^T / sqrt(d_head)) (l_v ⊙ V)
    values    l_v ⊙ V        (d numbers)
    MLP       l_ff ⊙ γ(W_1 x), the hidden activations before the down-projection W_2   (4d numbers)

all starting at 1, so the adapted model first computes exactly what the base does. For GPT-2 124M that is
12 x (768 + 768 + 3072) = 55,296 numbers, 0.04% of the model. Each vector rescales the rows (keys, values) or
columns (MLP) of a frozen weight, so it can be folded into that weight after training: like merged LoRA, no
inference cost (`merge_ia3`).

In model.GPT the keys and values are the outputs of attn.k_proj and attn.v_proj, bias included, and the hidden
activations are the input of mlp.fc_out; so (IA)³ wraps those three linear layers, scaling the output of the
first two and the input of the third. HF `peft` places it the same way on GPT-2 (its fused c_attn aside).
"""

import torch
import torch.nn as nn

from lora import replace_module
from other_methods import check_new_adapter, layers_ending_with, train_only

TARGETS = {  # apply_ia3's short names -> (how the layer's name ends in model.GPT, scale its input instead of its output)
    "k": ("attn.k_proj", False),
    "v": ("attn.v_proj", False),
    "mlp": ("mlp.fc_out", True),
}


class IA3Linear(nn.Module):
    """A frozen nn.Linear whose output (or, with scale_input, its input) is multiplied feature by feature by a
    learned vector, all ones at the start. state_dict keys: <layer>.base.* and <layer>.ia3_scale."""

    method = "ia3"

    def __init__(self, base, scale_input):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale_input = scale_input
        features = base.in_features if scale_input else base.out_features
        self.ia3_scale = nn.Parameter(torch.ones(features, device=base.weight.device, dtype=base.weight.dtype))
        self.merged = False

    def forward(self, x):
        if self.merged:
            return self.base(x)
        if self.scale_input:
            return self.base(x * self.ia3_scale)  # l_ff ⊙ γ(W_1 x), then W_2
        return self.base(x) * self.ia3_scale

    @torch.no_grad()
    def merge(self):
        """Fold the vector into the base: diag(l) W and l ⊙ b for an output scale, W diag(l) for an input scale."""
        if self.scale_input:
            self.base.weight.mul_(self.ia3_scale)  # (out, in) * (in,): column j times l_j
        else:
            self.base.weight.mul_(self.ia3_scale[:, None])
            if self.base.bias is not None:
                self.base.bias.mul_(self.ia3_scale)
        self.merged = True


def ia3_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, IA3Linear)]


def apply_ia3(model, targets=("k", "v", "mlp"), trainable=()):
    """Wrap the target layers (short names from TARGETS; the paper uses all three) in IA3Linear, freeze everything
    else and return the model. trainable: modules to keep trainable, e.g. ("head",)."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    unknown = [t for t in targets if t not in TARGETS] or ([] if targets else ["(none)"])
    if unknown:
        raise ValueError(f"unknown (IA)³ target {unknown[0]!r}; valid targets are {', '.join(TARGETS)}")
    targets = [t for t in TARGETS if t in targets]
    trainable = check_new_adapter(model, trainable)
    layers = [(name, m, TARGETS[t][1]) for t in targets for name, m in layers_ending_with(model, (TARGETS[t][0],))]
    wrong = [name for name, layer, _ in layers if not isinstance(layer, nn.Linear)]
    if not layers or wrong:
        raise ValueError(f"(IA)³ rescales the nn.Linear layers of a model.GPT; {wrong[0] if wrong else 'none'} is not")
    wrappers = []
    for name, layer, scale_input in layers:
        wrappers.append(IA3Linear(layer, scale_input))
        wrappers[-1].settings = dict(targets=targets)
        replace_module(model, name, wrappers[-1])
    train_only(model, wrappers, trainable)
    return model


def merge_ia3(model):
    """Fold every (IA)³ vector into its frozen weight: the model then costs what the base does at inference.
    There is no unmerge (dividing by a learned scale near zero would lose the weight); merge a copy if needed."""
    layers = [m for _, m in ia3_layers(model) if not m.merged]
    if not layers:
        raise ValueError("no unmerged (IA)³ adapter to merge")
    for layer in layers:
        layer.merge()
    return model


def ia3_parameter_count(n_layer, n_embd, targets=("k", "v", "mlp")):
    """n_layer x (d for k + d for v + 4d for the MLP's hidden activations)."""
    per_target = {"k": n_embd, "v": n_embd, "mlp": 4 * n_embd}
    return n_layer * sum(per_target[t] for t in targets)
