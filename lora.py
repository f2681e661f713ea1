"""
LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021, arXiv:2106.09685), read top to bottom.

Full fine-tuning learns a new weight W0 + ΔW for every matrix, and has to store all of it per task. LoRA's
bet (§4.1) is that the update ΔW has a low "intrinsic rank", so it learns it as a product of two thin
matrices while the pretrained W0 stays frozen:

    h = W0 x + (alpha / r) · B A x          A: r x d_in,  B: d_out x r,  r << min(d_in, d_out)   (Eq. 3)

A starts random and B starts at zero, so ΔW = BA = 0 and the adapted model first computes exactly what the
pretrained one does. Only A and B train: for GPT-2 124M with r = 8 on the query and value projections that
is 2 · 12 · (8·768 + 768·8) = 294,912 parameters, 0.24% of the model. After training, W0 + (alpha/r)·BA can
be folded into one matrix (`merge_lora`), so inference costs nothing extra; or the tiny A, B can be saved
alone (`save_adapter`) and swapped on one frozen base, one adapter per task (`set_adapter`).

Three additions people use today, each a few lines below:
  rsLoRA  (Kalajdzievski 2023, arXiv:2312.03732) scales by alpha / sqrt(r) instead of alpha / r,
  DoRA    (Liu et al. 2024, arXiv:2402.09353) learns each output row's magnitude separately from its direction,
  LoRA+   (Hayou et al. 2024, arXiv:2402.12354) gives B a larger learning rate than A (`lora_param_groups`).
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


def dense_weight(base):
    """The frozen (out_features, in_features) weight W0: an nn.Linear's, or a quantize.Linear4bit's dequantized."""
    return base.weight if isinstance(base, nn.Linear) else base.dequantize()


class LoRALinear(nn.Module):
    """A frozen linear layer plus trainable low-rank updates (LoRA §4.1, Eq. 3):

        h = W0 x + b + scaling · B A dropout(x),    scaling = alpha / rank   (rsLoRA: alpha / sqrt(rank))

    `base` is an nn.Linear or a quantize.Linear4bit (QLoRA). A layer can hold several named adapters
    (one per task) of which one, `active_adapter`, is used (None: the base layer alone). Each adapter's
    tensors sit in dicts keyed by its name, so with one adapter `lora_A["default"]` is A. state_dict keys:

        <layer>.base.weight, <layer>.base.bias     W0 and b, frozen
        <layer>.lora_A.<adapter>                   A, (rank, in_features), Kaiming-uniform like nn.Linear
        <layer>.lora_B.<adapter>                   B, (out_features, rank), zeros, so ΔW = 0 at the start
        <layer>.lora_magnitude.<adapter>           DoRA's m, (out_features,), only when use_dora
    """

    def __init__(self, base, rank, alpha, dropout=0.0, use_rslora=False, use_dora=False, adapter_name="default"):
        super().__init__()
        if isinstance(base, LoRALinear):
            raise TypeError("this layer already has LoRA; applying it twice would stack a second wrapper. Add another "
                            "adapter with layer.add_adapter(name, ...) or apply_lora(model, ..., adapter_name='new')")
        if not isinstance(base, nn.Linear) and not hasattr(base, "dequantize"):  # quantize.Linear4bit has one
            raise TypeError(f"LoRALinear wraps an nn.Linear or a quantize.Linear4bit, got {type(base).__name__}")
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude = nn.ParameterDict()  # DoRA adapters only
        self.lora_dropout = nn.ModuleDict()
        self.scaling = {}  # adapter name -> alpha / rank, or alpha / sqrt(rank)
        self.config = {}  # adapter name -> its hyperparameters, saved with the adapter
        self.active_adapter = None
        self.merged_adapter = None  # the adapter folded into base.weight, if any (see merge)
        self.register_buffer("dora_factor", None, persistent=False)  # g of a merged DoRA adapter, for unmerge
        self.add_adapter(adapter_name, rank, alpha, dropout, use_rslora, use_dora)
        self.active_adapter = adapter_name

    def add_adapter(self, name, rank, alpha, dropout=0.0, use_rslora=False, use_dora=False):
        """Add a new, inactive adapter: A ~ Kaiming-uniform(a=sqrt(5)) as loralib does, B = 0."""
        check_rank(rank, self.in_features, self.out_features)
        check_hyperparameters(alpha, dropout, name)
        if name in self.lora_A:
            raise ValueError(f"this layer already has an adapter named {name!r}; LoRA cannot be applied twice, pick a "
                             f"new adapter name")
        if self.merged_adapter is not None:
            raise RuntimeError("this layer has a merged adapter; call unmerge_lora(model) before adding another")
        weight = dense_weight(self.base)  # only its device and dtype, and DoRA's norms
        A = torch.empty(rank, self.in_features, device=weight.device, dtype=weight.dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, rank, device=weight.device, dtype=weight.dtype))
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # rsLoRA §3: alpha / r shrinks the update as r grows, so large ranks learn no better; alpha / sqrt(r) does not
        self.scaling[name] = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.config[name] = dict(rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora, use_dora=use_dora)
        if use_dora:  # m starts at ||W0|| (B = 0 here), so W' = W0 at the start, as with plain LoRA
            self.lora_magnitude[name] = nn.Parameter(self.dora_weight_norm(name, weight))

    def delta_weight(self, name):
        """ΔW = scaling · B A, the (out_features, in_features) update the adapter stands for."""
        return self.scaling[name] * (self.lora_B[name] @ self.lora_A[name])

    def dora_weight_norm(self, name, weight):
        """||W0 + ΔW||_c of DoRA Eq. 5: one L2 norm per output feature, taken over the input dimension
        (dim=1 of the (out, in) weight; a "column" of the paper's d x k matrix), as PEFT computes it.
        No gradient flows through it (DoRA §4.3): it is treated as a constant, which saves memory."""
        with torch.no_grad():
            return torch.linalg.norm(weight + self.delta_weight(name).to(weight.dtype), dim=1)

    def forward(self, x):
        """h = W0 x + b + scaling · B (A dropout(x)), Eq. 3, without ever forming the d_out x d_in matrix BA."""
        result = self.base(x)  # W0 x + b, the frozen layer (a 4-bit one under QLoRA)
        name = self.active_adapter
        if name is None or self.merged_adapter is not None:
            return result  # adapters off, or the active one already folded into base.weight
        if name in self.lora_magnitude:
            return self.dora_forward(x, result, name)
        x = self.lora_dropout[name](x).to(self.lora_A[name].dtype)
        update = F.linear(F.linear(x, self.lora_A[name]), self.lora_B[name]) * self.scaling[name]
        return result + update.to(result.dtype)

    def dora_forward(self, x, result, name):
        """DoRA (Eq. 5): W' = m · (W0 + ΔW) / ||W0 + ΔW||_c, so h = g · (W0 x + ΔW x) + b with g = m / ||.||_c.
        Like PEFT, dropout applies to the adapter's path only: h = W0 x + b + (g - 1) W0 x' + g ΔW x'."""
        x_dropped = self.lora_dropout[name](x).to(self.lora_A[name].dtype)
        update = F.linear(F.linear(x_dropped, self.lora_A[name]), self.lora_B[name]) * self.scaling[name]
        W0 = dense_weight(self.base).to(x_dropped.dtype)
        g = self.lora_magnitude[name] / self.dora_weight_norm(name, W0)
        if self.training and isinstance(self.lora_dropout[name], nn.Dropout):
            W0_x = F.linear(x_dropped, W0)
        else:  # x' = x, and W0 x is already in the base output: take it back out instead of recomputing
            W0_x = result - self.base.bias if self.base.bias is not None else result
        return result + ((g - 1) * W0_x + g * update).to(result.dtype)

    @torch.no_grad()
    def merge(self):
        """Fold the active adapter into base.weight, W = W0 + scaling · BA (LoRA §4.1): no added inference
        latency. DoRA folds W = g · (W0 + ΔW) with g = m / ||W0 + ΔW||_c, kept so unmerge can undo it."""
        name = self.active_adapter
        if name is None or self.merged_adapter is not None:
            return
        check_mergeable(self.base)
        W = self.base.weight
        merged = W + self.delta_weight(name)
        if name in self.lora_magnitude:
            self.dora_factor = (self.lora_magnitude[name] / self.dora_weight_norm(name, W)).unsqueeze(1)
            merged = self.dora_factor * merged
        W.copy_(merged)
        self.merged_adapter = name

    @torch.no_grad()
    def unmerge(self):
        """W0 = W - ΔW (DoRA: W / g - ΔW), equal to the original W0 up to float rounding."""
        name = self.merged_adapter
        if name is None:
            return
        W = self.base.weight
        if name in self.lora_magnitude:
            W.div_(self.dora_factor)
            self.dora_factor = None
        W.sub_(self.delta_weight(name))
        self.merged_adapter = None

    def extra_repr(self):
        adapters = ", ".join(f"{n}(rank={c['rank']}, alpha={c['alpha']}{', dora' if c['use_dora'] else ''})"
                             for n, c in self.config.items())
        return (f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{adapters}], "
                f"active={self.active_adapter}")


