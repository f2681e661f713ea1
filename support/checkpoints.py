"""
The models runs start from: 'tiny' (pretrained first in a child process if missing or unfinished), a GPT-2 name or HF
folder (checked before loading), a train.py checkpoint; a train.py adapter only on the base it was trained on (its
weights' fingerprint and tokenizer); and the data of a train.py job.
"""

import hashlib
import json
import os

import torch

from model import GPT, PRETRAINED, GPTConfig
from support.adapters import load_adapter, read_adapter_config
from support.cli import run_script
from support.files import (
    REPO_DIR,
    UserError,
    check_tensors_match,
    download_file,
    first_line,
    load_tensor_file,
    read_json,
    shown_path,
    user_cache_dir,
)

TINY_BASE_DIR = os.path.join(REPO_DIR, "checkpoints", "tiny-base")
HF_URL = "https://huggingface.co/openai-community/{name}/resolve/main/{file}"
HF_TOKENIZERS = {"gpt2": 50257, "bytes": 257}  # tokenizer name -> its vocabulary size


def load_weights(model, state_dict):
    """model.load_state_dict naming the first missing, unexpected or wrongly shaped tensor; the output layer is tied
    to the token embedding, so a state dict may hold it or not."""
    ours = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    check_tensors_match(state_dict, ours, "the checkpoint")
    model.load_state_dict(state_dict, strict=False)


def download_pretrained(name, cache_dir=None):
    """config.json and model.safetensors of openai-community/<name>, into cache_dir/<name> once."""
    directory = os.path.join(cache_dir or user_cache_dir(), name)
    os.makedirs(directory, exist_ok=True)
    for file in ("config.json", "model.safetensors"):
        download_file(HF_URL.format(name=name, file=file), os.path.join(directory, file))
    return directory


def hf_tensor_shapes(n_layer, n_embd, vocab_size, block_size):
    """{name without 'transformer.': shape} of an HF GPT-2 checkpoint of this shape."""
    e = n_embd
    linear = {"attn.c_attn": (e, 3 * e), "attn.c_proj": (e, e), "mlp.c_fc": (e, 4 * e), "mlp.c_proj": (4 * e, e)}
    layer = {f"{n}.{p}": (e,) for n in ("ln_1", "ln_2") for p in ("weight", "bias")}
    layer |= {f"{n}.weight": s for n, s in linear.items()} | {f"{n}.bias": (s[1],) for n, s in linear.items()}
    shapes = {"wte.weight": (vocab_size, e), "wpe.weight": (block_size, e), "ln_f.weight": (e,), "ln_f.bias": (e,)}
    return shapes | {f"h.{i}.{k}": s for i in range(n_layer) for k, s in layer.items()}


