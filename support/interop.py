"""
Interop with Hugging Face: LoRA adapters in PEFT's format, and whole models in transformers' GPT-2 format.

    export_peft(model, dir)        the model's LoRA adapter -> dir/adapter_config.json + dir/adapter_model.safetensors,
                                   loadable with peft.PeftModel.from_pretrained(GPT2LMHeadModel..., dir)
    import_peft(model, dir)        a PEFT LoRA adapter for GPT-2 -> LoRA layers on our model, computing the same function
    export_merged_hf(model, dir)   base + adapter merged -> dir/config.json + dir/model.safetensors (save_hf_checkpoint)
    save_hf_checkpoint(model, dir) a model.GPT in transformers' GPT-2 format (the inverse of GPT.from_pretrained)

`python train.py --adapter RUN_DIR --export_peft OUT_DIR` and `--export_hf OUT_DIR` call the first and the third.

Every export goes through export_folder: it writes only into a new or empty folder, or over an earlier export of the
same kind, which it replaces whole (written beside it, then swapped in by renames: no reader ever sees a mix); it holds
the folder's run lock while it works, so it never writes into a folder a run is using, and never into the folders
given as `protected` (train.py: the run's own folder and its base's).

What PEFT's files say (peft 0.21, LoraConfig and LoraModel): a LoRA layer computes, like ours,

    h = W0 x + b + scaling · B A dropout(x),   scaling = lora_alpha / r   (use_rslora: lora_alpha / sqrt(r))

with lora_A.weight (r, in) and lora_B.weight (out, r) stored under base_model.model.<module name>.lora_A.weight and
.lora_B.weight, DoRA's magnitude under .lora_magnitude_vector. GPT-2's projections are Conv1D modules that keep their
weight as (in, out) (hence fan_in_fan_out = true), but A and B keep nn.Linear's (out, in) orientation all the same.
`rank_pattern` and `alpha_pattern` give r and lora_alpha per module: a pattern key applies to a module whose name
ends with it (after a '.'). Our layers map onto GPT-2's as in ours_to_hf below:

    attn.q_proj, attn.k_proj, attn.v_proj -> attn.c_attn (one Conv1D, output rows q, then k, then v)
    attn.o_proj -> attn.c_proj,   mlp.fc_in -> mlp.c_fc,   mlp.fc_out -> mlp.c_proj
"""

import contextlib
import copy
import hashlib
import json
import math
import os
import re
import shutil

import torch

import torch.nn as nn

from lora import DoRALinear, LoRALinear, dense_weight, lora_scaling
from support.adapters import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MAX_LORA_SCALING, active_adapter, add_adapter,
                              adapter_named, kept_trainable_parameters, read_adapter_weights)
from support.files import (UserError, read_json, read_saved_pair, save_safetensors_atomic, sync_directory,
                           write_bytes_atomic, write_json_atomic)
from support.runs import LOCK_FILE, lock_out_dir, process_is_alive

QKV_SLOT = {"q": 0, "k": 1, "v": 2}  # row block of each projection inside c_attn's 3 n_embd outputs
HF_MODULE = {"o": "attn.c_proj", "mlp_in": "mlp.c_fc", "mlp_out": "mlp.c_proj"}  # besides q, k, v -> attn.c_attn
OUR_TARGETS = {"attn.c_attn": ("q", "k", "v"), "attn.c_proj": ("o",), "mlp.c_fc": ("mlp_in",), "mlp.c_proj": ("mlp_out",)}
OUR_SUFFIX = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj", "mlp_in": "mlp.fc_in", "mlp_out": "mlp.fc_out"}
PEFT_PREFIX = "base_model.model.transformer.h."
PEFT_KEY = re.compile(r"base_model\.model\.transformer\.h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)")
# LoraConfig settings that change what the adapter computes beyond A, B (and DoRA's m); import refuses them.
UNSUPPORTED_PEFT_SETTINGS = ("modules_to_save", "trainable_token_indices", "layer_replication", "target_parameters",
                             "alora_invocation_tokens", "layers_to_transform", "lora_bias", "use_qalora")


WRITTEN_BY = {"hf": "interop.save_hf_checkpoint", "peft": "interop.export_peft"}  # the mark an export of each kind carries
EXPORT_FILES = {"hf": {"config.json", "model.safetensors"}, "peft": {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "base"}}
STAGING = re.compile(r"^\.(.+)\.(export|replaced)-(\d+)\.tmp$")  # export_folder's working folders beside the target


