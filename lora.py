"""
LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021, arXiv:2106.09685), read top to bottom.

Full fine-tuning learns a new weight W0 + ΔW for every matrix, and has to store all of it per task. LoRA's
bet (§4.1) is that the update ΔW has a low "intrinsic rank", so it learns it as a product of two thin
matrices while the pretrained W0 stays frozen:

    h = W0 x + (alpha / r) · B A x          A: r x d_in,  B: d_out x r,  r << min(d_in, d_out)   (Eq. 3)

A starts random and B at zero, so ΔW = BA = 0 and the adapted model first computes exactly what the pretrained one
does. Only A and B train: for GPT-2 124M with r = 8 on the query and value projections, 2 · 12 · (8·768 + 768·8) =
294,912 parameters, 0.24% of the model. W0 + (alpha/r)·BA folds into one matrix (`merge_lora`): no inference cost.

Three additions people use today, each a few lines below the idea:
  rsLoRA  (Kalajdzievski 2023, arXiv:2312.03732) scales by alpha / sqrt(r) instead of alpha / r,
  DoRA    (Liu et al. 2024, arXiv:2402.09353) learns each output row's magnitude separately from its direction,
  LoRA+   (Hayou et al. 2024, arXiv:2402.12354) gives B a larger learning rate than A (`lora_param_groups`).

Task switching (§4.2: many small adapters on one frozen base) is the same for every method of the family, so
support/adapters.py does it once for all of them: naming adapters, switching between them, saving and loading one.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = {  # apply_lora's short names -> how the names of those layers end in model.GPT
    "q": "attn.q_proj",
    "k": "attn.k_proj",
    "v": "attn.v_proj",
    "o": "attn.o_proj",
    "mlp_in": "mlp.fc_in",
    "mlp_out": "mlp.fc_out",
}


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (LoRA §4.1, Eq. 3), h = W0 x + b + scaling · B A x,
    scaling = alpha / rank. `base` is an nn.Linear, or a quantize.Linear4bit under QLoRA. state_dict keys:

        <layer>.base.weight, <layer>.base.bias     W0 and b, frozen
        <layer>.lora_A.weight                      A, (rank, in_features), Kaiming-uniform like any nn.Linear
        <layer>.lora_B.weight                      B, (out_features, rank), zeros, so ΔW = 0 at the start
    """

    method = "lora"  # the kind of adapter this layer holds, by which support/adapters.py saves and rebuilds it

    def __init__(self, base, rank, alpha, dropout=0.0, use_rslora=False):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        W0 = dense_weight(base)  # for its device and dtype
        like = dict(device=W0.device, dtype=W0.dtype)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **like)  # nn.Linear's init: loralib's choice for A
        # B is zeroed right away: skip_init spares drawing random values first
        self.lora_B = torch.nn.utils.skip_init(nn.Linear, rank, self.out_features, bias=False, **like)
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = lora_scaling(alpha, rank, use_rslora)
        self.merged = False  # True while ΔW is folded into base.weight (merge)

    def forward(self, x):
        """h = W0 x + b + scaling · B (A dropout(x)): Eq. 3, without ever forming the d_out x d_in matrix BA."""
        result = self.base(x)  # W0 x + b, the frozen layer (a 4-bit one under QLoRA)
        if self.merged:
            return result  # W0 + ΔW is base.weight now
        return result + self.scaling * self.lora_B(self.lora_A(self.lora_dropout(x)))

    def delta_weight(self):
        """ΔW = scaling · B A, the (out_features, in_features) update the adapter stands for."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    @torch.no_grad()
    def merge(self):
        """W = W0 + ΔW (§4.1): the adapted layer becomes one matrix again, with no added inference latency."""
        self.base.weight += self.delta_weight()
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W0 = W - ΔW, equal to the original W0 up to float rounding."""
        self.base.weight -= self.delta_weight()
        self.merged = False


def dense_weight(base):
    """The frozen (out_features, in_features) weight W0: an nn.Linear's, or a quantize.Linear4bit's dequantized."""
    return base.weight if isinstance(base, nn.Linear) else base.dequantize()


# ----------------------------------------------------------------------------------------------------------
# Extension 1, rsLoRA: a scaling that lets large ranks learn


