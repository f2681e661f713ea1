"""
The models the programs start from, and the files train.py leaves:

- load_base_model: 'tiny' (the offline byte-level base in checkpoints/tiny-base), a GPT-2 name or HF directory, or a
  checkpoint written by train.py -> (GPT, tokenizer name);
- ensure_tiny_base: the tiny base, pretrained first (by running `python train.py --init_from scratch --dataset stdlib`
  in a child process) if it is missing or its pretraining was interrupted;
- load_finetuned: a base with the LoRA adapter of a train.py run loaded into it (quantized again for QLoRA).

finetune_classifier.py, the experiments and the notebooks start from these as train.py does, without importing it.
"""

import os

import torch

from common import REPO_DIR, run_script
from model import GPT, PRETRAINED, GPTConfig
from safety import UserError, load_tensor_file, read_json

TINY_BASE_DIR = os.path.join(REPO_DIR, "checkpoints", "tiny-base")



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
    model.load_weights(ckpt["model"])
    bad = next((k for k, v in ckpt["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise UserError(f"{path}: tensor {bad!r} holds NaN or infinite values; the training that saved it diverged")
    return model.to(device), ckpt["tokenizer"]


def ensure_tiny_base(device="cpu"):
    """The default starting point: pretrain the tiny base on the stdlib corpus if it is not there yet, and finish
    it if an earlier pretraining was interrupted (its checkpoint is then from before the last step)."""
    path = os.path.join(TINY_BASE_DIR, "ckpt.pt")
    if not os.path.isfile(path) and "RANK" in os.environ:  # every torchrun process would pretrain (and write) it at once
        raise FileNotFoundError(f"no tiny base model at {path}: pretrain it first in one process (python train.py --init_from scratch "
                                f"--dataset stdlib --out_dir {os.path.relpath(TINY_BASE_DIR)}), then start torchrun")
    if not os.path.isfile(path):
        print(f"No tiny base model at {path}: pretraining it first on the standard library's docstrings "
              f"(a few minutes on a laptop CPU; `python train.py --init_from scratch --dataset stdlib --out_dir {os.path.relpath(TINY_BASE_DIR)}` does the same).")
        run_script("train.py", {"init_from": "scratch", "dataset": "stdlib", "out_dir": TINY_BASE_DIR, "device": device})
    else:
        ckpt = load_tensor_file(path, fix=f"delete {TINY_BASE_DIR} to pretrain the tiny base again")
        if "iter" not in ckpt or "max_iters" not in ckpt.get("train_config", {}):
            raise UserError(f"{path} records no training progress (iter, train_config): it is not a checkpoint of train.py; "
                            f"delete {TINY_BASE_DIR} to pretrain the tiny base again")
        done, planned = ckpt["iter"], ckpt["train_config"]["max_iters"]
        if done < planned:
            print(f"The tiny base at {path} stopped at step {done} of {planned}: resuming its pretraining first.")
            run_script("train.py", {**ckpt["train_config"], "resume": True, "device": device, "out_dir": TINY_BASE_DIR})
    return path


def load_base_model(init_from, device="cpu"):
    """'tiny' | a GPT-2 name or HF directory | a checkpoint of train.py -> (GPT, tokenizer name)."""
    if init_from == "tiny":
        return load_checkpoint_model(ensure_tiny_base(device), device)
    if init_from in PRETRAINED or os.path.isfile(os.path.join(init_from, "model.safetensors")):
        return GPT.from_pretrained(init_from).to(device), "gpt2"
    if os.path.exists(init_from):
        return load_checkpoint_model(init_from, device)
    raise ValueError(f"--init_from {init_from!r}: use 'tiny', 'scratch', one of {', '.join(PRETRAINED)}, or an existing checkpoint path")


def load_finetuned(adapter_dir, init_from, device):
    """The base model with a LoRA adapter from `adapter_dir` loaded into it -> (model, tokenizer name), in eval mode.
    init_from "tiny" means: the base the adapter was trained on (recorded in its adapter_config.json). A QLoRA adapter
    learned to correct a 4-bit base, so the base is quantized again (deterministically: the same codes as in training)."""
    from lora import load_adapter, read_adapter_config

    config = read_adapter_config(adapter_dir)
    trained_on = config["metadata"]  # written by train.save_checkpoint: run_id, init_from, finetune, step
    if not {"run_id", "init_from", "finetune"} <= set(trained_on):
        raise UserError(f"{adapter_dir}/adapter_config.json does not say which base it was trained on (no run_id, init_from and "
                        f"finetune in its metadata): it was not saved by train.py; load it with lora.load_adapter")
    summary_path = os.path.join(adapter_dir, "summary.json")
    if os.path.isfile(summary_path):  # the folder's summary must describe this adapter's run, not another one
        summary = read_json(summary_path, ["run_id"], what="summary of a train.py run")
        if summary["run_id"] != trained_on["run_id"]:
            raise UserError(f"{summary_path} is from run {summary['run_id']} but the adapter in {adapter_dir} from run "
                            f"{trained_on['run_id']}: the folder mixes two runs' files; train again in an empty --out_dir")
    init_from = trained_on["init_from"] if init_from == "tiny" else init_from
    model, tokenizer_name = load_base_model(init_from, device)
    if trained_on["finetune"] == "qlora":
        from quantize import quantize_model

        quantize_model(model)
    load_adapter(model, adapter_dir)
    return model.eval(), tokenizer_name
