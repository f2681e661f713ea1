"""
Interop with Hugging Face: LoRA adapters in PEFT's format, and whole models in transformers' GPT-2 format.

    export_peft(model, dir)        the model's LoRA adapter -> dir/adapter_config.json + dir/adapter_model.safetensors,
                                   loadable with peft.PeftModel.from_pretrained(GPT2LMHeadModel..., dir)
    import_peft(model, dir)        a PEFT LoRA adapter for GPT-2 -> LoRA layers on our model, computing the same function
    export_merged_hf(model, dir)   base + adapter merged -> dir/config.json + dir/model.safetensors (save_hf_checkpoint)
    save_hf_checkpoint(model, dir) a model.GPT in transformers' GPT-2 format (the inverse of GPT.from_pretrained)

`python train.py --adapter RUN_DIR --export_peft OUT_DIR` and `--export_hf OUT_DIR` call the first and the last.

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

import copy
import json
import math
import os
import re

import torch

import torch.nn as nn

from lora import LoRALinear, active_adapter_name, apply_lora, dense_weight
from support.adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config
from support.common import save_safetensors_atomic, write_json_atomic
from support.safety import read_saved_pair

QKV_SLOT = {"q": 0, "k": 1, "v": 2}  # row block of each projection inside c_attn's 3 n_embd outputs
HF_MODULE = {"o": "attn.c_proj", "mlp_in": "mlp.c_fc", "mlp_out": "mlp.c_proj"}  # besides q, k, v -> attn.c_attn
OUR_TARGETS = {"attn.c_attn": ("q", "k", "v"), "attn.c_proj": ("o",), "mlp.c_fc": ("mlp_in",), "mlp.c_proj": ("mlp_out",)}
OUR_SUFFIX = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj", "mlp_in": "mlp.fc_in", "mlp_out": "mlp.fc_out"}
PEFT_PREFIX = "base_model.model.transformer.h."
PEFT_KEY = re.compile(r"base_model\.model\.transformer\.h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)")
# LoraConfig settings that change what the adapter computes beyond A, B (and DoRA's m); import refuses them.
UNSUPPORTED_PEFT_SETTINGS = ("modules_to_save", "trainable_token_indices", "layer_replication", "target_parameters",
                             "alora_invocation_tokens", "layers_to_transform", "lora_bias", "use_qalora")


def lora_scaling(alpha, rank, use_rslora):
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def hf_base_name(init_from):
    """What adapter_config.json's base_model_name_or_path should say for a base loaded with --init_from, or None
    when the base is not an HF model (the tiny base, a checkpoint of train.py)."""
    from model import PRETRAINED

    if init_from in PRETRAINED:
        return f"openai-community/{init_from}"
    if os.path.isfile(os.path.join(init_from, "config.json")) and os.path.isfile(os.path.join(init_from, "model.safetensors")):
        return os.path.abspath(init_from)
    return None


# ---------------------------------------------------------------------------------------------- export


def export_peft(model, directory, base_model_name_or_path=None, adapter_name=None, metadata=None):
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

    Errors: an adapter with kept-trainable parameters besides LoRA (a classification head: GPT2LMHeadModel has no
    place for it), a model without biases or with smeared keys (not a GPT-2). Returns the weights file's path."""
    name = adapter_name or active_adapter_name(model)
    config = adapter_config(model, name)  # raises for layers that are not one of apply_lora's targets
    if config["trainable"]:
        raise ValueError(
            f"adapter {name!r} also trains {config['trainable'][0]!r} (apply_lora(trainable=...)), which PEFT's GPT2LMHeadModel "
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
        modules = {"q": block.attn.q_proj, "k": block.attn.k_proj, "v": block.attn.v_proj, "o": block.attn.o_proj,
                   "mlp_in": block.mlp.fc_in, "mlp_out": block.mlp.fc_out}
        prefix = f"{PEFT_PREFIX}{i}."
        if fused:
            ref = modules[fused[0]].lora_A[name]
            A = torch.cat([modules[t].lora_A[name] for t in fused], dim=0)
            B = ref.new_zeros(3 * n_embd, len(fused) * rank)
            for j, t in enumerate(fused):
                rows = slice(QKV_SLOT[t] * n_embd, (QKV_SLOT[t] + 1) * n_embd)
                B[rows, j * rank : (j + 1) * rank] = modules[t].lora_B[name]
            tensors[prefix + "attn.c_attn.lora_A.weight"], tensors[prefix + "attn.c_attn.lora_B.weight"] = A, B
            if use_dora:
                tensors[prefix + "attn.c_attn.lora_magnitude_vector"] = torch.cat([dora_magnitude(modules[t], name) for t in ("q", "k", "v")])
        for t, hf in HF_MODULE.items():
            if t in config["targets"]:
                layer = modules[t]
                tensors[prefix + hf + ".lora_A.weight"], tensors[prefix + hf + ".lora_B.weight"] = layer.lora_A[name], layer.lora_B[name]
                if use_dora:
                    tensors[prefix + hf + ".lora_magnitude_vector"] = layer.lora_magnitude[name]
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
    os.makedirs(directory, exist_ok=True)
    weights_path = os.path.join(directory, ADAPTER_WEIGHTS)
    header = {"format": "pt", **({"nanoqlora": json.dumps(metadata, allow_nan=False)} if metadata else {})}
    save_safetensors_atomic(tensors, weights_path, metadata=header)
    write_json_atomic(peft_config, os.path.join(directory, ADAPTER_CONFIG))
    return weights_path


def dora_magnitude(layer, name):
    """DoRA's m of a (possibly un-adapted) q/k/v projection: the trained m, or the row norms of W0 where the
    projection has no adapter (m / ||W0|| = 1 leaves it unchanged)."""
    if isinstance(layer, LoRALinear) and name in layer.lora_magnitude:
        return layer.lora_magnitude[name]
    base = layer.base if isinstance(layer, LoRALinear) else layer
    return torch.linalg.norm(dense_weight(base).float(), dim=1)


# ---------------------------------------------------------------------------------------------- import


def read_peft_adapter(directory):
    """(adapter_config.json as a dict, {tensor name: tensor}) of a PEFT adapter directory, checked."""
    from safetensors.torch import load_file

    config, weights_path = read_saved_pair(directory, ADAPTER_CONFIG, ADAPTER_WEIGHTS, "PEFT's save_pretrained")
    paths = [os.path.join(directory, ADAPTER_CONFIG), weights_path]
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{paths[0]}: peft_type is {config.get('peft_type')!r}; only LoRA adapters (peft_type 'LORA') can be imported")
    for key in UNSUPPORTED_PEFT_SETTINGS:
        if config.get(key) not in (None, False, [], {}):
            raise ValueError(f"{paths[0]} sets {key}={config[key]!r}, which our LoRA layers cannot express; only A, B (and DoRA's magnitude) import")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{paths[0]} trains biases (bias={config['bias']!r}); our LoRA keeps the base biases frozen, so only bias='none' imports")
    return config, load_file(paths[1])


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
    targets = [t for module in hf_modules for t in OUR_TARGETS[module]]
    apply_lora(model, rank=rank, alpha=alpha, targets=targets, dropout=config.get("lora_dropout", 0.0), use_rslora=use_rslora,
               use_dora=use_dora, adapter_name=adapter_name)
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
                target.lora_A[adapter_name].zero_()[:r].copy_(A)
                target.lora_B[adapter_name].zero_()[:, :r].copy_(B[rows])
                if use_dora:
                    target.lora_magnitude[adapter_name].copy_(parts["lora_magnitude_vector"][rows])
    return model


# ---------------------------------------------------------------------------------------------- merged HF export


def export_merged_hf(model, directory):
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
    return save_hf_checkpoint(merged, directory)


# ---------------------------------------------------------------------------------------------- whole models


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


def save_hf_checkpoint(model, directory):
    """Write a model.GPT as a Hugging Face GPT-2 checkpoint: config.json + model.safetensors with HF's names and
    Conv1D layout (the inverse of hf_to_ours), so transformers.GPT2LMHeadModel.from_pretrained(directory) and
    GPT.from_pretrained(directory) both load it. Works for GPT-2 sizes and for the byte-level models here
    (vocab 257); the end-of-text token is the last id in both vocabularies. A model with LoRA layers or 4-bit
    weights must be merged into plain nn.Linear layers first. Returns the weights file's path."""
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
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in ours_to_hf(model.state_dict(), c.n_layer).items()}
    os.makedirs(directory, exist_ok=True)
    write_json_atomic(hf_config, os.path.join(directory, "config.json"))
    weights_path = os.path.join(directory, "model.safetensors")
    save_safetensors_atomic(tensors, weights_path, metadata={"format": "pt"})
    return weights_path