# ----------------------------------------------------------------------------------------------------------
# Putting adapters into a model, and choosing between them


def replace_module(model, name, new):
    """Put `new` where the submodule called `name` (dotted, e.g. 'transformer.h.0.attn.q_proj') was."""
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, new)


def check_trainable_names(model, trainable):
    """Every name in `trainable` (kept trainable beside an adapter, e.g. a classification head) must be a module or
    parameter of the model: a typo would otherwise leave it frozen without a word."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    for t in trainable:
        if not any(n == t or n.startswith(t + ".") for n in names):
            top = ", ".join(name for name, _ in model.named_children())
            raise ValueError(f"trainable={t!r} names no module or parameter of the model (its top-level modules: "
                             f"{top})")


def lora_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapter_names(model):
    """Every adapter name in the model, in the order they were added."""
    return list(dict.fromkeys(name for _, layer in lora_layers(model) for name in layer.lora_A))


def resolve_targets(targets):
    """("q", "v") or "q,v" (a --lora_targets flag) -> ("attn.q_proj", "attn.v_proj"); "all-linear": all six."""
    targets = [t.strip() for t in targets.split(",") if t.strip()] if isinstance(targets, str) else tuple(targets)
    if not targets:
        raise ValueError(f"targets is empty; choose from {', '.join(TARGETS)} or 'all-linear'")
    for t in targets:  # every entry, so a typo next to 'all-linear' is not ignored
        if t not in TARGETS and t != "all-linear":
            raise ValueError(f"unknown LoRA target {t!r}; valid targets are {', '.join(TARGETS)} and 'all-linear'")
    if "all-linear" in targets:
        return tuple(TARGETS.values())
    return tuple(TARGETS[t] for t in dict.fromkeys(targets))


def is_lora_parameter(name):
    return any(part in ("lora_A", "lora_B", "lora_magnitude") for part in name.split("."))


def apply_lora(model, rank=8, alpha=16, targets=("q", "v"), dropout=0.0, use_rslora=False, use_dora=False, trainable=(),
               adapter_name="default"):
    """Wrap the target linear layers in LoRALinear (or, where they are wrapped already, add a new named
    adapter), freeze every other parameter, make the new adapter active, and return the model.

    targets: short names from TARGETS ("q", "k", "v", "o", "mlp_in", "mlp_out") or "all-linear", or "q,v".
    trainable: names of modules or parameters to keep trainable, e.g. ("head",) for a new classification
    head; they are saved with the adapter. Earlier adapters are frozen: only the new one trains."""
    check_hyperparameters(alpha, dropout, adapter_name)
    suffixes = resolve_targets(targets)
    trainable = (trainable,) if isinstance(trainable, str) else tuple(trainable)
    if adapter_name in adapter_names(model):
        raise ValueError(f"the model already has a LoRA adapter named {adapter_name!r}: applying LoRA twice to the "
                         f"same layers. Pass adapter_name='another_name' to add a second adapter, or load_adapter to "
                         f"replace its weights")
    layers = [(name, m) for name, m in model.named_modules() if any(name == s or name.endswith("." + s)
                                                                    for s in suffixes)]
    if not layers:
        raise ValueError(f"no layer of this {type(model).__name__} is named like {', '.join(suffixes)}; is it a "
                         f"model.GPT?")
    if any(layer.merged_adapter is not None for _, layer in lora_layers(model)):
        raise RuntimeError("an adapter is merged into the base weights; call unmerge_lora(model) before adding another")
    for name, layer in layers:  # check everything before changing anything
        if not isinstance(layer, (nn.Linear, LoRALinear)) and not hasattr(layer, "dequantize"):  # or a Linear4bit
            raise TypeError(f"{name} is a {type(layer).__name__}; LoRA targets linear layers only")
        check_rank(rank, layer.in_features, layer.out_features)
    check_trainable_names(model, trainable)
    all_parameters = dict(model.named_parameters(remove_duplicate=False))

    model.requires_grad_(False)
    for name, layer in layers:
        if isinstance(layer, LoRALinear):
            layer.add_adapter(adapter_name, rank, alpha, dropout, use_rslora, use_dora)
        else:
            replace_module(model, name, LoRALinear(layer, rank, alpha, dropout, use_rslora, use_dora, adapter_name))
    for n, p in all_parameters.items():
        if any(n == t or n.startswith(t + ".") for t in trainable):
            p.requires_grad_(True)
    return set_adapter(model, adapter_name)


def set_adapter(model, name):
    """Make adapter `name` the one every LoRA layer uses (layers it does not cover run their base alone).
    This switches what the model computes; what trains is still decided by requires_grad."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers; call apply_lora(model, ...) or load_adapter first")
    if name not in adapter_names(model):
        raise ValueError(f"no adapter named {name!r}; the model has {', '.join(map(repr, adapter_names(model)))}")
    if any(layer.merged_adapter is not None for _, layer in layers):
        raise RuntimeError("an adapter is merged into the base weights; call unmerge_lora(model) before switching")
    for _, layer in layers:
        layer.active_adapter = name if name in layer.lora_A else None
    return model


