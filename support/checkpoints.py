"""
The models the programs start from, and the files train.py leaves:

- load_base_model: 'tiny' (the offline byte-level base in checkpoints/tiny-base), a GPT-2 name or HF directory, or a
  checkpoint written by train.py -> (GPT, tokenizer name); weights_sha256: the fingerprint of its weights, which an
  adapter records (train.py computes it before adapting the base), and is loaded on no other base;
- load_data: the data of a train.py job, the pretraining corpus or instruction examples, and their tokenizer;
- ensure_tiny_base: the tiny base, pretrained first (by running `python train.py --init_from scratch --dataset stdlib`
  in a child process) if it is missing or its pretraining was interrupted;
- load_finetuned: a base with the LoRA adapter of a train.py run loaded into it (quantized again for QLoRA), once the
  base is shown to be the one the adapter was trained on (its fingerprint and tokenizer); a missing base is an error,
  never a pretraining;
- load_hf_model: GPT-2 from the Hugging Face hub or an HF-format directory, its two files checked first (the lesson's
  GPT.from_pretrained assumes they are right), its tokenizer the one its config.json names (a byte-level model
  exported by --export_hf says "bytes"); load_weights: a state dict whose first wrong tensor is named.

finetune_classifier.py, the experiments and the notebooks start from these as train.py does, without importing it.
"""

import hashlib
import json
import os

import torch

from model import GPT, PRETRAINED, GPTConfig
from support.adapters import read_adapter_config
from support.common import REPO_DIR, download_file, run_script, shown_path, user_cache_dir
from support.safety import UserError, check_tensors_match, first_line, load_tensor_file, read_json

TINY_BASE_DIR = os.path.join(REPO_DIR, "checkpoints", "tiny-base")
HF_URL = "https://huggingface.co/openai-community/{name}/resolve/main/{file}"


def load_weights(model, state_dict):
    """model.load_state_dict(state_dict) that names the first missing, unexpected or wrongly shaped tensor. The output
    layer is tied to the token embedding, so a state dict may hold it or not."""
    ours = model.state_dict()
    ours.pop("lm_head.weight")
    state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    check_tensors_match(state_dict, ours, "the checkpoint")
    model.load_state_dict(state_dict, strict=False)


def download_pretrained(name, cache_dir=None):
    """Fetch config.json and model.safetensors of openai-community/<name> into cache_dir/<name> (once)."""
    directory = os.path.join(cache_dir or user_cache_dir(), name)
    os.makedirs(directory, exist_ok=True)
    for file in ("config.json", "model.safetensors"):
        download_file(HF_URL.format(name=name, file=file), os.path.join(directory, file))
    return directory


def hf_tensor_shapes(n_layer, n_embd, vocab_size, block_size):
    """The tensors of an HF GPT-2 checkpoint of this shape: {name (without 'transformer.'): shape}."""
    shapes = {"wte.weight": (vocab_size, n_embd), "wpe.weight": (block_size, n_embd), "ln_f.weight": (n_embd,),
              "ln_f.bias": (n_embd,)}
    for i in range(n_layer):
        for name, shape in {"ln_1.weight": (n_embd,), "ln_1.bias": (n_embd,), "ln_2.weight": (n_embd,), "ln_2.bias": (n_embd,),
                            "attn.c_attn.weight": (n_embd, 3 * n_embd), "attn.c_attn.bias": (3 * n_embd,),
                            "attn.c_proj.weight": (n_embd, n_embd), "attn.c_proj.bias": (n_embd,),
                            "mlp.c_fc.weight": (n_embd, 4 * n_embd), "mlp.c_fc.bias": (4 * n_embd,),
                            "mlp.c_proj.weight": (4 * n_embd, n_embd), "mlp.c_proj.bias": (n_embd,)}.items():
            shapes[f"h.{i}.{name}"] = shape
    return shapes


HF_TOKENIZERS = {"gpt2": 50257, "bytes": 257}  # tokenizer name -> its vocabulary size


