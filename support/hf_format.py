"""Models in transformers' GPT-2 format, and the export folder every export writes through: only a new or empty
folder, or an earlier export of the same kind, replaced whole by renames under the folder's run lock; never a
protected folder (the run's own, its base's)."""

import contextlib
import copy
import os
import re
import shutil

import torch
import torch.nn as nn

from lora import TARGETS
from support.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from support.checkpoints import HF_TOKENIZERS
from support.files import UserError, read_json, save_safetensors_atomic, sync_directory, write_json_atomic
from support.runs import LOCK_FILE, lock_out_dir, process_is_alive

# apply_lora's short target -> the GPT-2 module that holds it (c_attn's output rows: q, then k, then v)
HF_MODULE = {**dict.fromkeys("qkv", "attn.c_attn"), "o": "attn.c_proj", "mlp_in": "mlp.c_fc", "mlp_out": "mlp.c_proj"}
WRITTEN_BY = {"hf": "hf_format.save_hf_checkpoint", "peft": "peft_format.export_peft"}  # the mark each kind carries
EXPORT_FILES = {"hf": {"config.json", "model.safetensors"}, "peft": {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "base"}}
STAGING = re.compile(r"^\.(.+)\.(export|replaced)-(\d+)\.tmp$")  # export_folder's working folders beside the target


def hf_base_name(init_from):
    """adapter_config.json's base_model_name_or_path for --init_from, or None when the base is not an HF model."""
    from model import PRETRAINED

    if init_from in PRETRAINED:
        return f"openai-community/{init_from}"
    if all(os.path.isfile(os.path.join(init_from, name)) for name in EXPORT_FILES["hf"]):
        return os.path.abspath(init_from)
    return None