def disable_adapters(model):
    """Run the frozen base model alone (set_adapter turns an adapter back on)."""
    layers = lora_layers(model)
    if any(layer.merged_adapter is not None for _, layer in layers):
        raise RuntimeError("an adapter is merged into the base weights; call unmerge_lora(model) before disabling")
    for _, layer in layers:
        layer.active_adapter = None
    return model


def delete_adapter(model, name):
    """Remove adapter `name`; a layer left without adapters goes back to being its plain base layer."""
    if name not in adapter_names(model):
        raise ValueError(f"no adapter named {name!r}; the model has "
                         f"{', '.join(map(repr, adapter_names(model))) or 'none'}")
    if any(layer.merged_adapter == name for _, layer in lora_layers(model)):
        raise RuntimeError(f"adapter {name!r} is merged; call unmerge_lora(model) before deleting it")
    for layer_name, layer in lora_layers(model):
        if name not in layer.lora_A:
            continue
        for store in (layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.lora_dropout, layer.scaling,
                      layer.config):
            if name in store:
                del store[name]
        if layer.active_adapter == name:
            layer.active_adapter = None
        if not layer.lora_A:
            replace_module(model, layer_name, layer.base)
    return model


# ----------------------------------------------------------------------------------------------------------
# Merging for inference