def hf_tokenizer(hf, config_path):
    """The tokenizer of an HF GPT-2 folder: the one config.json names under "nanoqlora" (hf_format.save_hf_checkpoint
    writes it), else the one whose vocabulary size it has; the two must agree."""
    ours = hf.get("nanoqlora")
    declared = ours.get("tokenizer") if isinstance(ours, dict) else None
    if declared is None:
        by_size = {size: name for name, size in HF_TOKENIZERS.items()}
        if hf["vocab_size"] not in by_size:
            raise UserError(f"{config_path}: vocab_size {hf['vocab_size']} is neither GPT-2's BPE ({HF_TOKENIZERS['gpt2']}) nor the "
                            f"byte-level tokenizer's ({HF_TOKENIZERS['bytes']}), and the config names no tokenizer; only those two "
                            f"tokenizers are here")
        return by_size[hf["vocab_size"]]
    if declared not in HF_TOKENIZERS:
        raise UserError(f"{config_path}: its tokenizer {json.dumps(declared)} is not one of {', '.join(HF_TOKENIZERS)}")
    if HF_TOKENIZERS[declared] != hf["vocab_size"]:
        raise UserError(f"{config_path} names the {declared} tokenizer ({HF_TOKENIZERS[declared]} tokens) but vocab_size "
                        f"{hf['vocab_size']}; the config is damaged")
    return declared


def check_hf_directory(directory):
    """config.json and model.safetensors of `directory` are a GPT-2 checkpoint whose tensors have the shapes its
    config says -> the config (a dict). Only the safetensors header is read, so a config that claims a huge model
    allocates nothing."""
    from safetensors import safe_open

    for file in ("config.json", "model.safetensors"):
        if not os.path.isfile(os.path.join(directory, file)):
            raise FileNotFoundError(f"{directory} has no {file}; an HF GPT-2 directory needs config.json and model.safetensors")
    config_path, weights_path = os.path.join(directory, "config.json"), os.path.join(directory, "model.safetensors")
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
        raise UserError(f"{weights_path} is not a readable safetensors file ({first_line(e)}); download or save it again") from None
    layers = {int(k.split(".")[1]) for k in stored if k.startswith("h.") and k.split(".")[1].isdigit()}
    if layers != set(range(hf["n_layer"])):  # otherwise extra layers would be dropped, or a missing one named by a bare KeyError
        raise UserError(f"{config_path} says n_layer={hf['n_layer']} but {weights_path} holds {len(layers)} layers "
                        f"(numbered {min(layers, default=0)}..{max(layers, default=-1)}); the two files do not belong together")
    for name, expected in hf_tensor_shapes(hf["n_layer"], hf["n_embd"], hf["vocab_size"], hf["n_positions"]).items():
        if name not in stored:
            raise UserError(f"{weights_path} is not a GPT-2 checkpoint: it has no tensor {name!r}")
        if stored[name] != expected:
            raise UserError(f"{weights_path}: {name} is {stored[name]} but {config_path} implies {expected}; the two files do "
                            f"not belong together")
    return hf


def load_hf_model(name_or_path):
    """GPT-2 by name (downloaded once) or from an HF-format directory, its files checked before anything is loaded
    (load_base_model also says which tokenizer the folder's config.json names)."""
    directory = download_pretrained(name_or_path) if name_or_path in PRETRAINED else name_or_path
    check_hf_directory(directory)
    return GPT.from_pretrained(directory)



