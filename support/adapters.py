"""
Named adapters for every PEFT method here (lora.py, other_methods/), written once: the papers' one frozen base with
one small adapter per task (LoRA §4.2, AdapterHub). An adapter is the set of wrappers one apply_* call put into the
model; each holds the frozen module it adapts as `.base` and names its kind as `.method`. One adapter is in the
model, the active one; the others are kept aside (their wrappers out, the bases back in), so no forward looks an
adapter up by name and switching copies no tensor.

On disk: adapter_model.safetensors (the tensors, keyed '<layer>.<tensor>', and the kept-trainable parameters such as
a head) and adapter_config.json (method, name, the apply_* settings, the weights' SHA-256, metadata), written last:
the manifest of the pair, so weights from another save (a crash between the two renames) are refused.
"""

import hashlib
import importlib
import inspect
import json
import math
import os

import torch

from lora import lora_scaling, replace_module
from support.files import (
    UserError,
    check_tensors_match,
    first_line,
    read_saved_pair,
    read_weights_checked,
    write_bytes_atomic,
    write_json_atomic,
)

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
METHODS = {  # a wrapper's `method` -> the apply_* function that builds adapters of that kind
    "lora": ("lora", "apply_lora"),
    "bottleneck": ("other_methods.adapters", "apply_adapters"),
    "ia3": ("other_methods.ia3", "apply_ia3"),
    "prefix": ("other_methods.prefix_tuning", "apply_prefix_tuning"),
    "llama_adapter": ("other_methods.llama_adapter", "apply_llama_adapter"),
}
# The largest alpha / r (rsLoRA: alpha / sqrt(r)) of a LoRA adapter: 2 x rank gives 2, rsLoRA at rank 256 about 32.
# Beyond it a file is damaged or hand-edited (alpha 1e30 makes every answer blank); support.cli refuses it at the start.
MAX_LORA_SCALING = 1000.0


def apply_function(method):
    module, function = METHODS[method]
    return getattr(importlib.import_module(module), function)


def adapter_layers(model):
    """(name, wrapper) of every adapter layer in the model: those of the active adapter."""
    return [(n, m) for n, m in model.named_modules() if getattr(type(m), "method", None) in METHODS]


def registry(model):
    """{"active": its name or None, "adapters": {name: [(layer name, wrapper), ...]}}, kept on the model; an adapter a
    direct apply_* call put in is registered as "default"."""
    reg = model.__dict__.setdefault("adapter_registry", {"active": None, "adapters": {}})
    in_model = adapter_layers(model)
    if reg["active"] is not None and not in_model:  # its wrappers were taken out behind our back (merge_lora unload)
        del reg["adapters"][reg["active"]]
        reg["active"] = None
    active_layers = {id(m) for _, m in reg["adapters"].get(reg["active"], [])}
    if reg["active"] is not None and {id(m) for _, m in in_model} != active_layers:
        raise RuntimeError(f"the model's adapter layers are not {reg['active']!r}'s: switch through one model for all")
    if reg["active"] is None and in_model:
        reg["active"] = "default" if "default" not in reg["adapters"] else f"default{len(reg['adapters'])}"
        reg["adapters"][reg["active"]] = in_model
    return reg


def adapter_names(model):
    """Every adapter of the model, active or aside, in the order they were added."""
    return list(registry(model)["adapters"])


def active_adapter(model):
    return registry(model)["active"]


def adapter_named(model, name):
    """The (layer name, wrapper) pairs of adapter `name`, which must exist."""
    adapters = registry(model)["adapters"]
    if name not in adapters:
        raise ValueError(f"no adapter named {name!r}; the model has {', '.join(map(repr, adapters)) or 'none'}")
    return adapters[name]


def put_aside(model):
    """Take the active adapter's wrappers out of the model and put their bases back: the frozen base alone."""
    reg = registry(model)
    if reg["active"] is None:
        return model
    layers = adapter_named(model, reg["active"])
    merged = [n for n, layer in layers if getattr(layer, "merged", False)]
    if merged:
        raise RuntimeError(f"{merged[0]}'s update is merged into its base weight: call lora.unmerge_lora(model) first")
    for layer_name, wrapper in layers:
        replace_module(model, layer_name, wrapper.base)
    reg["active"] = None
    return model