def merge_lora(model, unload=False):
    """Fold each layer's active adapter into its base weight (W = W0 + scaling · BA, §4.1), so the model
    costs exactly what the base does at inference. unmerge_lora undoes it. With unload=True the LoRA
    wrappers are replaced by their merged base layers: a plain model with the original state_dict keys
    (every adapter is dropped, nothing to unmerge). 4-bit bases: quantize.merge_lora_into_dequantized.
    While merged, the LoRA parameters get no gradient: unmerge before training on."""
    layers = lora_layers(model)
    active = [layer for _, layer in layers if layer.active_adapter is not None and layer.merged_adapter is None]
    if not active and not unload:
        raise ValueError("no active, unmerged adapter to merge; call set_adapter(model, name) first")
    for layer in active:  # all checked before any layer changes
        check_mergeable(layer.base)
    for layer in active:
        layer.merge()
    if unload:
        for name, layer in layers:
            replace_module(model, name, layer.base)
    return model


def unmerge_lora(model):
    """Subtract the merged adapters back out of the base weights, so they can be switched or trained."""
    merged = [layer for _, layer in lora_layers(model) if layer.merged_adapter is not None]
    if not merged:
        raise ValueError("no adapter is merged; nothing to unmerge")
    for layer in merged:
        layer.unmerge()
    return model


# ----------------------------------------------------------------------------------------------------------
# LoRA+: a larger learning rate for B


def lora_param_groups(model, lr, loraplus_lr_ratio=16.0, weight_decay=0.0):
    """Optimizer parameter groups for LoRA+ (arXiv:2402.12354): B learns at lr * loraplus_lr_ratio, the rest
    at lr. The paper's analysis of wide models (§3) shows that with one rate for both, B's updates are too
    small for efficient feature learning; its experiments suggest a ratio around 2^4 = 16 (1 = plain LoRA).
    Only trainable parameters are included. No weight decay on 1-d tensors (biases, LayerNorm weights, DoRA
    magnitudes: decaying m to 0 would shrink the pretrained weights). PEFT instead puts 1-d tensors at B's rate."""
    if not (math.isfinite(lr) and math.isfinite(loraplus_lr_ratio)) or lr <= 0 or loraplus_lr_ratio <= 0:
        raise ValueError(f"lr and loraplus_lr_ratio must be positive, got lr={lr}, ratio={loraplus_lr_ratio}")
    groups = {"lora_A": [], "lora_B": [], "other": [], "no_decay": []}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if p.requires_grad:
            groups["lora_B" if "lora_B" in parts else "lora_A" if "lora_A" in parts else "no_decay" if p.ndim < 2
                   else "other"].append(p)
    if not any(groups.values()):
        raise ValueError("the model has no trainable parameters; call apply_lora(model, ...) first")
    settings = {"lora_A": (lr, weight_decay), "lora_B": (lr * loraplus_lr_ratio, weight_decay),
                "other": (lr, weight_decay), "no_decay": (lr, 0.0)}
    return [dict(name=g, params=ps, lr=settings[g][0], weight_decay=settings[g][1]) for g, ps in groups.items() if ps]