def hf_base_name(init_from):
    """What adapter_config.json's base_model_name_or_path should say for a base loaded with --init_from, or None
    when the base is not an HF model (the tiny base, a checkpoint of train.py)."""
    from model import PRETRAINED

    if init_from in PRETRAINED:
        return f"openai-community/{init_from}"
    if os.path.isfile(os.path.join(init_from, "config.json")) and os.path.isfile(os.path.join(init_from, "model.safetensors")):
        return os.path.abspath(init_from)
    return None


# ---------------------------------------------------------------------------------------------- export folders


def export_mark(directory, kind):
    """The mark export_folder's writers leave in an export of `kind` ("hf": config.json's "nanoqlora", "peft": the
    weights' safetensors header), or None: no export of ours."""
    try:
        if kind == "hf":
            mark = read_json(os.path.join(directory, "config.json")).get("nanoqlora")
            return mark.get("written_by") if isinstance(mark, dict) else None
        from safetensors import safe_open

        with safe_open(os.path.join(directory, ADAPTER_WEIGHTS), framework="pt") as f:
            return (f.metadata() or {}).get("written_by")
    except Exception:  # missing, unreadable or foreign: not an export of ours
        return None


@contextlib.contextmanager
def export_folder(directory, kind, protected=()):
    """Where an export of `kind` ("hf" or "peft") is written: yields a new folder beside `directory` to write it into;
    when the block ends without error, that folder replaces `directory` (two renames: whoever reads `directory` sees
    the old export or the new one, never a mix), and otherwise it is removed and `directory` left as it was.

    Refused: a `directory` that is one of `protected` ((what, path) pairs: the run's own folder, the base's), one that
    holds anything but an earlier export of the same kind, and one whose run lock another process holds (a run that
    trains there, another export); the lock is held throughout."""
    directory = os.path.abspath(directory)
    for what, path in protected:
        if path and os.path.exists(path) and os.path.realpath(path) == os.path.realpath(directory):
            raise UserError(f"{directory} is {what}: an export never writes into it; give the export a new folder")
    parent, name = os.path.split(directory)
    remove_stale_export_folders(parent, name)
    with lock_out_dir(directory):
        contents = sorted(set(os.listdir(directory)) - {LOCK_FILE})
        if contents and not (set(contents) <= EXPORT_FILES[kind] and export_mark(directory, kind) == WRITTEN_BY[kind]):
            raise UserError(f"{directory} holds {', '.join(contents[:3])}{' ...' if len(contents) > 3 else ''}, which is not an "
                            f"earlier export of this kind ({WRITTEN_BY[kind]}): an export writes only into a new or empty folder, or "
                            f"over an earlier export of its kind; choose another folder")
        staging = os.path.join(parent, f".{name}.export-{os.getpid()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        try:
            yield staging
            for root, _, _ in os.walk(staging):  # atomic_write synced each file; the folders' entries too
                sync_directory(root)
            replaced = os.path.join(parent, f".{name}.replaced-{os.getpid()}.tmp")
            os.rename(directory, replaced)
            try:
                os.rename(staging, directory)
            except OSError:
                os.rename(replaced, directory)
                raise
            sync_directory(parent)
            shutil.rmtree(replaced, ignore_errors=True)  # the earlier export (or the empty folder), its lock file with it
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def remove_stale_export_folders(parent, name):
    """The working folders of an export of `name` that was killed (its process is gone)."""
    if not os.path.isdir(parent):
        return
    for entry in os.listdir(parent):
        match = STAGING.match(entry)
        if match and match[1] == name and not process_is_alive(int(match[3])):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


# ---------------------------------------------------------------------------------------------- export


def export_peft(model, directory, base_model_name_or_path=None, adapter_name=None, metadata=None, base_model=None, protected=()):
    """Write the adapter `adapter_name` (default: the active one) of a GPT with LoRA (or QLoRA) in PEFT's layout.
    `metadata` (a JSON-able dict, e.g. what train.py records in its adapter_config.json: run id, base, prompt
    template) goes into the safetensors header under "nanoqlora", not into adapter_config.json, whose keys PEFT
    reads as LoraConfig fields (an unknown key there makes PEFT warn that it is too old).

    Adapters on o, mlp_in and mlp_out map one to one onto attn.c_proj, mlp.c_fc and mlp.c_proj. q, k and v are the
    interesting part: ours has a separate (A_q, B_q), (A_k, B_k), (A_v, B_v) of rank r each, PEFT has one (A, B) for
    the fused c_attn, whose weight update must be the three updates stacked by rows:

        ΔW_c_attn = [ΔW_q; ΔW_k; ΔW_v] = s · [B_q A_q; B_k A_k; B_v A_v]          (3 n_embd x n_embd)

    With the n of q, k, v that have adapters, stacking their A's by rows and placing their B's block-diagonally

        A = [A_q; A_v]  (n r x n_embd)        B = [[B_q, 0], [0, 0], [0, B_v]]  (3 n_embd x n r)    (here n = 2: q, v)

    gives B A = [B_q A_q; 0; B_v A_v] exactly: each row block of B reads only its own rows of A. (A projection without
    an adapter gets a zero row block.) The rank of the fused pair is n r, so PEFT's scaling alpha' / (n r) must equal
    ours, alpha / r: alpha' = n alpha (rsLoRA: alpha' / sqrt(n r) = alpha / sqrt(r), so alpha' = sqrt(n) alpha).
    `rank_pattern` and `alpha_pattern` set c_attn's r and lora_alpha apart from the other modules'. The function is
    the same, so the logits are; training it further in PEFT is not quite the same as here, since the zero blocks of
    B are free to fill in (coupling q's and v's subspaces) and dropout draws one mask for c_attn instead of one per
    projection.

    DoRA: PEFT keeps one magnitude per output row of c_attn, and ours one per output row of q, k, v: concatenated,
    they are the same vector. A projection without an adapter gets m = ||W0 row|| (its update is zero), so its scale
    m / ||W0 + 0|| is 1 and its output unchanged, up to float rounding. For a QLoRA adapter those norms are of the
    dequantized 4-bit base, which PEFT sees when it loads the base in 4 bits with bitsandbytes (whose NF4 codes are
    bit-identical to ours, see quantize.py); on an fp32 base they are off by the quantization error.

    `base_model`: a model.GPT written in HF's format to directory/base, named in base_model_name_or_path (for a base
    that is not an HF model, such as the tiny base). The folder is written through export_folder (`protected`: see
    there). adapter_config.json is written first and the weights' header records its SHA-256, so import_peft refuses
    a pair from two different exports.

    Errors: an adapter with kept-trainable parameters besides LoRA (a classification head: GPT2LMHeadModel has no
    place for it), a model without biases or with smeared keys (not a GPT-2). Returns the weights file's path."""
    name = adapter_name or active_adapter(model)
    if base_model is not None:
        base_model_name_or_path = os.path.join(os.path.abspath(directory), "base")
    wrappers = dict(adapter_named(model, name))  # layer name -> its LoRALinear, whether the adapter is active or aside
    config, kept = next(iter(wrappers.values())).settings, sorted(kept_trainable_parameters(model))
    if any(not isinstance(w, LoRALinear) for w in wrappers.values()):
        raise ValueError(f"adapter {name!r} is not a LoRA adapter; PEFT export writes LoRA adapters")
    if kept:
        raise ValueError(
            f"adapter {name!r} also trains {kept[0]!r} (apply_lora(trainable=...)), which PEFT's GPT2LMHeadModel "
            "adapter cannot hold; export a LoRA-only adapter, or save the whole model with interop.save_hf_checkpoint after merging"
        )
    if not model.config.bias:
        raise ValueError("the model has no biases, so it is not a GPT-2 that transformers' GPT2LMHeadModel can load; PEFT export needs a GPT-2-family base")
    if model.config.smear_keys:
        raise ValueError("the model has smeared keys, which transformers' GPT2LMHeadModel does not have; PEFT export needs a base "
                         "pretrained with --no-smear_keys")
    rank, alpha, use_rslora, use_dora = config["rank"], config["alpha"], config["use_rslora"], config["use_dora"]
    fused = [t for t in ("q", "k", "v") if t in config["targets"]]
    n_embd = model.config.n_embd
    tensors = {}
    for i, block in enumerate(model.transformer.h):
        modules = {t: wrappers.get(f"transformer.h.{i}.{s}") or model.get_submodule(f"transformer.h.{i}.{s}")
                   for t, s in OUR_SUFFIX.items()}
        prefix = f"{PEFT_PREFIX}{i}."
        if fused:
            ref = modules[fused[0]].lora_A.weight
            A = torch.cat([modules[t].lora_A.weight for t in fused], dim=0)
            B = ref.new_zeros(3 * n_embd, len(fused) * rank)
            for j, t in enumerate(fused):
                rows = slice(QKV_SLOT[t] * n_embd, (QKV_SLOT[t] + 1) * n_embd)
                B[rows, j * rank : (j + 1) * rank] = modules[t].lora_B.weight
            tensors[prefix + "attn.c_attn.lora_A.weight"], tensors[prefix + "attn.c_attn.lora_B.weight"] = A, B
            if use_dora:
                tensors[prefix + "attn.c_attn.lora_magnitude_vector"] = torch.cat([dora_magnitude(modules[t]) for t in ("q", "k", "v")])
        for t, hf in HF_MODULE.items():
            if t in config["targets"]:
                layer = modules[t]
                tensors[prefix + hf + ".lora_A.weight"], tensors[prefix + hf + ".lora_B.weight"] = layer.lora_A.weight, layer.lora_B.weight
                if use_dora:
                    tensors[prefix + hf + ".lora_magnitude_vector"] = layer.lora_magnitude
    target_modules = (["attn.c_attn"] if fused else []) + [HF_MODULE[t] for t in HF_MODULE if t in config["targets"]]
    rank_pattern, alpha_pattern = {}, {}
    if len(fused) > 1:
        rank_pattern["attn.c_attn"] = len(fused) * rank
        alpha_pattern["attn.c_attn"] = alpha * (math.sqrt(len(fused)) if use_rslora else len(fused))
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "target_modules": target_modules, "fan_in_fan_out": True, "lora_dropout": config["dropout"], "bias": "none",
        "use_rslora": use_rslora, "use_dora": use_dora, "modules_to_save": None, "init_lora_weights": True,
        "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
    }
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    config_bytes = json.dumps(peft_config, indent=2).encode()
    header = {"format": "pt", "written_by": WRITTEN_BY["peft"], "adapter_config_sha256": hashlib.sha256(config_bytes).hexdigest(),
              **({"nanoqlora": json.dumps(metadata, allow_nan=False)} if metadata else {})}
    with export_folder(directory, "peft", protected) as staging:
        if base_model is not None:
            write_hf_checkpoint(base_model, os.path.join(staging, "base"))
        write_bytes_atomic(config_bytes, os.path.join(staging, ADAPTER_CONFIG))
        save_safetensors_atomic(tensors, os.path.join(staging, ADAPTER_WEIGHTS), metadata=header)
    return os.path.join(os.path.abspath(directory), ADAPTER_WEIGHTS)