def lora_scaling(alpha, rank, use_rslora=False):
    """alpha / r, or rsLoRA's alpha / sqrt(r) (§3): alpha / r shrinks the update as r grows, so that large ranks
    learn no better than small ones; alpha / sqrt(r) keeps the update's scale stable across ranks."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


# ----------------------------------------------------------------------------------------------------------
# Extension 2, DoRA: magnitude and direction learned apart


class DoRALinear(LoRALinear):
    """DoRA (Eq. 5): W' = m · (W0 + ΔW) / ||W0 + ΔW||_c, so h = g · (W0 x + ΔW x) + b with g = m / ||.||_c.
    m, `lora_magnitude` (out_features,), starts at ||W0||_c, so W' = W0 at the start as with plain LoRA."""

    def __init__(self, base, rank, alpha, dropout=0.0, use_rslora=False):
        super().__init__(base, rank, alpha, dropout, use_rslora)
        self.lora_magnitude = nn.Parameter(self.weight_norm(dense_weight(base)))

    def weight_norm(self, W0):
        """||W0 + ΔW||_c: one L2 norm per output feature, over the input dimension (dim=1 of the (out, in) weight;
        a "column" of the paper's d x k matrix). No gradient flows through it (DoRA §4.3): it is treated as a
        constant, which saves memory."""
        with torch.no_grad():
            return torch.linalg.norm(W0 + self.delta_weight().to(W0.dtype), dim=1)

    def forward(self, x):
        """Like PEFT, dropout applies to the adapter's path only: h = W0 x + b + (g - 1) W0 x' + g ΔW x'."""
        result = self.base(x)
        if self.merged:
            return result
        x_dropped = self.lora_dropout(x)
        update = self.scaling * self.lora_B(self.lora_A(x_dropped))
        W0 = dense_weight(self.base).to(x_dropped.dtype)
        g = self.lora_magnitude / self.weight_norm(W0)
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            W0_x = F.linear(x_dropped, W0)
        else:  # x' = x, and W0 x is already in the base output: take it back out instead of recomputing
            W0_x = result - self.base.bias if self.base.bias is not None else result
        return result + ((g - 1) * W0_x + g * update)

    @torch.no_grad()
    def merge(self):
        """W = g · (W0 + ΔW), with g kept so that unmerge can undo it."""
        W = self.base.weight
        self.dora_factor = (self.lora_magnitude / self.weight_norm(W)).unsqueeze(1)
        W.copy_(self.dora_factor * (W + self.delta_weight()))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        self.base.weight.div_(self.dora_factor).sub_(self.delta_weight())
        self.merged = False


# ----------------------------------------------------------------------------------------------------------
# Extension 3, LoRA+: a larger learning rate for B


def lora_param_groups(model, lr, loraplus_lr_ratio=16.0, weight_decay=0.0):
    """Optimizer parameter groups for LoRA+: B learns at lr * loraplus_lr_ratio, the rest at lr. The paper's
    analysis of wide models (§3) shows that with one rate for both, B's updates are too small for efficient feature
    learning; its experiments suggest a ratio around 2^4 = 16 (1 = plain LoRA). Only trainable parameters are
    included. No weight decay on 1-d tensors (biases, LayerNorm weights, DoRA magnitudes: decaying m to 0 would
    shrink the pretrained weights). PEFT instead puts 1-d tensors at B's rate."""
    groups = {"lora_A": [], "lora_B": [], "other": [], "no_decay": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            parts = name.split(".")
            group = "lora_B" if "lora_B" in parts else "lora_A" if "lora_A" in parts else "other"
            groups["no_decay" if p.ndim < 2 and group == "other" else group].append(p)
    settings = {
        "lora_A": (lr, weight_decay),
        "lora_B": (lr * loraplus_lr_ratio, weight_decay),
        "other": (lr, weight_decay),
        "no_decay": (lr, 0.0),
    }
    return [dict(name=g, params=ps, lr=settings[g][0], weight_decay=settings[g][1]) for g, ps in groups.items() if ps]


# ----------------------------------------------------------------------------------------------------------
# Putting LoRA into a model, and folding it back out


def resolve_targets(targets):
    """("q", "v") or "q,v" (a --lora_targets flag) -> ("attn.q_proj", "attn.v_proj"); "all-linear": all six."""
    targets = [t.strip() for t in targets.split(",") if t.strip()] if isinstance(targets, str) else list(targets)
    unknown = [t for t in targets if t not in TARGETS and t != "all-linear"] or ([] if targets else ["(none)"])
    if unknown:  # every entry is checked, so a typo next to 'all-linear' is not ignored
        raise ValueError(f"unknown LoRA target {unknown[0]!r}; valid targets: {', '.join(TARGETS)} and 'all-linear'")
    return tuple(TARGETS.values()) if "all-linear" in targets else tuple(TARGETS[t] for t in dict.fromkeys(targets))


def replace_module(model, name, new):
    """Put `new` where the submodule called `name` (dotted, e.g. 'transformer.h.0.attn.q_proj') was."""
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, new)


