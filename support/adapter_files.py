"""
LoRA adapters on disk: lora.save_adapter and lora.load_adapter write and read them through this module.

A directory holds two files: adapter_model.safetensors (A, B, DoRA's magnitudes and the kept-trainable parameters
such as a classification head, keyed by layer name without the adapter's name, so it loads under any name) and
adapter_config.json (the hyperparameters that rebuild the adapter with lora.apply_lora, the SHA-256 of the weights
file, and a metadata object, e.g. the run and base a training run saved it from). The two cannot be renamed into
place at once, so the config is written last: it is the manifest of the pair, and a weights file that does not
match it (a crash between the two renames, a file copied in by hand) is refused.
"""

import hashlib
import json
import math
import os

import torch

from lora import (TARGETS, active_adapter_name, adapter_names, adapter_tensors, apply_lora, delete_adapter,
                  kept_trainable_parameters, lora_layers, set_adapter)
from support.common import write_bytes_atomic, write_json_atomic
from support.safety import UserError, check_tensors_match, first_line, read_json

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
# The largest alpha / r (rsLoRA: alpha / sqrt(r)) an adapter may have: the usual 2 x rank gives 2, rsLoRA at rank 256
# about 32. A scaling beyond this is a damaged or hand-edited file (alpha 1e30 makes every answer blank), or a setting
# that could not train (config_checks refuses it before a run starts).
MAX_LORA_SCALING = 1000.0


def lora_scaling(alpha, rank, use_rslora):
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def adapter_config(model, name):
    """The hyperparameters to rebuild adapter `name` with apply_lora: rank, alpha, dropout, use_rslora,
    use_dora, targets, and the names of kept-trainable parameters."""
    layers = [(layer_name, layer) for layer_name, layer in lora_layers(model) if name in layer.lora_A]
    if not layers:
        raise ValueError(f"no adapter named {name!r}; the model has {', '.join(map(repr, adapter_names(model))) or 'none'}")
    targets = []
    for layer_name, layer in layers:
        short = [t for t, suffix in TARGETS.items() if layer_name == suffix or layer_name.endswith("." + suffix)]
        if not short:
            raise ValueError(f"{layer_name} is not one of apply_lora's targets ({', '.join(TARGETS.values())}); save_adapter cannot describe it")
        if layer.config[name] != layers[0][1].config[name]:
            raise ValueError(f"adapter {name!r} has different hyperparameters in {layer_name} and {layers[0][0]}")
        targets += short
    targets = [t for t in TARGETS if t in targets]
    return dict(adapter_name=name, **layers[0][1].config[name], targets=targets, trainable=sorted(kept_trainable_parameters(model)))


def save_lora_adapter(model, directory, adapter_name=None, metadata=None):
    """Write one adapter (default: the active one) to directory/adapter_model.safetensors, with its
    hyperparameters in directory/adapter_config.json. The file holds A, B (and DoRA's m) of every adapted
    layer plus the kept-trainable parameters (e.g. a classification head): everything fine-tuning changed,
    nothing of the frozen base. `metadata` (a JSON-able dict, e.g. the run id and base of a training run) is
    stored in the config as is. Returns the weights file's path.

    The two files cannot be renamed into place at once, so the config is written last and records the SHA-256
    of the weights: it is the manifest of the pair. A crash between the two renames leaves an old config beside
    new weights, which load_adapter then refuses instead of loading a mix of two saves."""
    from safetensors.torch import save

    adapter_name = adapter_name or active_adapter_name(model)
    config = adapter_config(model, adapter_name)
    tensors = {**adapter_tensors(model, adapter_name), **kept_trainable_parameters(model)}
    weights = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})  # bytes: we create the file, so it
    os.makedirs(directory, exist_ok=True)                                          # gets the usual permissions (0644)
    weights_path = os.path.join(directory, ADAPTER_WEIGHTS)
    write_bytes_atomic(weights, weights_path)
    config.update(weights_sha256=hashlib.sha256(weights).hexdigest(), metadata=metadata or {})
    write_json_atomic(config, os.path.join(directory, ADAPTER_CONFIG))
    return weights_path


ADAPTER_CONFIG_TYPES = {  # key -> (check, what it must be)
    "adapter_name": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "rank": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
    "alpha": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0, "a positive number"),
    "dropout": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1, "a number in [0, 1)"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "targets": (lambda v: isinstance(v, list) and v and all(isinstance(t, str) for t in v), f"a list of target names ({', '.join(TARGETS)})"),
    "trainable": (lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v), "a list of parameter names"),
    "weights_sha256": (lambda v: isinstance(v, str) and len(v) == 64, f"the SHA-256 of {ADAPTER_WEIGHTS} (hex)"),
    "metadata": (lambda v: isinstance(v, dict), "an object"),
}


