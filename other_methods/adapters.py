"""
Bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751), and what every method of this family shares:
several named adapters on one frozen base, switching between them, saving and loading one of them.

Where LoRA adds a low-rank update *beside* a weight, an adapter adds a small network *after* a sub-layer
(Houlsby §2.1, Figure 2). Each one squeezes the sub-layer's output h (width d) through a bottleneck of m units
and adds the result back:

    h + up(act(down(h)))        down: d -> m,  up: m -> d,  m << d        parameters: 2md + d + m

Houlsby puts two in every transformer block: after the attention output projection and after the MLP's
down-projection, both before the residual addition. It also trains the layer norms (§2.1: "the layer
normalization parameters ... per task"). Pfeiffer et al. 2020 (AdapterFusion, arXiv:2005.00247, §3.2) keep
only the adapter after the MLP, which halves the added layers at about the same accuracy. `placement` picks one:

    houlsby   transformer.h[i].attn.o_proj  +  transformer.h[i].mlp.fc_out  (+ every LayerNorm, per adapter)
    pfeiffer  transformer.h[i].mlp.fc_out

The up-projection starts at zero, so at the start h + up(...) = h: the adapted model computes exactly what the
base does (the paper's "near-identity initialisation", §2.1, made exact; down starts small, std 1e-2 as in the
paper). The price of an adapter is at inference: its layers run one after another on the critical path and
cannot be folded into the base weights, unlike a merged LoRA (LoRA §3, Table 1).

AdapterHub's workflow (Pfeiffer et al. 2020, arXiv:2007.07779), one frozen base and one adapter per task trained
one after another, is support/adapters.py's for every method: `add_adapter(model, "spam", "bottleneck", ...)` adds
a named adapter, `set_adapter` switches, `save_adapter` / `load_adapter` write and read one.
"""

import torch.nn as nn
import torch.nn.functional as F

from lora import replace_module
from other_methods import check_new_adapter, layers_ending_with, train_only

PLACEMENTS = {  # placement -> the layers whose output gets an adapter, as their names end in model.GPT
    "houlsby": ("attn.o_proj", "mlp.fc_out"),
    "pfeiffer": ("mlp.fc_out",),
}
ACTIVATIONS = {"gelu": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


class Bottleneck(nn.Module):
    """up(act(down(h))): d -> m -> d, 2md + d + m parameters (Houlsby §2.1). up starts at zero (exact identity
    of h + up(...)), down at a small normal (std 1e-2), both biases at zero."""

    def __init__(self, d, m, activation="gelu", init_std=1e-2):
        super().__init__()
        self.down = nn.Linear(d, m)
        self.up = nn.Linear(m, d)
        self.activation = activation
        nn.init.trunc_normal_(self.down.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        return self.up(ACTIVATIONS[self.activation](self.down(h)))


class AdapterLinear(nn.Module):
    """A frozen linear layer followed by a bottleneck adapter on its output: y = h + up(act(down(h))), h = base(x).
    state_dict keys: <layer>.base.* (frozen), <layer>.adapter.down.*, <layer>.adapter.up.*"""

    method = "bottleneck"

    def __init__(self, base, bottleneck, activation, init_std):
        super().__init__()
        self.base = base.requires_grad_(False)
        weight = base.weight
        self.adapter = Bottleneck(base.out_features, bottleneck, activation, init_std).to(weight.device, weight.dtype)

    def forward(self, x):
        h = self.base(x)
        return h + self.adapter(h)


class AdapterLayerNorm(nn.Module):
    """A LayerNorm whose gain and bias are trained with the adapter (Houlsby §2.1), starting from the base's values;
    the base LayerNorm itself stays frozen, so switching adapters switches layer norms too."""

    method = "bottleneck"

    def __init__(self, base):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.weight = nn.Parameter(base.weight.detach().clone())
        self.bias = nn.Parameter(base.bias.detach().clone()) if base.bias is not None else None

    def forward(self, x):
        return F.layer_norm(x, self.base.normalized_shape, self.weight, self.bias, self.base.eps)


def apply_adapters(
    model, bottleneck=64, placement="houlsby", train_layer_norms=None, activation="gelu", init_std=1e-2, trainable=()
):
    """Add a bottleneck adapter of `bottleneck` units after each layer `placement` names (see PLACEMENTS), freeze
    everything else and return the model.

    train_layer_norms: give the adapter its own trainable copy of every LayerNorm (Houlsby §2.1); None means the
    placement's own choice: True for houlsby, False for pfeiffer. trainable: modules to keep trainable as well,
    e.g. ("head",); they are saved with the adapter."""
    if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck <= 0:
        raise ValueError(
            f"bottleneck must be a positive integer (the adapter's hidden size m), got {bottleneck!r}; "
            f"Houlsby used 8 to 256, 64 on BERT-base"
        )
    if placement not in PLACEMENTS or activation not in ACTIVATIONS or not init_std > 0:
        raise ValueError(
            f"placement must be one of {', '.join(PLACEMENTS)} (got {placement!r}), activation one of "
            f"{', '.join(ACTIVATIONS)} (got {activation!r}), init_std positive (got {init_std!r})"
        )
    trainable = check_new_adapter(model, trainable)
    train_layer_norms = placement == "houlsby" if train_layer_norms is None else train_layer_norms
    targets = layers_ending_with(model, PLACEMENTS[placement])
    wrong = [name for name, layer in targets if not isinstance(layer, nn.Linear)]
    if not targets or wrong:
        raise ValueError(
            f"a bottleneck adapter goes after the nn.Linear layers of a model.GPT; "
            f"{wrong[0] if wrong else 'none'} is not one"
        )
    settings = dict(
        bottleneck=bottleneck,
        placement=placement,
        train_layer_norms=train_layer_norms,
        activation=activation,
        init_std=init_std,
    )
    wrappers = [(name, AdapterLinear(layer, bottleneck, activation, init_std)) for name, layer in targets]
    if train_layer_norms:
        wrappers += [(n, AdapterLayerNorm(m)) for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    for name, wrapper in wrappers:
        wrapper.settings = settings
        replace_module(model, name, wrapper)
    train_only(model, [w for _, w in wrappers], trainable)
    return model


def bottleneck_parameter_count(d, m):
    """Parameters of one adapter: down (m x d + m) and up (d x m + d) = 2md + d + m."""
    return 2 * m * d + d + m