def set_adapter(model, name):
    """Make adapter `name` the active one: the active adapter goes aside, `name`'s wrappers go back in."""
    layers, reg = adapter_named(model, name), registry(model)
    if reg["active"] == name:
        return model
    put_aside(model)
    device = next(model.parameters()).device
    for layer_name, wrapper in layers:
        parent, _, child = layer_name.rpartition(".")
        if getattr(model.get_submodule(parent), child) is not wrapper.base:
            raise RuntimeError(f"{layer_name} is no longer the layer adapter {name!r} was made for; apply it again")
        replace_module(model, layer_name, wrapper.to(device))
    reg["active"] = name
    return model


def disable_adapters(model):
    """Run the frozen base model alone (set_adapter turns an adapter back on)."""
    return put_aside(model)


def delete_adapter(model, name):
    """Remove adapter `name`; its layers go back to being their plain base layers."""
    adapter_named(model, name)
    if active_adapter(model) == name:
        put_aside(model)
    del registry(model)["adapters"][name]
    return model


def add_adapter(model, name, method="lora", **settings):
    """Put the active adapter aside and apply a new one of `method` with `settings` (its apply_*'s arguments, e.g.
    rank=8) as the active adapter `name`. The adapters aside are frozen: training one task cannot change another."""
    if not isinstance(name, str) or not name or "." in name or name in adapter_names(model):
        names = ", ".join(map(repr, adapter_names(model))) or "none"
        raise ValueError(
            f"adapter name must be a new, non-empty string without '.', got {name!r}; the model has {names}"
        )
    previous = active_adapter(model)
    put_aside(model)
    try:
        apply_function(method)(model, **settings)
    except Exception:
        if previous is not None:
            set_adapter(model, previous)
        raise
    reg = registry(model)
    del reg["adapters"][reg["active"]]  # registered as "default" by registry(): give it its name
    reg["adapters"][name], reg["active"] = adapter_layers(model), name
    for other, layers in reg["adapters"].items():
        if other != name:
            for _, wrapper in layers:
                wrapper.requires_grad_(False)
    return model


def adapter_tensors(model, name):
    """{'<layer>.<tensor>': tensor} of adapter `name`, the frozen bases left out; a tensor that several wrappers share
    (prefix tuning's prefix) under the first name it has."""
    tensors, seen = {}, set()
    for layer_name, wrapper in adapter_named(model, name):
        for key, p in wrapper.named_parameters():
            if not key.startswith("base.") and id(p) not in seen:
                tensors[f"{layer_name}.{key}"] = p
                seen.add(id(p))
    return tensors


def kept_trainable_parameters(model):
    """Trainable parameters of no adapter: what apply_*(trainable=...) kept, e.g. a classification head."""
    ids = {id(p) for name in adapter_names(model) for p in adapter_tensors(model, name).values()}
    return {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in ids}


def adapter_size_report(model, adapter_name=None):
    """Bytes of one adapter's tensors (what save_adapter writes, less a small header) next to the bytes of every
    other tensor (what a fully fine-tuned copy would take): LoRA §4.2's "350GB -> 35MB" for GPT-3, at our scale."""
    name = adapter_name or active_adapter(model)
    adapter = {**adapter_tensors(model, name), **kept_trainable_parameters(model)}
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.values())
    ids = {id(t) for t in adapter_tensors(model, name).values()}
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in ids}
    model_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return dict(adapter_bytes=adapter_bytes, model_bytes=model_bytes, ratio=model_bytes / max(adapter_bytes, 1))


# ---------------------------------------------------------------------------------------------- one adapter on disk


def save_adapter(model, directory, adapter_name=None, metadata=None):
    """Write one adapter (default: the active one) and the kept-trainable parameters, nothing of the frozen base, with
    the settings that rebuild it and `metadata` (JSON-able, e.g. the run and base). Returns the weights file's path."""
    from safetensors.torch import save

    name = adapter_name or active_adapter(model)
    if name is None:
        raise ValueError("the model has no active adapter; pass adapter_name= one of its adapters")
    wrapper = adapter_named(model, name)[0][1]
    kept = kept_trainable_parameters(model)
    tensors = {**adapter_tensors(model, name), **kept}
    weights = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    os.makedirs(directory, exist_ok=True)
    weights_path = os.path.join(directory, ADAPTER_WEIGHTS)
    write_bytes_atomic(weights, weights_path)
    config = dict(method=wrapper.method, adapter_name=name, **wrapper.settings, trainable=sorted(kept))
    config |= dict(weights_sha256=hashlib.sha256(weights).hexdigest(), metadata=metadata or {})
    write_json_atomic(config, os.path.join(directory, ADAPTER_CONFIG))
    return weights_path