def check_hf_directory(directory):
    """config.json and model.safetensors are a GPT-2 whose tensors have the shapes its config says -> the config.
    Only the safetensors header is read: a config that claims a huge model allocates nothing."""
    from safetensors import safe_open

    config_path, weights_path = os.path.join(directory, "config.json"), os.path.join(directory, "model.safetensors")
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory} has no {os.path.basename(path)}: not an HF GPT-2 folder")
    shape = ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd")
    hf = read_json(config_path, shape, what="Hugging Face GPT-2 config")
    for key in shape:
        if not isinstance(hf[key], int) or isinstance(hf[key], bool) or hf[key] < 1:
            raise UserError(f"{config_path}: {key!r} is {json.dumps(hf[key])}, but must be a positive integer")
    if hf["n_embd"] % hf["n_head"]:
        raise UserError(f"{config_path}: n_embd {hf['n_embd']} is not divisible by n_head {hf['n_head']}")
    try:
        with safe_open(weights_path, framework="pt") as f:
            stored = {k.removeprefix("transformer."): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for a corrupt header
        raise UserError(f"{weights_path} is not a readable safetensors file ({first_line(e)}); get it again") from None
    layers = {int(k.split(".")[1]) for k in stored if k.startswith("h.") and k.split(".")[1].isdigit()}
    if layers != set(range(hf["n_layer"])):  # else extra layers would be dropped, or a missing one a bare KeyError
        raise UserError(f"{config_path} says n_layer={hf['n_layer']} but {weights_path} holds {len(layers)} layers")
    for name, expected in hf_tensor_shapes(hf["n_layer"], hf["n_embd"], hf["vocab_size"], hf["n_positions"]).items():
        if stored.get(name) != expected:
            found = f"is {stored[name]}" if name in stored else "is missing"
            raise UserError(f"{weights_path}: {name} {found} but {config_path} implies {expected}")
    return hf


def hf_tokenizer(hf, config_path):
    """The tokenizer an HF config names under "nanoqlora" (interop writes it), else the one of its vocabulary size."""
    ours = hf.get("nanoqlora")
    declared = ours.get("tokenizer") if isinstance(ours, dict) else None
    if declared is None:
        by_size = {size: name for name, size in HF_TOKENIZERS.items()}
        if hf["vocab_size"] not in by_size:
            vocab = f"vocab_size {hf['vocab_size']} is neither GPT-2's BPE (50257) nor the byte-level tokenizer's (257)"
            raise UserError(f"{config_path}: {vocab}, and the config names no tokenizer")
        return by_size[hf["vocab_size"]]
    if declared not in HF_TOKENIZERS:
        raise UserError(f"{config_path}: its tokenizer {json.dumps(declared)} is not one of {', '.join(HF_TOKENIZERS)}")
    if HF_TOKENIZERS[declared] != hf["vocab_size"]:
        tokens = f"the {declared} tokenizer ({HF_TOKENIZERS[declared]} tokens)"
        raise UserError(f"{config_path} names {tokens} but vocab_size {hf['vocab_size']}; the config is damaged")
    return declared


def load_checkpoint_model(path, device="cpu"):
    """A full-weight checkpoint of train.py (pretraining, full fine-tuning) -> (GPT, tokenizer name)."""
    path = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    ckpt = load_tensor_file(path, fix="point --init_from at a checkpoint written by train.py")
    if "model" not in ckpt and "trainable" in ckpt:
        raise UserError(f"{path} holds only LoRA adapter weights: give --adapter {os.path.dirname(path)} instead")
    missing = [key for key in ("model", "model_config", "tokenizer") if key not in ckpt]
    if missing:
        raise UserError(f"{path} has no {missing[0]!r}: it is not a checkpoint written by train.py")
    model = GPT(GPTConfig(**ckpt["model_config"]))
    load_weights(model, ckpt["model"])
    bad = next((k for k, v in ckpt["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise UserError(f"{path}: tensor {bad!r} holds NaN or infinite values; the training that saved it diverged")
    return model.to(device), ckpt["tokenizer"]


def weights_sha256(model):
    """The fingerprint of a model's weights: SHA-256 over its state dict (name, dtype, shape, bytes) in name order,
    the tied output layer left out; the same weights give the same one from any file."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name != "lm_head.weight":
            t = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name} {t.dtype} {tuple(tensor.shape)}\n".encode())
            digest.update(t.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def ensure_tiny_base(device="cpu", progress=True):
    """The tiny base's checkpoint: pretrained first if missing, finished if its pretraining was interrupted (by
    train.py in a child process). `progress`: whether that pretraining draws its progress bar."""
    path, command = os.path.join(TINY_BASE_DIR, "ckpt.pt"), pretraining_command()
    if not os.path.isfile(path) and "RANK" in os.environ:  # every torchrun process would pretrain (and write) it
        raise FileNotFoundError(f"no tiny base model at {path}: pretrain it first ({command}), then start torchrun")
    if not os.path.isfile(path):
        print(f"No tiny base model at {shown_path(path)}: pretraining it first (a few CPU minutes; `{command}`).")
        settings = {"init_from": "scratch", "dataset": "stdlib", "out_dir": TINY_BASE_DIR, "device": device}
        run_script("train.py", {**settings, "progress": progress})
        return path
    fix = f"delete {TINY_BASE_DIR} to pretrain the tiny base again"
    ckpt = load_tensor_file(path, fix=fix)
    if "iter" not in ckpt or "max_iters" not in ckpt.get("train_config", {}):
        raise UserError(f"{path} records no training progress: it is not a checkpoint of train.py; {fix}")
    done, planned = ckpt["iter"], ckpt["train_config"]["max_iters"]
    if done < planned:
        print(f"The tiny base at {path} stopped at step {done} of {planned}: resuming its pretraining first.")
        settings = {**ckpt["train_config"], "resume": True, "device": device, "out_dir": TINY_BASE_DIR}
        run_script("train.py", {**settings, "progress": progress})
    return path


def pretraining_command():
    return f"python train.py --init_from scratch --dataset stdlib --out_dir {os.path.relpath(TINY_BASE_DIR)}"


def load_base_model(init_from, device="cpu", pretrain=True, progress=True):
    """'tiny' | a GPT-2 name or HF folder | a checkpoint of train.py -> (GPT, tokenizer name). pretrain=False: a
    missing tiny base is an error, not pretrained (a new base would be another model than an adapter's)."""
    if init_from == "tiny":
        path = os.path.join(TINY_BASE_DIR, "ckpt.pt")
        if not pretrain and not os.path.isfile(path):
            raise FileNotFoundError(f"no tiny base model at {path}: pretrain it first ({pretraining_command()})")
        model, tokenizer_name = load_checkpoint_model(ensure_tiny_base(device, progress) if pretrain else path)
    elif init_from in PRETRAINED or os.path.isfile(os.path.join(init_from, "model.safetensors")):
        directory = download_pretrained(init_from) if init_from in PRETRAINED else init_from
        model = GPT.from_pretrained(directory)  # checks the folder first (check_hf_directory)
        config_path = os.path.join(directory, "config.json")
        tokenizer_name = hf_tokenizer(read_json(config_path), config_path)
    elif os.path.exists(init_from):
        model, tokenizer_name = load_checkpoint_model(init_from)
    else:
        choices = f"'tiny', 'scratch', one of {', '.join(PRETRAINED)}, or an existing checkpoint path"
        raise UserError(f"--init_from {init_from!r}: use {choices}")
    return model.to(device), tokenizer_name


def load_finetuned(adapter_dir, init_from, device):
    """The base with the LoRA adapter of a train.py run in `adapter_dir` -> (model in eval mode, tokenizer name).
    init_from "tiny": the base the adapter names. The base must be the one it was trained on (fingerprint and
    tokenizer) and is never pretrained here; for QLoRA it is quantized again (the same codes as in training)."""
    trained_on = read_adapter_config(adapter_dir)["metadata"]  # written by resume.save_checkpoint
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    for key in ("run_id", "init_from", "finetune", "tokenizer", "base_sha256"):
        if not isinstance(trained_on.get(key), str):
            raise UserError(f"{config_path} has no metadata {key!r} naming its base: not saved by train.py")
    summary_path = os.path.join(adapter_dir, "summary.json")
    if os.path.isfile(summary_path):  # the folder's summary must describe this adapter's run, not another one
        summary = read_json(summary_path, ["run_id"], what="summary of a train.py run")
        if summary["run_id"] != trained_on["run_id"]:
            runs = f"run {summary['run_id']} but the adapter in {adapter_dir} from run {trained_on['run_id']}"
            raise UserError(f"{summary_path} is from {runs}: the folder mixes two runs; train again in an empty folder")
    init_from = trained_on["init_from"] if init_from == "tiny" else init_from
    try:
        model, tokenizer_name = load_base_model(init_from, device, pretrain=False)
    except FileNotFoundError as e:
        raise UserError(f"the adapter in {adapter_dir} was trained on {init_from}, which is missing ({e})") from None
    fix = "give --init_from the base it was trained on"
    if trained_on["tokenizer"] != tokenizer_name:
        tokenizers = f"the {trained_on['tokenizer']} tokenizer, but {init_from} uses the {tokenizer_name} tokenizer"
        raise UserError(f"the adapter in {adapter_dir} was trained on a base with {tokenizers}; {fix}")
    fingerprint, trained = weights_sha256(model)[:16], trained_on["base_sha256"][:16]
    if trained != fingerprint:
        weights = f"whose weights have fingerprint {trained}, but {init_from} now holds weights {fingerprint}"
        raise UserError(f"the adapter in {adapter_dir} was trained on a base {weights}; {fix}, or train it again")
    if trained_on["finetune"] == "qlora":
        from quantize import quantize_model

        quantize_model(model)
    load_adapter(model, adapter_dir)
    return model.eval(), tokenizer_name


def load_data(cfg, tokenizer_name, block_size):
    """A train.py job's data -> (data, tokenizer, prompt template): windows of the standard library's text to
    pretrain on, or instruction examples whose responses are the targets (--mask_prompt)."""
    from support.answers import check_max_new_tokens
    from support.corpus import PretrainingData
    from support.instructions import InstructionData, resolve_template
    from support.tokenizer import get_tokenizer

    tokenizer, template = get_tokenizer(tokenizer_name), resolve_template(cfg.prompt_template, tokenizer_name)
    if cfg.pretraining:
        return PretrainingData(tokenizer, block_size, cfg.seed, cfg.corpus), tokenizer, template
    check_max_new_tokens(cfg.max_new_tokens, block_size)  # refused now, not when the answers after training are due
    options = dict(pack=cfg.pack, grad_accum=cfg.grad_accum, group_by_length=cfg.group_by_length)
    data = InstructionData(cfg.dataset, tokenizer, block_size, cfg.seed, cfg.mask_prompt, template, **options)
    return data, tokenizer, template
