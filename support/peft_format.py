"""LoRA adapters in PEFT's format (peft.PeftModel on transformers' GPT2LMHeadModel), written and read so that both
compute the same function. PEFT's layer is ours, h = W0 x + b + scaling · B A dropout(x), with A and B stored under
base_model.model.<GPT-2 module>.lora_A/B.weight; rank_pattern and alpha_pattern override r and lora_alpha for the
modules whose names end with a pattern."""

import hashlib
import json
import math
import os
import re

import torch

from lora import TARGETS, DoRALinear, LoRALinear, dense_weight, lora_scaling
from support import adapters
from support.files import (
    UserError,
    file_sha256,
    read_saved_pair,
    read_weights_checked,
    save_safetensors_atomic,
    write_bytes_atomic,
)
from support.hf_format import HF_MODULE, WRITTEN_BY, export_folder, safetensors_header, write_hf_checkpoint

PEFT_PREFIX = "base_model.model.transformer.h."
GPT2_MODULES = tuple(dict.fromkeys(HF_MODULE.values()))  # attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
PARTS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
PEFT_KEY = re.compile(
    rf"{re.escape(PEFT_PREFIX)}(\d+)\.({'|'.join(map(re.escape, GPT2_MODULES))})\.({'|'.join(map(re.escape, PARTS))})"
)
# LoraConfig settings that change what the adapter computes beyond A, B (and DoRA's m); import refuses them.
UNSUPPORTED_PEFT_SETTINGS = (
    "modules_to_save trainable_token_indices layer_replication target_parameters alora_invocation_tokens "
    "layers_to_transform lora_bias use_qalora"
).split()


def qkv_rows(t, n_embd):
    """The rows of c_attn's 3 n_embd outputs that projection t ("q", "k" or "v") holds."""
    return slice("qkv".index(t) * n_embd, ("qkv".index(t) + 1) * n_embd)


