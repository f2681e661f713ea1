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

AdapterHub's workflow (Pfeiffer et al. 2020, arXiv:2007.07779): one frozen base, one adapter per task, trained
one after another. `apply_adapters(model, ..., adapter_name="spam")` adds a named adapter; `set_adapter`
switches; `save_adapter` / `load_adapter` write and read one adapter (safetensors + JSON). Those three work for
every method built on `NamedAdapterLayer` below: bottleneck adapters here, prefix_tuning.py, ia3.py and
llama_adapter.py.
"""

import hashlib
import inspect
import json
import os

import torch.nn as nn
import torch.nn.functional as F

from lora import check_trainable_names, replace_module
from support.common import write_bytes_atomic, write_json_atomic
from support.adapter_files import copy_stored_tensors, read_adapter_weights
from support.safety import UserError, first_line, read_saved_pair

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PLACEMENTS = {  # placement -> the layers whose output gets an adapter, as their names end in model.GPT
    "houlsby": ("attn.o_proj", "mlp.fc_out"),
    "pfeiffer": ("mlp.fc_out",),
}
ACTIVATIONS = {"gelu": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


def check_adapter_name(name):
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")


class NamedAdapterLayer(nn.Module):
    """A layer that holds one set of trainable tensors per named adapter (one per task) and uses the
    active one; active_adapter None runs the frozen base alone. Subclasses say which tensors an adapter has
    (adapter_tensors) and how to remove one (remove_adapter). `base` is the wrapped frozen module, or None when
    the layer wraps nothing (the prefix of prefix_tuning.py)."""

    method = None  # "bottleneck", "prefix", "ia3" or "llama_adapter": which apply_* rebuilds it from a saved config

    def __init__(self, base=None):
        super().__init__()
        self.base = base.requires_grad_(False) if base is not None else None
        self.config = {}  # adapter name -> the apply_* arguments it was made with (saved in adapter_config.json)
        self.active_adapter = None

    def adapter_tensors(self, name):
        """{short key: Parameter} of adapter `name` in this layer."""
        raise NotImplementedError

    def remove_adapter(self, name):
        raise NotImplementedError


def adapter_layers(model, method=None):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NamedAdapterLayer) and method in (None, m.method)]


def adapter_names(model, method=None):
    """Every adapter name in the model (of one method, if given), in the order they were added."""
    return list(dict.fromkeys(name for _, layer in adapter_layers(model, method) for name in layer.config))


def adapter_parameter_ids(model):
    return {id(p) for _, layer in adapter_layers(model) for name in layer.config for p in layer.adapter_tensors(name).values()}


def check_new_adapter(model, adapter_name, trainable):
    """The checks every apply_* makes before changing the model: a fresh name, and `trainable` names that exist."""
    check_adapter_name(adapter_name)
    if adapter_name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named {adapter_name!r}: applying it twice would add a second copy. "
                         f"Pass adapter_name='another_name' to add an adapter for another task, or load_adapter to replace its weights")
    trainable = (trainable,) if isinstance(trainable, str) else tuple(trainable)
    check_trainable_names(model, trainable)
    return trainable


def train_only(model, adapter_name, trainable):
    """Freeze everything, then unfreeze adapter `adapter_name` and the modules named in `trainable` (e.g. a
    new classification head): earlier adapters stay frozen, so training one task cannot change another."""
    model.requires_grad_(False)
    for _, layer in adapter_layers(model):
        if adapter_name in layer.config:
            for p in layer.adapter_tensors(adapter_name).values():
                p.requires_grad_(True)
    for name, p in model.named_parameters(remove_duplicate=False):
        if any(name == t or name.startswith(t + ".") for t in trainable):
            p.requires_grad_(True)


def check_nothing_merged(layers):
    merged = [n for n, layer in layers if getattr(layer, "merged_adapter", None) is not None]
    if merged:
        raise RuntimeError(f"{merged[0]} has an adapter merged into its base weight, so its base is no longer the original: "
                           f"switching adapters would compute a mix of two tasks. Merge a copy of the model instead")


def set_adapter(model, name):
    """Make adapter `name` the active one in every layer that has it; layers without it run their base alone."""
    layers = adapter_layers(model)
    if name not in adapter_names(model):
        raise ValueError(f"no adapter named {name!r}; the model has {', '.join(map(repr, adapter_names(model))) or 'none'}")
    check_nothing_merged(layers)
    for _, layer in layers:
        layer.active_adapter = name if name in layer.config else None
    return model


def disable_adapters(model):
    """Run the frozen base model alone (set_adapter turns an adapter back on)."""
    check_nothing_merged(adapter_layers(model))
    for _, layer in adapter_layers(model):
        layer.active_adapter = None
    return model


def delete_adapter(model, name):
    """Remove adapter `name`; a layer left with no adapter is replaced by the module it wrapped."""
    if name not in adapter_names(model):
        raise ValueError(f"no adapter named {name!r}; the model has {', '.join(map(repr, adapter_names(model))) or 'none'}")
    for layer_name, layer in adapter_layers(model):
        if name in layer.config:
            layer.remove_adapter(name)
            del layer.config[name]
            if layer.active_adapter == name:
                layer.active_adapter = None
            if not layer.config:
                replace_module(model, layer_name, layer.base)
    return model


# ----------------------------------------------------------------------------------------------------------
# Houlsby and Pfeiffer bottleneck adapters


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


class AdapterLinear(NamedAdapterLayer):
    """A frozen linear layer followed by a bottleneck adapter on its output: y = h + up(act(down(h))), h = base(x).
    state_dict keys: <layer>.base.* (frozen), <layer>.adapters.<name>.down.*, <layer>.adapters.<name>.up.*"""

    method = "bottleneck"

    def __init__(self, base):
        if isinstance(base, NamedAdapterLayer) or not isinstance(base, nn.Linear):
            raise TypeError(f"an adapter goes after an nn.Linear, got {type(base).__name__}")
        super().__init__(base)
        self.adapters = nn.ModuleDict()

    def add_adapter(self, name, config):
        weight = self.base.weight
        self.adapters[name] = Bottleneck(self.base.out_features, config["bottleneck"], config["activation"], config["init_std"]).to(weight.device, weight.dtype)
        self.config[name] = config

    def adapter_tensors(self, name):
        return dict(self.adapters[name].named_parameters())

    def remove_adapter(self, name):
        del self.adapters[name]

    def forward(self, x):
        h = self.base(x)
        if self.active_adapter is None:
            return h
        return h + self.adapters[self.active_adapter](h)


class AdapterLayerNorm(NamedAdapterLayer):
    """A LayerNorm whose gain and bias are trained per adapter (Houlsby §2.1), starting from the base's values;
    the base LayerNorm itself stays frozen, so switching adapters switches layer norms too."""

    method = "bottleneck"

    def __init__(self, base):
        if not isinstance(base, nn.LayerNorm):
            raise TypeError(f"expected an nn.LayerNorm, got {type(base).__name__}")
        super().__init__(base)
        self.weight = nn.ParameterDict()
        self.bias = nn.ParameterDict()

    def add_adapter(self, name, config):
        self.weight[name] = nn.Parameter(self.base.weight.detach().clone())
        if self.base.bias is not None:
            self.bias[name] = nn.Parameter(self.base.bias.detach().clone())
        self.config[name] = config

    def adapter_tensors(self, name):
        return {"weight": self.weight[name], **({"bias": self.bias[name]} if name in self.bias else {})}

    def remove_adapter(self, name):
        del self.weight[name]
        if name in self.bias:
            del self.bias[name]

    def forward(self, x):
        name = self.active_adapter
        if name is None:
            return self.base(x)
        return F.layer_norm(x, self.base.normalized_shape, self.weight[name], self.bias[name] if name in self.bias else None, self.base.eps)


def layers_ending_with(model, suffixes):
    return [(n, m) for n, m in model.named_modules() if any(n == s or n.endswith("." + s) for s in suffixes)]


def apply_adapters(model, bottleneck=64, placement="houlsby", train_layer_norms=None, activation="gelu", init_std=1e-2,
                   trainable=(), adapter_name="default"):
    """Add a bottleneck adapter of `bottleneck` units after each layer `placement` names (see PLACEMENTS), freeze
    everything else, make the new adapter active, and return the model.

    train_layer_norms: give the adapter its own trainable copy of every LayerNorm (Houlsby §2.1); None means the
    placement's own choice: True for houlsby, False for pfeiffer. trainable: modules to keep trainable as well,
    e.g. ("head",); they are saved with the adapter. A second call with a new adapter_name adds a second task's
    adapter beside the first (frozen) one."""
    if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck <= 0:
        raise ValueError(f"bottleneck must be a positive integer (the adapter's hidden size m), got {bottleneck!r}; Houlsby used 8 to 256, 64 on BERT-base")
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; use one of {', '.join(PLACEMENTS)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}")
    if not init_std > 0:
        raise ValueError(f"init_std must be positive, got {init_std!r}")
    trainable = check_new_adapter(model, adapter_name, trainable)
    if train_layer_norms is None:
        train_layer_norms = placement == "houlsby"
    targets = layers_ending_with(model, PLACEMENTS[placement])
    if not targets:
        raise ValueError(f"no layer of this {type(model).__name__} is named like {', '.join(PLACEMENTS[placement])}; is it a model.GPT?")
    for name, layer in targets:
        if not isinstance(layer, (nn.Linear, AdapterLinear)):
            raise TypeError(f"{name} is a {type(layer).__name__}; a bottleneck adapter goes after an nn.Linear (merge or remove LoRA first)")
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.LayerNorm, AdapterLayerNorm))] if train_layer_norms else []

    config = dict(bottleneck=bottleneck, placement=placement, train_layer_norms=train_layer_norms, activation=activation, init_std=init_std)
    for name, layer in targets + norms:
        if not isinstance(layer, NamedAdapterLayer):
            layer = AdapterLinear(layer) if isinstance(layer, nn.Linear) else AdapterLayerNorm(layer)
            replace_module(model, name, layer)
        layer.add_adapter(adapter_name, config)
    train_only(model, adapter_name, trainable)
    return set_adapter(model, adapter_name)


def bottleneck_parameter_count(d, m):
    """Parameters of one adapter: down (m x d + m) and up (d x m + d) = 2md + d + m."""
    return 2 * m * d + d + m


# ----------------------------------------------------------------------------------------------------------
# Saving and loading one adapter, of any method


def adapter_config(model, name):
    """{"method", "adapter_name", the apply_* arguments, "trainable"}: what load_adapter needs to rebuild `name`."""
    layers = [layer for _, layer in adapter_layers(model) if name in layer.config]
    if not layers:
        raise ValueError(f"no adapter named {name!r}; the model has {', '.join(map(repr, adapter_names(model))) or 'none'}")
    kept = sorted(kept_trainable_parameters(model))
    return dict(method=layers[0].method, adapter_name=name, **layers[0].config[name], trainable=kept)


def adapter_state(model, name):
    """{'<layer>.<key>': tensor} of adapter `name`, without the name in the keys (so it loads under any name)."""
    return {f"{layer_name}.{key}": t for layer_name, layer in adapter_layers(model) if name in layer.config
            for key, t in layer.adapter_tensors(name).items()}


def kept_trainable_parameters(model):
    """Trainable parameters that belong to no adapter: what apply_*(trainable=...) kept, e.g. a classification head."""
    ids = adapter_parameter_ids(model)
    return {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in ids}


def active_adapter_name(model):
    active = {layer.active_adapter for _, layer in adapter_layers(model)} - {None}
    if len(active) != 1:
        raise ValueError(f"no single active adapter; pass adapter_name= one of {adapter_names(model)}")
    return active.pop()


def save_adapter(model, directory, adapter_name=None):
    """Write one adapter (default: the active one) to directory/adapter_model.safetensors and its settings to
    directory/adapter_config.json: its tensors plus the kept-trainable ones (e.g. a head), nothing of the base. The
    config is written last and records the weights' SHA-256, as lora.save_adapter's does (support/adapter_files.py)."""
    from safetensors.torch import save

    name = adapter_name or active_adapter_name(model)
    config = adapter_config(model, name)
    tensors = {**adapter_state(model, name), **kept_trainable_parameters(model)}
    weights = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    os.makedirs(directory, exist_ok=True)
    weights_path = os.path.join(directory, ADAPTER_WEIGHTS)
    write_bytes_atomic(weights, weights_path)
    write_json_atomic({**config, "weights_sha256": hashlib.sha256(weights).hexdigest()}, os.path.join(directory, ADAPTER_CONFIG))
    return weights_path


def apply_function(method):
    """The apply_* that builds adapters of `method` (imported here: the other methods' modules import this one)."""
    if method == "bottleneck":
        return apply_adapters
    if method == "prefix":
        from other_methods.prefix_tuning import apply_prefix_tuning

        return apply_prefix_tuning
    if method == "ia3":
        from other_methods.ia3 import apply_ia3

        return apply_ia3
    if method == "llama_adapter":
        from other_methods.llama_adapter import apply_llama_adapter

        return apply_llama_adapter
    raise ValueError(f"unknown adapter method {method!r} in the config; this module knows bottleneck, prefix, ia3 and llama_adapter")


def read_adapter_config(directory):
    """(adapter_config.json, the apply_* settings in it, the weights' path) of a directory save_adapter wrote, checked:
    the keys save_adapter writes, each of the right type, and no setting the method's apply_* does not take."""
    config, weights_path = read_saved_pair(directory, ADAPTER_CONFIG, ADAPTER_WEIGHTS, "adapters.save_adapter")
    path = os.path.join(directory, ADAPTER_CONFIG)
    missing = [k for k in ("method", "adapter_name", "trainable", "weights_sha256") if k not in config]
    if missing == ["weights_sha256"]:
        raise UserError(f"{path} records no checksum of its weights (written by an older version of save_adapter); save the adapter again")
    if missing:
        raise UserError(f"{path} lacks {', '.join(map(repr, missing))}: it is not an adapter config written by adapters.save_adapter")
    checks = {"method": (lambda v: isinstance(v, str), "a string"), "adapter_name": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
              "trainable": (lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v), "a list of parameter names"),
              "weights_sha256": (lambda v: isinstance(v, str) and len(v) == 64, f"the SHA-256 of {ADAPTER_WEIGHTS} (hex)")}
    for key, (valid, description) in checks.items():
        if not valid(config[key]):
            raise UserError(f"{path}: {key!r} is {json.dumps(config[key])}, but must be {description}")
    settings = {k: v for k, v in config.items() if k not in checks}
    accepted = set(inspect.signature(apply_function(config["method"])).parameters) - {"model", "trainable", "adapter_name"}
    unknown = sorted(set(settings) - accepted)
    if unknown:
        raise UserError(f"{path} has setting {unknown[0]!r}, which {config['method']} adapters do not take (they take "
                        f"{', '.join(sorted(accepted))}); the file was not written by save_adapter, or was edited")
    return config, settings, weights_path