def load_checkpoint_model(path, device="cpu"):
    """A full-weight checkpoint written by train.py (pretraining, full fine-tuning) -> (GPT, tokenizer name)."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    ckpt = load_tensor_file(path, fix="point --init_from at a checkpoint written by train.py")
    if "model" not in ckpt and "trainable" in ckpt:
        raise ValueError(f"{path} holds only LoRA adapter weights; load its base with --init_from and the adapter with --adapter {os.path.dirname(path)}")
    for key in ("model", "model_config", "tokenizer"):
        if key not in ckpt:
            raise UserError(f"{path} has no {key!r}: it is not a checkpoint written by train.py")
    model = GPT(GPTConfig(**ckpt["model_config"]))
    load_weights(model, ckpt["model"])
    bad = next((k for k, v in ckpt["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise UserError(f"{path}: tensor {bad!r} holds NaN or infinite values; the training that saved it diverged")
    return model.to(device), ckpt["tokenizer"]


def weights_sha256(model):
    """The fingerprint of a model's weights: SHA-256 over every tensor of its state dict (name, dtype, shape, bytes) in
    name order, the tied output layer left out. The same weights give the same fingerprint whichever file they came
    from (ckpt.pt, an HF folder); other weights, e.g. the same base pretrained again, give another one."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name == "lm_head.weight":
            continue
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name} {t.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def ensure_tiny_base(device="cpu", progress=True):
    """The default starting point: pretrain the tiny base on the stdlib corpus if it is not there yet, and finish
    it if an earlier pretraining was interrupted (its checkpoint is then from before the last step). `progress`:
    whether that pretraining draws its progress bar (train.py passes its --progress on)."""
    path = os.path.join(TINY_BASE_DIR, "ckpt.pt")
    if not os.path.isfile(path) and "RANK" in os.environ:  # every torchrun process would pretrain (and write) it at once
        raise FileNotFoundError(f"no tiny base model at {path}: pretrain it first in one process (python train.py --init_from scratch "
                                f"--dataset stdlib --out_dir {os.path.relpath(TINY_BASE_DIR)}), then start torchrun")
    if not os.path.isfile(path):
        print(f"No tiny base model at {shown_path(path)}: pretraining it first on the standard library's docstrings "
              f"(a few minutes on a laptop CPU; `python train.py --init_from scratch --dataset stdlib --out_dir {os.path.relpath(TINY_BASE_DIR)}` does the same).")
        run_script("train.py", {"init_from": "scratch", "dataset": "stdlib", "out_dir": TINY_BASE_DIR, "device": device,
                                "progress": progress})
    else:
        ckpt = load_tensor_file(path, fix=f"delete {TINY_BASE_DIR} to pretrain the tiny base again")
        if "iter" not in ckpt or "max_iters" not in ckpt.get("train_config", {}):
            raise UserError(f"{path} records no training progress (iter, train_config): it is not a checkpoint of train.py; "
                            f"delete {TINY_BASE_DIR} to pretrain the tiny base again")
        done, planned = ckpt["iter"], ckpt["train_config"]["max_iters"]
        if done < planned:
            print(f"The tiny base at {path} stopped at step {done} of {planned}: resuming its pretraining first.")
            run_script("train.py", {**ckpt["train_config"], "resume": True, "device": device, "out_dir": TINY_BASE_DIR,
                                    "progress": progress})
    return path


def load_base_model(init_from, device="cpu", pretrain=True, progress=True):
    """'tiny' | a GPT-2 name or HF directory | a checkpoint of train.py -> (GPT, tokenizer name).
    pretrain=False: a missing tiny base is an error rather than pretrained first (what answers with an
    adapter, or exports one, must not start a training of its own: the new base would be another model)."""
    if init_from == "tiny":
        path = os.path.join(TINY_BASE_DIR, "ckpt.pt")
        if not pretrain and not os.path.isfile(path):
            raise FileNotFoundError(f"no tiny base model at {path}: pretrain it first (python train.py --init_from scratch --dataset "
                                    f"stdlib --out_dir {os.path.relpath(TINY_BASE_DIR)}, or python train.py, which does that first)")
        model, tokenizer_name = load_checkpoint_model(ensure_tiny_base(device, progress) if pretrain else path)
    elif init_from in PRETRAINED or os.path.isfile(os.path.join(init_from, "model.safetensors")):
        directory = download_pretrained(init_from) if init_from in PRETRAINED else init_from
        tokenizer_name = hf_tokenizer(check_hf_directory(directory), os.path.join(directory, "config.json"))
        model = GPT.from_pretrained(directory)
    elif os.path.exists(init_from):
        model, tokenizer_name = load_checkpoint_model(init_from)
    else:
        raise ValueError(f"--init_from {init_from!r}: use 'tiny', 'scratch', one of {', '.join(PRETRAINED)}, or an existing checkpoint path")
    return model.to(device), tokenizer_name


def load_finetuned(adapter_dir, init_from, device):
    """The base model with a LoRA adapter from `adapter_dir` loaded into it -> (model, tokenizer name), in eval mode.
    init_from "tiny" means: the base the adapter was trained on (recorded in its adapter_config.json). The base must be
    the one the adapter was trained on: its fingerprint (weights_sha256) and tokenizer are compared with those the
    adapter recorded, and a base that is missing is an error (never pretrained here). A QLoRA adapter learned to
    correct a 4-bit base, so the base is quantized again (deterministically: the same codes as in training)."""
    from support.adapters import load_adapter

    config = read_adapter_config(adapter_dir)
    trained_on = config["metadata"]  # written by train.save_checkpoint: run_id, init_from, finetune, step, base_sha256
    if not {"run_id", "init_from", "finetune"} <= set(trained_on):
        raise UserError(f"{adapter_dir}/adapter_config.json does not say which base it was trained on (no run_id, init_from and "
                        f"finetune in its metadata): it was not saved by train.py; load it with support.adapters.load_adapter")
    for key in ("run_id", "init_from", "finetune", "base_sha256", "tokenizer"):
        if key in trained_on and not isinstance(trained_on[key], str):
            raise UserError(f"{adapter_dir}/adapter_config.json: metadata {key!r} is {json.dumps(trained_on[key])}, but must be a string")
    summary_path = os.path.join(adapter_dir, "summary.json")
    if os.path.isfile(summary_path):  # the folder's summary must describe this adapter's run, not another one
        summary = read_json(summary_path, ["run_id"], what="summary of a train.py run")
        if summary["run_id"] != trained_on["run_id"]:
            raise UserError(f"{summary_path} is from run {summary['run_id']} but the adapter in {adapter_dir} from run "
                            f"{trained_on['run_id']}: the folder mixes two runs' files; train again in an empty --out_dir")
    init_from = trained_on["init_from"] if init_from == "tiny" else init_from
    try:
        model, tokenizer_name = load_base_model(init_from, device, pretrain=False)
    except FileNotFoundError as e:
        raise UserError(f"the adapter in {adapter_dir} was trained on {init_from}, which cannot be loaded ({e}); a base made "
                        f"again would be another model, so give --init_from the base it was trained on") from None
    check_base(adapter_dir, trained_on, init_from, weights_sha256(model), tokenizer_name)
    if trained_on["finetune"] == "qlora":
        from quantize import quantize_model

        quantize_model(model)
    load_adapter(model, adapter_dir)
    return model.eval(), tokenizer_name


def check_base(adapter_dir, trained_on, init_from, base_sha256, tokenizer_name):
    """An adapter is loaded only on the base it was trained on: the same tokenizer and the same weights (the
    fingerprint it recorded). An adapter saved before adapters recorded one is loaded with a note that it is unchecked."""
    if trained_on.get("tokenizer", tokenizer_name) != tokenizer_name:
        raise UserError(f"the adapter in {adapter_dir} was trained on a base with the {trained_on['tokenizer']} tokenizer, but "
                        f"{init_from} uses the {tokenizer_name} tokenizer; give --init_from the base it was trained on")
    if "base_sha256" not in trained_on:
        print(f"note: {adapter_dir}/adapter_config.json records no fingerprint of its base (saved by an older version), so "
              f"whether {init_from} is the base it was trained on is not checked")
    elif trained_on["base_sha256"] != base_sha256:
        raise UserError(f"the adapter in {adapter_dir} was trained on a base whose weights have fingerprint "
                        f"{trained_on['base_sha256'][:16]}, but {init_from} now holds weights {base_sha256[:16]} (pretrained "
                        f"again, or another model); give --init_from the base it was trained on, or train the adapter again on this one")


def load_data(cfg, tokenizer_name, block_size):
    """The data of a train.py job (cfg: its TrainConfig) -> (data, tokenizer, prompt template): windows of the standard
    library's text to pretrain on (corpus.PretrainingData), or prompt + response examples whose response tokens are
    the targets (instructions.InstructionData; --mask_prompt)."""
    from support.corpus import PretrainingData
    from support.answers import check_max_new_tokens
    from support.instructions import InstructionData, resolve_template
    from support.tokenizer import get_tokenizer

    tokenizer, template = get_tokenizer(tokenizer_name), resolve_template(cfg.prompt_template, tokenizer_name)
    if cfg.pretraining:
        return PretrainingData(tokenizer, block_size, cfg.seed, cfg.corpus), tokenizer, template
    check_max_new_tokens(cfg.max_new_tokens, block_size)  # refused now, not when the answers after training are due
    data = InstructionData(cfg.dataset, tokenizer, block_size, cfg.seed, cfg.mask_prompt, template, pack=cfg.pack,
                           grad_accum=cfg.grad_accum, group_by_length=cfg.group_by_length)
    return data, tokenizer, template