def dora_magnitude(layer):
    """DoRA's m of a (possibly un-adapted) q/k/v projection: the trained m, or the row norms of W0 where the
    projection has no adapter (m / ||W0|| = 1 leaves it unchanged)."""
    if isinstance(layer, DoRALinear):
        return layer.lora_magnitude
    base = layer.base if isinstance(layer, LoRALinear) else layer
    return torch.linalg.norm(dense_weight(base).float(), dim=1)


# ---------------------------------------------------------------------------------------------- import


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


PEFT_SETTING_TYPES = {  # LoraConfig key -> (check, what it must be), for the keys import_peft reads
    "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
    "lora_alpha": (lambda v: is_number(v) and v > 0, "a positive number"),
    "lora_dropout": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "rank_pattern": (lambda v: isinstance(v, dict) and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v.values()),
                     "an object of module patterns -> positive integers"),
    "alpha_pattern": (lambda v: isinstance(v, dict) and all(is_number(x) and x > 0 for x in v.values()),
                      "an object of module patterns -> positive numbers"),
}


def read_peft_adapter(directory):
    """(adapter_config.json as a dict, {tensor name: tensor}) of a PEFT adapter directory, checked: every setting
    import_peft reads has its type (a string lora_alpha, a pattern that is no regular expression are named), and the
    tensors are read as every adapter's are (adapters.read_adapter_weights: finite floats; an export of ours
    also records the checksum of the config beside it, which must match)."""
    config, weights_path = read_saved_pair(directory, ADAPTER_CONFIG, ADAPTER_WEIGHTS, "PEFT's save_pretrained")
    paths = [os.path.join(directory, ADAPTER_CONFIG), weights_path]
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{paths[0]}: peft_type is {config.get('peft_type')!r}; only LoRA adapters (peft_type 'LORA') can be imported")
    for key in UNSUPPORTED_PEFT_SETTINGS:
        if config.get(key) not in (None, False, [], {}):
            raise ValueError(f"{paths[0]} sets {key}={config[key]!r}, which our LoRA layers cannot express; only A, B (and DoRA's magnitude) import")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{paths[0]} trains biases (bias={config['bias']!r}); our LoRA keeps the base biases frozen, so only bias='none' imports")
    if "lora_alpha" not in config:
        raise UserError(f"{paths[0]} has no lora_alpha: it is not a complete LoraConfig")
    for key, (valid, description) in PEFT_SETTING_TYPES.items():
        if config.get(key) is not None and not valid(config[key]):
            raise UserError(f"{paths[0]}: {key!r} is {json.dumps(config[key])}, but must be {description}")
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern in config.get(key) or {}:
            try:
                re.compile(pattern)
            except re.error as e:
                raise UserError(f"{paths[0]}: {key} key {pattern!r} is not a regular expression ({e}); PEFT matches module names with it") from None
    with open(paths[0], "rb") as f:
        config_sha256 = hashlib.sha256(f.read()).hexdigest()
    recorded = export_header(weights_path).get("adapter_config_sha256")
    if recorded is not None and recorded != config_sha256:
        raise UserError(f"{paths[0]} is not the config {weights_path} was exported with (its checksum differs: files of two "
                        f"exports); export the adapter again")
    return config, read_adapter_weights(weights_path, None, ADAPTER_CONFIG, fix="export or save the adapter again")