def safetensors_header(path):
    """A safetensors file's header metadata, {} when it is missing or unreadable (its reader names that)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except Exception:
        return {}


def export_mark(directory, kind):
    """The mark our writers leave in an export of `kind` (config.json's, or the weights' header), or None."""
    if kind == "peft":
        return safetensors_header(os.path.join(directory, ADAPTER_WEIGHTS)).get("written_by")
    try:
        mark = read_json(os.path.join(directory, "config.json")).get("nanoqlora")
    except Exception:  # missing, unreadable or foreign: not an export of ours
        return None
    return mark.get("written_by") if isinstance(mark, dict) else None


@contextlib.contextmanager
def export_folder(directory, kind, protected=()):
    """Yields a new folder beside `directory` to write an export of `kind` ("hf" or "peft") into; when the block
    succeeds it replaces `directory` by two renames (a reader sees the old export or the new one, never a mix),
    otherwise it is removed. `protected`: (what, path) pairs never written into."""
    directory = os.path.abspath(directory)
    for what, path in protected:
        if path and os.path.exists(path) and os.path.realpath(path) == os.path.realpath(directory):
            raise UserError(f"{directory} is {what}: an export never writes into it; give the export a new folder")
    parent, name = os.path.split(directory)
    remove_stale_export_folders(parent, name)
    with lock_out_dir(directory):
        contents = sorted(set(os.listdir(directory)) - {LOCK_FILE})
        if contents and not (set(contents) <= EXPORT_FILES[kind] and export_mark(directory, kind) == WRITTEN_BY[kind]):
            shown = ", ".join(contents[:3]) + (" ..." if len(contents) > 3 else "")
            raise UserError(
                f"{directory} holds {shown}, which is not an earlier export of this kind ({WRITTEN_BY[kind]}): an "
                "export writes only into a new or empty folder, or over an earlier export of its kind; choose another"
            )
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
            shutil.rmtree(replaced, ignore_errors=True)  # the earlier export (or empty folder), its lock file with it
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def remove_stale_export_folders(parent, name):
    """The working folders of an export of `name` whose process is gone."""
    if not os.path.isdir(parent):
        return
    for entry in os.listdir(parent):
        match = STAGING.match(entry)
        if match and match[1] == name and not process_is_alive(int(match[3])):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def export_merged_hf(model, directory, protected=()):
    """The model with its active adapter merged, as an HF GPT-2 folder; a QLoRA model merges into a dequantized copy
    (re-quantizing would round the update away). The model passed in is not changed."""
    from lora import lora_layers, merge_lora
    from quantize import Linear4bit, dequantize_model, merge_lora_into_dequantized

    quantized = any(isinstance(m, Linear4bit) for m in model.modules())
    if lora_layers(model):
        merged = merge_lora_into_dequantized(model) if quantized else merge_lora(copy.deepcopy(model), unload=True)
    else:
        merged = dequantize_model(copy.deepcopy(model)) if quantized else model
    return save_hf_checkpoint(merged, directory, protected)


def ours_to_hf(sd, n_layer):
    """GPT's state dict -> HF GPT-2's (the inverse of model.hf_to_ours): q, k, v stacked into c_attn, projections
    transposed to Conv1D's (in, out), lm_head left out (tied to wte)."""
    hf = {f"transformer.{k}": sd[f"transformer.{k}"] for k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
    for i in range(n_layer):
        h = f"transformer.h.{i}."
        for ln in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"):
            hf[h + ln] = sd[h + ln]
        hf[h + "attn.c_attn.weight"] = torch.cat([sd[h + TARGETS[t] + ".weight"] for t in "qkv"], dim=0).t()
        hf[h + "attn.c_attn.bias"] = torch.cat([sd[h + TARGETS[t] + ".bias"] for t in "qkv"])
        for t in ("o", "mlp_in", "mlp_out"):
            hf[h + HF_MODULE[t] + ".weight"] = sd[h + TARGETS[t] + ".weight"].t()
            hf[h + HF_MODULE[t] + ".bias"] = sd[h + TARGETS[t] + ".bias"]
    return hf


def save_hf_checkpoint(model, directory, protected=()):
    """A model.GPT as an HF GPT-2 folder (config.json naming its tokenizer, model.safetensors) that both
    GPT2LMHeadModel.from_pretrained and GPT.from_pretrained load, written through export_folder."""
    with export_folder(directory, "hf", protected) as staging:
        write_hf_checkpoint(model, staging)
    return os.path.join(os.path.abspath(directory), "model.safetensors")


def write_hf_checkpoint(model, directory):
    """save_hf_checkpoint's files, written into `directory` as it is (export_folder's staging folder)."""
    if not model.config.bias:
        raise ValueError(
            "HF's GPT-2 has a bias in every Linear and LayerNorm; a model with bias=False cannot be saved as one"
        )
    if model.config.smear_keys:
        raise ValueError("HF's GPT-2 has no smeared keys (smear_keys=True); this model cannot be saved in its format")
    for name, module in model.named_modules():
        if name.endswith(tuple(TARGETS.values())) and type(module) is not nn.Linear:
            kind = type(module).__name__
            raise ValueError(
                f"{name} is a {kind}, not a plain nn.Linear: merge first (export_merged_hf does, for LoRA and QLoRA)"
            )
    c = model.config
    tokenizer = {size: name for name, size in HF_TOKENIZERS.items()}.get(c.vocab_size)
    hf_config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size}
    hf_config |= {"n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head}
    hf_config |= {"n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}
    hf_config |= {"resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout, "initializer_range": 0.02}
    hf_config |= {"scale_attn_weights": True, "tie_word_embeddings": True, "use_cache": True}
    hf_config |= {
        "bos_token_id": c.vocab_size - 1,
        "eos_token_id": c.vocab_size - 1,
    }  # <|endoftext|>, the last id of both
    hf_config["dtype"] = str(model.transformer.wte.weight.dtype).removeprefix("torch.")
    hf_config["nanoqlora"] = {"written_by": WRITTEN_BY["hf"], **({"tokenizer": tokenizer} if tokenizer else {})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in ours_to_hf(model.state_dict(), c.n_layer).items()}
    os.makedirs(directory, exist_ok=True)
    write_json_atomic(hf_config, os.path.join(directory, "config.json"))
    weights_path = os.path.join(directory, "model.safetensors")
    save_safetensors_atomic(tensors, weights_path, metadata={"format": "pt"})
    return weights_path