def read_adapter_config(directory):
    """adapter_config.json of an adapter directory, every field checked; -> dict."""
    path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; save_adapter writes {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} into a directory")
    config = read_json(path, what="adapter config written by save_adapter")
    if "peft_type" in config:  # interop.export_peft's output, or any adapter saved by PEFT
        raise UserError(f"{path} is a PEFT adapter (peft_type {config['peft_type']!r}), not an adapter config written by save_adapter: "
                        f"put it onto a model with interop.import_peft (save_adapter then writes it in this repository's format)")
    missing = [k for k in ADAPTER_CONFIG_TYPES if k not in config]
    if missing == ["weights_sha256", "metadata"]:
        raise UserError(f"{path} records no checksum of its weights (written by an older version of save_adapter); "
                        f"save the adapter again, or train it again")
    if missing:
        raise UserError(f"{path} lacks {', '.join(map(repr, missing))}: it is not an adapter config written by save_adapter")
    for key, (valid, description) in ADAPTER_CONFIG_TYPES.items():
        if not valid(config[key]):
            raise UserError(f"{path}: {key!r} is {json.dumps(config[key])}, but must be {description}")
    check_scaling(config["alpha"], config["rank"], config["use_rslora"], path)
    return config


def check_scaling(alpha, rank, use_rslora, source):
    """alpha / r (or / sqrt(r)) of a stored adapter at most MAX_LORA_SCALING."""
    scaling = lora_scaling(alpha, rank, use_rslora)
    if scaling > MAX_LORA_SCALING:
        raise UserError(f"{source}: alpha {alpha:g} with rank {rank} scales the update by {scaling:g}, beyond any adapter trained "
                        f"here (at most {MAX_LORA_SCALING:g}); the file is damaged or was edited: save or train the adapter again")


def read_adapter_weights(weights_path, sha256, manifest, fix="save or train the adapter again"):
    """The tensors of an adapter's safetensors file, checked: its SHA-256 is `sha256`, the one its manifest (the config
    file written after it) recorded (None: the format has no manifest, e.g. an adapter PEFT saved); it reads; every
    tensor is floating point and finite. Every adapter kind loads through this: LoRA (lora.load_adapter), the other
    methods (adapters.load_adapter) and PEFT's (interop.import_peft)."""
    from safetensors.torch import load

    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"{weights_path} not found; an adapter directory holds {manifest} and {os.path.basename(weights_path)}")
    with open(weights_path, "rb") as f:
        weights = f.read()
    if sha256 is not None and hashlib.sha256(weights).hexdigest() != sha256:
        raise UserError(f"{weights_path} is not the file {manifest} beside it was saved with (its checksum differs: the two "
                        f"come from different saves, e.g. a run killed between writing them, or a file copied in by hand); {fix}")
    try:
        stored = load(weights)
    except Exception as e:  # safetensors raises its own error type for a corrupt header or data
        raise UserError(f"{weights_path} is not a readable safetensors file ({first_line(e)}); {fix}") from None
    for k, v in stored.items():
        if not v.is_floating_point():
            raise UserError(f"{weights_path}: tensor {k!r} is {v.dtype}, but adapter weights are floating point; {fix}")
        if not torch.isfinite(v).all():
            raise UserError(f"{weights_path}: tensor {k!r} holds NaN or infinite values; the training that saved it diverged: "
                            f"train again (e.g. with a lower learning rate)")
    return stored


def copy_stored_tensors(stored, model, adapter, kept, path):
    """Copy the tensors of a saved adapter, read from `path`, into the model: into `adapter` (name -> the model's
    tensor of that adapter) and into the kept-trainable parameters named in `kept` (e.g. a classification head),
    after checking that both sides hold the same names and every shape agrees (the first difference is named).
    Shared with adapters.load_adapter."""
    all_parameters = dict(model.named_parameters(remove_duplicate=False))
    missing_kept = [n for n in kept if n not in all_parameters]
    if missing_kept:
        raise KeyError(f"the adapter also stores {missing_kept[0]!r}, which this model does not have")
    expected = {**adapter, **{n: all_parameters[n] for n in kept}}
    check_tensors_match(stored, expected, path)
    with torch.no_grad():
        for k, v in stored.items():
            expected[k].copy_(v)


def load_lora_adapter(model, directory, adapter_name=None):
    """Load an adapter written by save_adapter and make it active. A model without that adapter (e.g. a
    fresh base model) first gets LoRA applied as adapter_config.json describes; a model that has it gets
    its weights replaced. The config's fields, the weights' checksum, names, shapes, dtypes and values
    (finite floats only) are checked against the files."""
    config = read_adapter_config(directory)
    weights_path = os.path.join(directory, ADAPTER_WEIGHTS)
    stored = read_adapter_weights(weights_path, config["weights_sha256"], ADAPTER_CONFIG)
    paths = [os.path.join(directory, ADAPTER_CONFIG), weights_path]
    hyperparameters = {k: config[k] for k in ("rank", "alpha", "dropout", "use_rslora", "use_dora")}
    name = adapter_name or config["adapter_name"]
    created = name not in adapter_names(model)
    if created:
        apply_lora(model, **hyperparameters, targets=config["targets"], trainable=config["trainable"], adapter_name=name)
    try:
        ours = adapter_config(model, name)
        ours = {k: ours[k] for k in ("targets", *hyperparameters)}
        theirs = {k: config[k] for k in ours}
        if ours != theirs:
            raise ValueError(f"the model's adapter {name!r} has {ours} but {directory} holds {theirs}; load it under another adapter_name")
        copy_stored_tensors(stored, model, adapter_tensors(model, name), config["trainable"], paths[1])
    except Exception:
        if created:
            delete_adapter(model, name)
        raise
    return set_adapter(model, name)