def export_header(weights_path):
    """The metadata of a safetensors file's header ({} when it has none or cannot be read: read_adapter_weights names
    an unreadable file)."""
    from safetensors import safe_open

    try:
        with safe_open(weights_path, framework="pt") as f:
            return f.metadata() or {}
    except Exception:
        return {}


def pattern_value(patterns, module_name, default):
    """PEFT's per-module override: the value of the first pattern key that the module name ends with (after a '.')."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def import_peft(model, directory, adapter_name="default"):
    """Put a PEFT LoRA adapter for GPT-2 (a directory with adapter_config.json + adapter_model.safetensors) onto our
    GPT as LoRA layers named `adapter_name`, active, computing what PeftModel computes on the same base.

    c_attn's (A, B) of rank R becomes three adapters of rank R that share A: q gets (A, B[:n_embd]), k gets
    (A, B[n_embd:2 n_embd]), v gets (A, B[2 n_embd:]), so ΔW_q = s B_q A is exactly c_attn's first row block, and so on
    (this needs rank R on each of q, k, v, 3x the parameters of the fused pair, but no approximation). DoRA's fused
    magnitude splits into q's, k's and v's rows the same way. Our apply_lora uses one rank and one alpha for every
    layer; where PEFT's rank_pattern or alpha_pattern make modules differ, smaller ranks are padded with zero rows of A
    and zero columns of B (BA unchanged) and B is multiplied by (PEFT's scaling / ours), which changes the update only
    by float rounding. Without patterns the weights are copied bit for bit. Returns the model."""
    config, stored = read_peft_adapter(directory)
    n_layer, n_embd = model.config.n_layer, model.config.n_embd
    modules = {}  # (layer, hf module) -> {"lora_A.weight": A, "lora_B.weight": B, "lora_magnitude_vector": m}
    for key, tensor in stored.items():
        match = PEFT_KEY.fullmatch(key)
        if not match:
            raise ValueError(f"{directory}: tensor {key!r} is not a LoRA tensor of a GPT-2 block's c_attn, attn.c_proj, mlp.c_fc or mlp.c_proj; our model has no counterpart for it")
        layer, module, part = int(match[1]), match[2], match[3]
        if layer >= n_layer:
            raise ValueError(f"{directory}: tensor {key!r} is for block {layer}, but the model has {n_layer} blocks; is it for another base?")
        modules.setdefault((layer, module), {})[part] = tensor
    hf_modules = sorted({m for _, m in modules})
    if not hf_modules:
        raise ValueError(f"{directory}: no LoRA tensors found")
    for layer in range(n_layer):
        for module in hf_modules:
            if (layer, module) not in modules:
                raise ValueError(f"{directory} adapts {module} in some blocks but not in block {layer}; our apply_lora adapts a target in every block")
    use_dora, use_rslora = bool(config.get("use_dora")), bool(config.get("use_rslora"))
    for (layer, module), parts in modules.items():
        wanted = ("lora_A.weight", "lora_B.weight") + (("lora_magnitude_vector",) if use_dora else ())
        if sorted(parts) != sorted(wanted):
            raise ValueError(f"{directory}: block {layer} {module} has {sorted(parts)}, expected {list(wanted)} (use_dora={use_dora})")
        out_features = 3 * n_embd if module == "attn.c_attn" else 4 * n_embd if module == "mlp.c_fc" else n_embd
        in_features = 4 * n_embd if module == "mlp.c_proj" else n_embd
        A, B = parts["lora_A.weight"], parts["lora_B.weight"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != in_features or B.shape[0] != out_features or B.shape[1] != A.shape[0]:
            raise ValueError(f"{directory}: block {layer} {module} has A {tuple(A.shape)} and B {tuple(B.shape)}, but this model needs "
                             f"A (r, {in_features}) and B ({out_features}, r): is it for a GPT-2 of another width?")

    rank = max(parts["lora_A.weight"].shape[0] for parts in modules.values())
    alpha = config["lora_alpha"]
    ours = lora_scaling(alpha, rank, use_rslora)
    for (layer, module), parts in modules.items():  # each module's scaling as PEFT computes it, within what we load
        theirs = lora_scaling(pattern_value(config.get("alpha_pattern") or {}, f"transformer.h.{layer}.{module}", alpha),
                              parts["lora_A.weight"].shape[0], use_rslora)
        if theirs > MAX_LORA_SCALING:
            raise UserError(f"{directory}: block {layer} {module}'s lora_alpha and rank scale its update by {theirs:g}, beyond any "
                            f"adapter trained here (at most {MAX_LORA_SCALING:g}); the file is damaged or was edited")
    targets = [t for module in hf_modules for t in OUR_TARGETS[module]]
    add_adapter(model, adapter_name, "lora", rank=rank, alpha=alpha, targets=targets,
                dropout=config.get("lora_dropout", 0.0), use_rslora=use_rslora, use_dora=use_dora)
    alpha_pattern = config.get("alpha_pattern") or {}
    with torch.no_grad():
        for (layer, module), parts in modules.items():
            A, B = parts["lora_A.weight"], parts["lora_B.weight"]
            r = A.shape[0]
            full_name = f"transformer.h.{layer}.{module}"  # the module's name inside GPT2LMHeadModel, what PEFT's patterns match
            theirs = lora_scaling(pattern_value(alpha_pattern, full_name, alpha), r, use_rslora)
            if theirs != ours:
                B = B * (theirs / ours)
            for t in OUR_TARGETS[module]:
                target = model.get_submodule(f"transformer.h.{layer}.{OUR_SUFFIX[t]}")
                rows = slice(QKV_SLOT[t] * n_embd, (QKV_SLOT[t] + 1) * n_embd) if module == "attn.c_attn" else slice(None)
                target.lora_A.weight.zero_()[:r].copy_(A)
                target.lora_B.weight.zero_()[:, :r].copy_(B[rows])
                if use_dora:
                    target.lora_magnitude.copy_(parts["lora_magnitude_vector"][rows])
    return model


# ---------------------------------------------------------------------------------------------- merged HF export


def export_merged_hf(model, directory, protected=()):
    """Write the model with its active adapter merged (W0 + ΔW; DoRA's rescaled rows) as an HF GPT-2 directory. A
    QLoRA model is merged into a dequantized copy (lora.merge_lora_into_dequantized: re-quantizing would round
    the update away). The model passed in is not changed. Returns the weights file's path."""
    from lora import lora_layers, merge_lora
    from quantize import Linear4bit, dequantize_model, merge_lora_into_dequantized

    quantized = any(isinstance(m, Linear4bit) for m in model.modules())
    if lora_layers(model):
        merged = merge_lora_into_dequantized(model) if quantized else merge_lora(copy.deepcopy(model), unload=True)
    else:
        merged = dequantize_model(copy.deepcopy(model)) if quantized else model
    return save_hf_checkpoint(merged, directory, protected)


# ---------------------------------------------------------------------------------------------- whole models


HF_TOKENIZER = {50257: "gpt2", 257: "bytes"}  # vocabulary size -> the tokenizer of the models here that have it
PROJECTIONS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.fc_in", "mlp.fc_out")
HF_NAMES = {"attn.o_proj": "attn.c_proj", "mlp.fc_in": "mlp.c_fc", "mlp.fc_out": "mlp.c_proj"}  # besides q, k, v -> c_attn


def ours_to_hf(sd, n_layer):
    """GPT's state dict -> HF GPT-2's names: q, k, v stacked into c_attn (rows q, then k, then v, the order hf_to_ours
    splits), every projection transposed to Conv1D's (in, out), lm_head left out (HF ties it to wte as we do)."""
    hf = {f"transformer.{k}": sd[f"transformer.{k}"] for k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
    for i in range(n_layer):
        h, ours = f"transformer.h.{i}.", f"transformer.h.{i}."
        for ln in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"):
            hf[h + ln] = sd[ours + ln]
        hf[h + "attn.c_attn.weight"] = torch.cat([sd[ours + f"attn.{p}_proj.weight"] for p in "qkv"], dim=0).t()
        hf[h + "attn.c_attn.bias"] = torch.cat([sd[ours + f"attn.{p}_proj.bias"] for p in "qkv"])
        for name, hf_name in HF_NAMES.items():
            hf[h + hf_name + ".weight"] = sd[ours + name + ".weight"].t()
            hf[h + hf_name + ".bias"] = sd[ours + name + ".bias"]
    return hf


def save_hf_checkpoint(model, directory, protected=()):
    """Write a model.GPT as a Hugging Face GPT-2 checkpoint: config.json + model.safetensors with HF's names and
    Conv1D layout (the inverse of hf_to_ours), so transformers.GPT2LMHeadModel.from_pretrained(directory) and
    GPT.from_pretrained(directory) both load it. Works for GPT-2 sizes and for the byte-level models here
    (vocab 257); the end-of-text token is the last id in both vocabularies. A model with LoRA layers or 4-bit
    weights must be merged into plain nn.Linear layers first. config.json names the tokenizer (under "nanoqlora":
    "bytes" for the byte-level models, "gpt2" for GPT-2's BPE), which support.checkpoints.load_base_model honours. The
    folder is written through export_folder (`protected`: see there). Returns the weights file's path."""
    with export_folder(directory, "hf", protected) as staging:
        write_hf_checkpoint(model, staging)
    return os.path.join(os.path.abspath(directory), "model.safetensors")


def write_hf_checkpoint(model, directory):
    """save_hf_checkpoint's files, written into `directory` as it is (export_folder's staging folder)."""
    if not model.config.bias:
        raise ValueError("HF's GPT-2 has a bias in every Linear and LayerNorm; a model built with bias=False cannot be saved in its format")
    if model.config.smear_keys:
        raise ValueError("HF's GPT-2 has no smeared keys (smear_keys=True); this model cannot be saved in its format")
    for name, module in model.named_modules():
        if name.endswith(PROJECTIONS) and type(module) is not nn.Linear:
            raise ValueError(
                f"{name} is a {type(module).__name__}, not a plain nn.Linear: merge first, with lora.merge_lora(model, unload=True) "
                f"for LoRA or quantize.merge_lora_into_dequantized(model) for QLoRA (train.py --export_hf does this)"
            )
    c = model.config
    hf_config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size, "n_positions": c.block_size,
        "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None, "activation_function": "gelu_new",
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout, "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": c.vocab_size - 1, "eos_token_id": c.vocab_size - 1,  # <|endoftext|>: 50256 for GPT-2's BPE, 256 for bytes
        "dtype": str(model.transformer.wte.weight.dtype).removeprefix("torch."),
        "nanoqlora": {"written_by": WRITTEN_BY["hf"], **({"tokenizer": HF_TOKENIZER[c.vocab_size]} if c.vocab_size in HF_TOKENIZER else {})},
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in ours_to_hf(model.state_dict(), c.n_layer).items()}
    os.makedirs(directory, exist_ok=True)
    write_json_atomic(hf_config, os.path.join(directory, "config.json"))
    weights_path = os.path.join(directory, "model.safetensors")
    save_safetensors_atomic(tensors, weights_path, metadata={"format": "pt"})
    return weights_path