# ----------------------------------------------------------------------------------------------------------
# Saving and loading only the adapter


def adapter_tensors(model, name):
    """One adapter's tensors, keyed '<layer>.lora_A', '<layer>.lora_B' ('<layer>.lora_magnitude' for DoRA)
    without the adapter name, so a file can be loaded under any name."""
    tensors = {}
    for layer_name, layer in lora_layers(model):
        if name in layer.lora_A:
            tensors[f"{layer_name}.lora_A"] = layer.lora_A[name]
            tensors[f"{layer_name}.lora_B"] = layer.lora_B[name]
            if name in layer.lora_magnitude:
                tensors[f"{layer_name}.lora_magnitude"] = layer.lora_magnitude[name]
    return tensors


def kept_trainable_parameters(model):
    """Trainable parameters that are not LoRA's: the modules apply_lora(trainable=...) kept, e.g. a head."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and not is_lora_parameter(n)}


def active_adapter_name(model):
    active = {layer.active_adapter for _, layer in lora_layers(model)} - {None}
    if len(active) != 1:
        raise ValueError(f"no active adapter; pass adapter_name= one of {adapter_names(model)}")
    return active.pop()


def save_adapter(model, directory, adapter_name=None, metadata=None):
    """Write one adapter (default: the active one) to `directory`: A, B (and DoRA's m) of every adapted layer plus
    the kept-trainable parameters (e.g. a classification head), i.e. everything fine-tuning changed and nothing of
    the frozen base, with the hyperparameters that rebuild it. The file format (safetensors + a JSON config that
    records the weights' checksum) is plumbing: support/adapter_files.py. Returns the weights file's path."""
    from support.adapter_files import save_lora_adapter

    return save_lora_adapter(model, directory, adapter_name, metadata)


def load_adapter(model, directory, adapter_name=None):
    """Load an adapter written by save_adapter and make it active. A model without it (e.g. a fresh base) first
    gets LoRA applied as the saved config describes; a model that has it gets its weights replaced. Every field,
    the checksum, names, shapes and values are checked first (support/adapter_files.py)."""
    from support.adapter_files import load_lora_adapter

    return load_lora_adapter(model, directory, adapter_name)


def adapter_size_report(model, adapter_name=None):
    """Bytes of one adapter's tensors (what save_adapter writes, less a small header) next to the bytes of every
    non-LoRA tensor (what a fully fine-tuned copy would take): LoRA §4.2's "350GB -> 35MB" for GPT-3, at our scale."""
    name = adapter_name or active_adapter_name(model)
    adapter = {**adapter_tensors(model, name), **kept_trainable_parameters(model)}
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.values())
    tensors = {id(t): t for n, t in [*model.named_parameters(), *model.named_buffers()] if not is_lora_parameter(n)}
    model_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return dict(adapter_bytes=adapter_bytes, model_bytes=model_bytes, ratio=model_bytes / max(adapter_bytes, 1))


# ----------------------------------------------------------------------------------------------------------
# Checks of the arguments: a wrong value is named with what would be valid


def check_rank(rank, in_features, out_features):
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}; LoRA papers use 1 to 64, 8 is a common start")
    if rank > min(in_features, out_features):
        raise ValueError(f"rank {rank} is larger than a {in_features} -> {out_features} layer allows: BA has rank at "
                         f"most min(in, out) = {min(in_features, out_features)}")


def check_hyperparameters(alpha, dropout, adapter_name):
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}; alpha = 2 * rank is a common choice")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {adapter_name!r}")


def check_mergeable(base):
    if not isinstance(base, nn.Linear):
        raise TypeError(f"cannot merge into a {type(base).__name__}: W0 + ΔW would have to be re-quantized, losing "
                        f"most of the update; quantize.merge_lora_into_dequantized(model) merges into a dense copy")