def export_peft(
    model, directory, base_model_name_or_path=None, adapter_name=None, metadata=None, base_model=None, protected=()
):
    """Write the adapter `adapter_name` (default: the active one) of a GPT with LoRA (or QLoRA) in PEFT's layout.
    `metadata` goes into the safetensors header (PEFT reads adapter_config.json's keys as LoraConfig fields); the
    header also records the config's SHA-256, so import_peft refuses a pair from two exports. `base_model`: written
    in HF's format to directory/base, for a base that is not an HF model. Returns the weights file's path.

    o, mlp_in and mlp_out map one to one. q, k and v are ours apart but one fused c_attn in GPT-2, whose update must
    be the three stacked by rows: ΔW_c_attn = s · [B_q A_q; B_k A_k; B_v A_v]. Stacking the A's of the n adapted
    projections by rows and placing their B's block-diagonally, A = [A_q; A_v] (n r x n_embd) and
    B = [[B_q, 0], [0, 0], [0, B_v]] (3 n_embd x n r), gives B A = [B_q A_q; 0; B_v A_v] exactly. The fused rank is
    n r, so PEFT's alpha' / (n r) must equal alpha / r: alpha' = n alpha (rsLoRA: sqrt(n) alpha). DoRA's magnitudes
    concatenate; an un-adapted projection gets m = ||W0 row||, which leaves it unchanged."""
    name = adapter_name or adapters.active_adapter(model)
    if base_model is not None:
        base_model_name_or_path = os.path.join(os.path.abspath(directory), "base")
    wrappers = dict(adapters.adapter_named(model, name))  # layer name -> its LoRALinear, active or aside
    config, kept = next(iter(wrappers.values())).settings, sorted(adapters.kept_trainable_parameters(model))
    if any(not isinstance(w, LoRALinear) for w in wrappers.values()):
        raise ValueError(f"adapter {name!r} is not a LoRA adapter; PEFT export writes LoRA adapters")
    if kept:
        raise ValueError(
            f"adapter {name!r} also trains {kept[0]!r}, which a PEFT adapter for GPT2LMHeadModel cannot "
            "hold; export a LoRA-only adapter, or the merged model (hf_format.export_merged_hf)"
        )
    if not model.config.bias:
        raise ValueError("the model has no biases, unlike GPT-2; PEFT export needs a GPT-2-family base")
    if model.config.smear_keys:
        raise ValueError("the model has smeared keys, unlike GPT-2; export a base pretrained with --no-smear_keys")
    rank, alpha, use_rslora, use_dora = config["rank"], config["alpha"], config["use_rslora"], config["use_dora"]
    fused = [t for t in "qkv" if t in config["targets"]]
    n_embd, tensors = model.config.n_embd, {}
    for i in range(model.config.n_layer):
        names = {t: f"transformer.h.{i}.{suffix}" for t, suffix in TARGETS.items()}
        layers = {t: wrappers.get(name) or model.get_submodule(name) for t, name in names.items()}
        prefix = f"{PEFT_PREFIX}{i}."
        if fused:
            B = layers[fused[0]].lora_A.weight.new_zeros(3 * n_embd, len(fused) * rank)
            for j, t in enumerate(fused):
                B[qkv_rows(t, n_embd), j * rank : (j + 1) * rank] = layers[t].lora_B.weight
            tensors[prefix + "attn.c_attn.lora_A.weight"] = torch.cat([layers[t].lora_A.weight for t in fused])
            tensors[prefix + "attn.c_attn.lora_B.weight"] = B
            if use_dora:
                magnitudes = [dora_magnitude(layers[t]) for t in "qkv"]
                tensors[prefix + "attn.c_attn.lora_magnitude_vector"] = torch.cat(magnitudes)
        for t in ("o", "mlp_in", "mlp_out"):
            if t in config["targets"]:
                key = prefix + HF_MODULE[t]
                tensors[key + ".lora_A.weight"] = layers[t].lora_A.weight
                tensors[key + ".lora_B.weight"] = layers[t].lora_B.weight
                if use_dora:
                    tensors[key + ".lora_magnitude_vector"] = layers[t].lora_magnitude
    target_modules = list(dict.fromkeys(HF_MODULE[t] for t in TARGETS if t in config["targets"]))
    rank_pattern, alpha_pattern = {}, {}
    if len(fused) > 1:
        rank_pattern["attn.c_attn"] = len(fused) * rank
        alpha_pattern["attn.c_attn"] = alpha * (math.sqrt(len(fused)) if use_rslora else len(fused))
    peft_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path}
    peft_config |= {"r": rank, "lora_alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    peft_config |= {"target_modules": target_modules, "fan_in_fan_out": True, "lora_dropout": config["dropout"]}
    peft_config |= {"bias": "none", "use_rslora": use_rslora, "use_dora": use_dora, "modules_to_save": None}
    peft_config |= {"init_lora_weights": True, "inference_mode": True}
    peft_config |= {"layers_to_transform": None, "layers_pattern": None}
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    config_bytes = json.dumps(peft_config, indent=2).encode()
    header = {"format": "pt", "written_by": WRITTEN_BY["peft"]}
    header["adapter_config_sha256"] = hashlib.sha256(config_bytes).hexdigest()
    header |= {"nanoqlora": json.dumps(metadata, allow_nan=False)} if metadata else {}
    with export_folder(directory, "peft", protected) as staging:
        if base_model is not None:
            write_hf_checkpoint(base_model, os.path.join(staging, "base"))
        write_bytes_atomic(config_bytes, os.path.join(staging, adapters.ADAPTER_CONFIG))
        save_safetensors_atomic(tensors, os.path.join(staging, adapters.ADAPTER_WEIGHTS), metadata=header)
    return os.path.join(os.path.abspath(directory), adapters.ADAPTER_WEIGHTS)


def dora_magnitude(layer):
    """DoRA's m of a q/k/v projection: the trained one, or the row norms of W0 where it has no adapter."""
    if isinstance(layer, DoRALinear):
        return layer.lora_magnitude
    base = layer.base if isinstance(layer, LoRALinear) else layer
    return torch.linalg.norm(dense_weight(base).float(), dim=1)


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_positive(v):
    return is_number(v) and v > 0


def is_count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def patterns_of(check):
    return lambda v: isinstance(v, dict) and all(map(check, v.values()))


PEFT_SETTING_TYPES = {  # LoraConfig key -> (check, what it must be), for the keys import_peft reads
    "r": (is_count, "a positive integer"),
    "lora_alpha": (is_positive, "a positive number"),
    "lora_dropout": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "rank_pattern": (patterns_of(is_count), "an object of module patterns -> positive integers"),
    "alpha_pattern": (patterns_of(is_positive), "an object of module patterns -> positive numbers"),
}


def read_peft_adapter(directory):
    """(adapter_config.json, {name: tensor}) of a PEFT adapter folder, every setting import_peft reads checked and
    the tensors read as every adapter's are (finite floats; our export's config checksum must match)."""
    names = adapters.ADAPTER_CONFIG, adapters.ADAPTER_WEIGHTS
    config, weights_path = read_saved_pair(directory, *names, "PEFT's save_pretrained")
    config_path = os.path.join(directory, adapters.ADAPTER_CONFIG)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters ('LORA') import")
    for key in UNSUPPORTED_PEFT_SETTINGS:
        if config.get(key) not in (None, False, [], {}):
            raise ValueError(
                f"{config_path} sets {key}={config[key]!r}, which our LoRA layers cannot express; remove it"
            )
    if config.get("bias", "none") != "none":
        raise ValueError(
            f"{config_path} trains biases (bias={config['bias']!r}); only bias='none' imports (ours are frozen)"
        )
    if "lora_alpha" not in config:
        raise UserError(f"{config_path} has no lora_alpha: it is not a complete LoraConfig")
    for key, (valid, description) in PEFT_SETTING_TYPES.items():
        if config.get(key) is not None and not valid(config[key]):
            raise UserError(f"{config_path}: {key!r} is {json.dumps(config[key])}, but must be {description}")
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern in config.get(key) or {}:
            try:
                re.compile(pattern)
            except re.error as e:
                raise UserError(
                    f"{config_path}: {key} key {pattern!r} is not a regular expression ({e}); fix it"
                ) from None
    recorded = safetensors_header(weights_path).get("adapter_config_sha256")
    if recorded is not None and recorded != file_sha256(config_path):
        raise UserError(
            f"{config_path} is not the config {weights_path} was exported with (files of two exports); export again"
        )
    fix = "export or save the adapter again"
    return config, read_weights_checked(weights_path, None, adapters.ADAPTER_CONFIG, fix=fix)


def pattern_value(patterns, module_name, default):
    """PEFT's per-module override: the value of the first pattern key the module name ends with (after a '.')."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def import_peft(model, directory, adapter_name="default"):
    """A PEFT LoRA adapter for GPT-2 as our LoRA layers named `adapter_name`, active, computing what PeftModel does.
    c_attn's (A, B) of rank R becomes q, k and v adapters of rank R sharing A, each with its row block of B. Where
    rank_pattern or alpha_pattern make modules differ, smaller ranks are padded with zeros (BA unchanged) and B is
    scaled by PEFT's scaling / ours; without patterns the weights are copied bit for bit. Returns the model."""
    config, stored = read_peft_adapter(directory)
    n_layer, n_embd = model.config.n_layer, model.config.n_embd
    modules = {}  # (layer, hf module) -> {"lora_A.weight": A, "lora_B.weight": B, "lora_magnitude_vector": m}
    for key, tensor in stored.items():
        match = PEFT_KEY.fullmatch(key)
        if not match:
            raise ValueError(f"{directory}: tensor {key!r} is not LoRA's on a GPT-2 block's {', '.join(GPT2_MODULES)}")
        if int(match[1]) >= n_layer:
            raise ValueError(
                f"{directory}: tensor {key!r} is for block {match[1]} of a model with {n_layer}; another base?"
            )
        modules.setdefault((int(match[1]), match[2]), {})[match[3]] = tensor
    hf_modules = sorted({m for _, m in modules})
    if not hf_modules:
        raise ValueError(f"{directory}: no LoRA tensors found")
    for layer in range(n_layer):
        for module in hf_modules:
            if (layer, module) not in modules:
                raise ValueError(
                    f"{directory} adapts {module} in some blocks but not in block {layer}; ours adapt every block"
                )
    use_dora, use_rslora, alpha = bool(config.get("use_dora")), bool(config.get("use_rslora")), config["lora_alpha"]
    for (layer, module), parts in modules.items():
        wanted = list(PARTS if use_dora else PARTS[:2])
        if sorted(parts) != wanted:
            raise ValueError(
                f"{directory}: block {layer} {module} has {sorted(parts)}, expected {wanted} (use_dora={use_dora})"
            )
        out_features = {"attn.c_attn": 3 * n_embd, "mlp.c_fc": 4 * n_embd}.get(module, n_embd)
        in_features = 4 * n_embd if module == "mlp.c_proj" else n_embd
        A, B = parts["lora_A.weight"], parts["lora_B.weight"]
        if A.dim() != 2 or B.dim() != 2 or (A.shape[1], B.shape[0], B.shape[1]) != (in_features, out_features, len(A)):
            raise ValueError(
                f"{directory}: block {layer} {module} has A {tuple(A.shape)} and B {tuple(B.shape)}, but this model "
                f"needs A (r, {in_features}) and B ({out_features}, r): is it for a GPT-2 of another width?"
            )
        # the module's scaling as PEFT computes it; its patterns match the module's name inside GPT2LMHeadModel
        module_alpha = pattern_value(config.get("alpha_pattern") or {}, f"transformer.h.{layer}.{module}", alpha)
        parts["scaling"] = lora_scaling(module_alpha, len(A), use_rslora)
        if parts["scaling"] > adapters.MAX_LORA_SCALING:
            raise UserError(
                f"{directory}: block {layer} {module}'s lora_alpha and rank scale its update by {parts['scaling']:g}, "
                f"beyond any adapter trained here (at most {adapters.MAX_LORA_SCALING:g}): damaged or edited"
            )
    rank = max(len(parts["lora_A.weight"]) for parts in modules.values())
    ours = lora_scaling(alpha, rank, use_rslora)
    targets = [t for t in TARGETS if HF_MODULE[t] in hf_modules]
    settings = {"rank": rank, "alpha": alpha, "targets": targets, "dropout": config.get("lora_dropout", 0.0)}
    adapters.add_adapter(model, adapter_name, "lora", **settings, use_rslora=use_rslora, use_dora=use_dora)
    with torch.no_grad():
        for (layer, module), parts in modules.items():
            A, B, r = parts["lora_A.weight"], parts["lora_B.weight"], len(parts["lora_A.weight"])
            B = B * (parts["scaling"] / ours) if parts["scaling"] != ours else B
            for t in (t for t in targets if HF_MODULE[t] == module):
                target = model.get_submodule(f"transformer.h.{layer}.{TARGETS[t]}")
                rows = qkv_rows(t, n_embd) if module == "attn.c_attn" else slice(None)
                target.lora_A.weight.zero_()[:r].copy_(A)
                target.lora_B.weight.zero_()[:, :r].copy_(B[rows])
                if use_dora:
                    target.lora_magnitude.copy_(parts["lora_magnitude_vector"][rows])
    return model