def load_adapter(model, directory, adapter_name=None):
    """Load an adapter written by save_adapter and make it active. A model without it first gets it applied as
    adapter_config.json says; one that has it gets its weights replaced. The config's keys, the weights' checksum,
    names, shapes and values (finite floats only) are checked first, as lora.load_adapter checks LoRA's."""
    config, settings, weights_path = read_adapter_config(directory)
    stored = read_adapter_weights(weights_path, config["weights_sha256"], ADAPTER_CONFIG)
    apply = apply_function(config["method"])
    name = adapter_name or config["adapter_name"]
    created = name not in adapter_names(model)
    if created:
        try:
            apply(model, **settings, trainable=config["trainable"], adapter_name=name)
        except TypeError as e:  # a setting of the wrong type, e.g. a bottleneck given as a string
            raise UserError(f"{os.path.join(directory, ADAPTER_CONFIG)}: its settings do not build a {config['method']} adapter "
                            f"({first_line(e)}); save the adapter again") from None
    try:
        ours = adapter_config(model, name)
        if ours["method"] != config["method"] or {k: ours.get(k) for k in settings} != settings:
            raise ValueError(f"the model's adapter {name!r} is {ours} but {directory} holds {config}; load it under another adapter_name")
        copy_stored_tensors(stored, model, adapter_state(model, name), config["trainable"], weights_path)
    except Exception:
        if created:
            delete_adapter(model, name)
        raise
    return set_adapter(model, name)
