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

from other_methods.adapters import NamedAdapterLayer, check_new_adapter, layers_ending_with, set_adapter, train_only
from lora import replace_module

TARGETS = {  # apply_ia3's short names -> (how the layer's name ends in model.GPT, scale its input instead of its output)
    "k": ("attn.k_proj", False),
    "v": ("attn.v_proj", False),
    "mlp": ("mlp.fc_out", True),
}


class IA3Linear(NamedAdapterLayer):
    """A frozen nn.Linear whose output (or, with scale_input, its input) is multiplied feature by feature by a
    learned vector, one vector per named adapter, all ones at the start. state_dict keys: <layer>.base.* and
    <layer>.ia3_scale.<adapter>."""

    method = "ia3"

    def __init__(self, base, scale_input):
        if isinstance(base, NamedAdapterLayer) or not isinstance(base, nn.Linear):
            raise TypeError(f"(IA)³ rescales an nn.Linear, got {type(base).__name__}")
        super().__init__(base)
        self.scale_input = scale_input
        self.ia3_scale = nn.ParameterDict()
        self.merged_adapter = None

    def add_adapter(self, name, config):
        features = self.base.in_features if self.scale_input else self.base.out_features
        weight = self.base.weight
        self.ia3_scale[name] = nn.Parameter(torch.ones(features, device=weight.device, dtype=weight.dtype))
        self.config[name] = config

    def adapter_tensors(self, name):
        return {"ia3_scale": self.ia3_scale[name]}

    def remove_adapter(self, name):
        del self.ia3_scale[name]

    def forward(self, x):
        name = self.active_adapter
        if name is None or self.merged_adapter is not None:
            return self.base(x)
        scale = self.ia3_scale[name]
        if self.scale_input:
            return self.base(x * scale)  # l_ff ⊙ γ(W_1 x), then W_2
        return self.base(x) * scale

    @torch.no_grad()
    def merge(self):
        """Fold the active vector into the base: diag(l) W and l ⊙ b for an output scale, W diag(l) for an input scale."""
        name = self.active_adapter
        if name is None or self.merged_adapter is not None:
            return
        scale = self.ia3_scale[name]
        if self.scale_input:
            self.base.weight.mul_(scale)  # (out, in) * (in,): column j times l_j
        else:
            self.base.weight.mul_(scale[:, None])
            if self.base.bias is not None:
                self.base.bias.mul_(scale)
        self.merged_adapter = name


def ia3_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, IA3Linear)]


def apply_ia3(model, targets=("k", "v", "mlp"), trainable=(), adapter_name="default"):
    """Wrap the target layers (short names from TARGETS; the paper uses all three) in IA3Linear, freeze everything
    else, make the new adapter active and return the model. trainable: modules to keep trainable, e.g. ("head",)."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError(f"targets is empty; choose from {', '.join(TARGETS)}")
    for t in targets:
        if t not in TARGETS:
            raise ValueError(f"unknown (IA)³ target {t!r}; valid targets are {', '.join(TARGETS)}")
    targets = [t for t in TARGETS if t in targets]
    trainable = check_new_adapter(model, adapter_name, trainable)
    layers = [(name, m, TARGETS[t][1]) for t in targets for name, m in layers_ending_with(model, (TARGETS[t][0],))]
    if not layers:
        raise ValueError(f"no layer of this {type(model).__name__} is named like {', '.join(TARGETS[t][0] for t in targets)}; is it a model.GPT?")
    for name, layer, _ in layers:
        if not isinstance(layer, (nn.Linear, IA3Linear)):
            raise TypeError(f"{name} is a {type(layer).__name__}; (IA)³ rescales an nn.Linear (merge or remove LoRA first)")
        if isinstance(layer, IA3Linear) and layer.merged_adapter is not None:
            raise RuntimeError(f"{name} has a merged (IA)³ vector; its base weight has changed, so it cannot take another adapter")
    config = dict(targets=targets)
    for name, layer, scale_input in layers:
        if not isinstance(layer, IA3Linear):
            layer = IA3Linear(layer, scale_input)
            replace_module(model, name, layer)
        layer.add_adapter(adapter_name, config)
    train_only(model, adapter_name, trainable)
    return set_adapter(model, adapter_name)


def merge_ia3(model):
    """Fold every active (IA)³ vector into its frozen weight: the model then costs what the base does at inference.
    There is no unmerge (dividing by a learned scale near zero would lose the weight); merge a copy if needed."""
    layers = [m for _, m in ia3_layers(model) if m.active_adapter is not None and m.merged_adapter is None]
    if not layers:
        raise ValueError("no active, unmerged (IA)³ adapter to merge")
    for layer in layers:
        layer.merge()
    return model


def ia3_parameter_count(n_layer, n_embd, targets=("k", "v", "mlp")):
    """n_layer x (d for k + d for v + 4d for the MLP's hidden activations)."""
    per_target = {"k": n_embd, "v": n_embd, "mlp": 4 * n_embd}
    return n_layer * sum(per_target[t] for t in targets)