def lora_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def apply_lora(
    model, rank=8, alpha=None, targets=("q", "v"), dropout=0.0, use_rslora=False, use_dora=False, trainable=()
):
    """Wrap the target linear layers in LoRALinear (DoRALinear with use_dora), freeze every other parameter, and
    return the model. alpha defaults to 2 x rank, so that alpha / r = 2 at every rank. targets: short names from
    TARGETS, "all-linear", or "q,v". trainable: modules or parameters to keep trainable, e.g. ("head",) for a new
    classification head; they are saved with the adapter."""
    alpha = 2.0 * rank if alpha is None else alpha
    suffixes = resolve_targets(targets)
    layers = [(n, m) for n, m in model.named_modules() if any(n == s or n.endswith("." + s) for s in suffixes)]
    check_apply_lora(model, layers, rank, alpha, dropout)
    parameters = dict(model.named_parameters(remove_duplicate=False))
    trainable = [trainable] if isinstance(trainable, str) else trainable  # get_submodule names a typo among them
    kept = [parameters[t] if t in parameters else model.get_submodule(t) for t in trainable]
    targets = [t for t, s in TARGETS.items() if s in suffixes]  # settings: what rebuilds this adapter on a fresh base
    settings = dict(rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora, use_dora=use_dora, targets=targets)
    model.requires_grad_(False)
    for name, layer in layers:
        replace_module(model, name, (DoRALinear if use_dora else LoRALinear)(layer, rank, alpha, dropout, use_rslora))
        model.get_submodule(name).settings = settings
    for module_or_parameter in kept:
        module_or_parameter.requires_grad_(True)
    return model


def check_apply_lora(model, layers, rank, alpha, dropout):
    """apply_lora's arguments, checked before the model changes; each wrong one is named with what would be valid."""
    if any(isinstance(m, LoRALinear) for m in model.modules()) or not layers:
        raise ValueError("LoRA is applied already (add_adapter in support/adapters.py adds one more), or no target")
    limit = min(min(layer.in_features, layer.out_features) for _, layer in layers)  # BA has rank at most min(in, out)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= limit:
        raise ValueError(f"rank must be a positive integer at most min(in, out) = {limit}, got {rank!r}")
    if not (0 < alpha < math.inf and 0 <= dropout < 1):
        raise ValueError(
            f"alpha must be a positive number (2 x rank is usual) and dropout in [0, 1): {alpha}, {dropout}"
        )


def merge_lora(model, unload=False):
    """Fold each LoRA layer's update into its base weight (W = W0 + scaling · BA, §4.1), so the model costs
    exactly what the base does at inference; unmerge_lora undoes it. With unload=True the LoRA wrappers are
    replaced by their merged base layers: a plain model with the original state_dict keys. 4-bit bases cannot be
    merged in place (W0 + ΔW would have to be re-quantized, losing most of the update): use
    quantize.merge_lora_into_dequantized. While merged, the LoRA parameters get no gradient."""
    layers = lora_layers(model)
    if not all(isinstance(layer.base, nn.Linear) for _, layer in layers):
        raise TypeError("cannot merge into a 4-bit base; quantize.merge_lora_into_dequantized merges into a dense copy")
    for name, layer in layers:
        if not layer.merged:
            layer.merge()
        if unload:
            replace_module(model, name, layer.base)
    return model


def unmerge_lora(model):
    """Subtract the merged updates back out of the base weights, so they can be switched or trained."""
    for _, layer in lora_layers(model):
        if layer.merged:
            layer.unmerge()
    return model