FIELDS = {  # adapter_config.json's keys beside the apply_* settings -> (check, what it must be)
    "method": (lambda v: v in METHODS, f"one of {', '.join(METHODS)}"),
    "adapter_name": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "trainable": (lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v), "a list of parameter names"),
    "weights_sha256": (lambda v: isinstance(v, str) and len(v) == 64, f"the SHA-256 of {ADAPTER_WEIGHTS} (hex)"),
    "metadata": (lambda v: isinstance(v, dict), "an object"),
}
KINDS = {  # the type of an apply_* default -> (check of a stored setting, what it must be)
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
    tuple: (lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v), "a list of names"),
}


def read_adapter_config(directory):
    """adapter_config.json of a directory save_adapter wrote, checked: every key it writes, each of the right kind,
    no setting its method does not take, a LoRA scaling within bounds. Its keys besides FIELDS are the settings."""
    config, _ = read_saved_pair(directory, ADAPTER_CONFIG, ADAPTER_WEIGHTS, "save_adapter")
    path = os.path.join(directory, ADAPTER_CONFIG)
    if "peft_type" in config:  # peft_format.export_peft's output, or any adapter saved by PEFT
        raise UserError(f"{path} is a PEFT adapter, not one save_adapter wrote: load it with peft_format.import_peft")
    missing = [k for k in FIELDS if k not in config]
    if missing:
        raise UserError(f"{path} lacks {', '.join(map(repr, missing))}: not written by save_adapter; save it again")
    settings = {k: v for k, v in config.items() if k not in FIELDS}
    parameters = inspect.signature(apply_function(config["method"])).parameters if config["method"] in METHODS else {}
    for key, value in config.items():
        default = getattr(parameters.get(key), "default", None)
        valid, description = FIELDS.get(key) or KINDS.get(type(default), (lambda v: True, ""))
        if key not in FIELDS and (key not in parameters or key in ("model", "trainable")):
            raise UserError(f"{path} has setting {key!r}, which {config['method']} adapters do not take (edited?)")
        if not valid(value):
            raise UserError(f"{path}: {key!r} is {json.dumps(value)}, but must be {description}")
    if config["method"] == "lora" and settings["rank"] > 0:  # a rank out of range is apply_lora's to name
        alpha, rank = settings["alpha"], settings["rank"]
        scaling = lora_scaling(alpha, rank, settings["use_rslora"])
        if scaling > MAX_LORA_SCALING:
            raise UserError(
                f"{path}: alpha {alpha:g} with rank {rank} scales the update by {scaling:g}, beyond any "
                f"adapter trained here (at most {MAX_LORA_SCALING:g}); the file is damaged or was edited"
            )
    return config


def load_adapter(model, directory, adapter_name=None):
    """Load an adapter written by save_adapter and make it active. A model without it (e.g. a fresh base) first
    gets it applied as adapter_config.json says; a model that has it gets its weights replaced. The config, the
    weights' checksum, names, shapes and values (finite floats only) are checked before the model changes."""
    config = read_adapter_config(directory)
    settings = {k: v for k, v in config.items() if k not in FIELDS}
    weights_path = os.path.join(directory, ADAPTER_WEIGHTS)
    stored = read_weights_checked(weights_path, config["weights_sha256"], ADAPTER_CONFIG)
    name, previous = adapter_name or config["adapter_name"], active_adapter(model)
    created = name not in adapter_names(model)
    if created:
        try:
            add_adapter(model, name, config["method"], **settings, trainable=config["trainable"])
        except (TypeError, ValueError) as e:  # a setting out of range, e.g. a rank the layers cannot hold
            path = os.path.join(directory, ADAPTER_CONFIG)
            raise UserError(
                f"{path}: its settings do not build a {config['method']} adapter ({first_line(e)})"
            ) from None
    try:
        wrapper = adapter_named(model, name)[0][1]
        if (wrapper.method, wrapper.settings) != (config["method"], settings):
            raise ValueError(
                f"the model's adapter {name!r} differs from {directory}'s: load it under another adapter_name"
            )
        all_parameters = dict(model.named_parameters(remove_duplicate=False))
        missing = [n for n in config["trainable"] if n not in all_parameters]
        if missing:
            raise KeyError(f"the adapter also stores {missing[0]!r}, which this model does not have")
        expected = {**adapter_tensors(model, name), **{n: all_parameters[n] for n in config["trainable"]}}
        check_tensors_match(stored, expected, weights_path)
        with torch.no_grad():
            for k, v in stored.items():
                expected[k].copy_(v)
    except Exception:
        if created:
            delete_adapter(model, name)
            if previous is not None:
                set_adapter(model, previous)
        raise
    return set_adapter(model, name)
