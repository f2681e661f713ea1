"""
What finetune_classifier.py saves and --classify loads back: the trained parts (LoRA modes: the adapter directory,
via support.adapters.save_adapter; other modes: classifier.pt), and classifier.json, which names the base and is written last,
recording the run id and the SHA-256 of the weights written before it, so a folder left half-updated by a killed
run is refused. The base is recognised by the SHA-256 of its weights (checkpoints.weights_sha256, as an adapter of
train.py's is): a retrained base at the same path is refused.
"""

import os

import torch

import lora
from quantize import quantize_model
from support.adapters import ADAPTER_WEIGHTS, load_adapter, save_adapter
from support.checkpoints import load_base_model, weights_sha256
from support.common import save_atomic, write_json_atomic
from support.safety import UserError, file_sha256, load_tensor_file, read_json
from support.sms_data import LABELS
from support.tokenizer import get_tokenizer


def save_trained(model, cfg, tokenizer_name, max_length, base_sha256, run_id=None):
    """Save what fine-tuning changed, and how to rebuild the rest. LoRA modes: the adapter directory (A, B and
    the head, via support.adapters.save_adapter). Other modes: the trained tensors in classifier.pt. classifier.json
    names the base and records its SHA-256 (base_sha256), so --classify can load base + trained parts, and on no
    other base. It is written last and records the run id and the SHA-256 of the weights file written before it: a
    folder left half-updated by a killed run is refused."""
    init_from = os.path.abspath(cfg.init_from) if os.path.exists(cfg.init_from) else cfg.init_from
    info = {"mode": cfg.mode, "init_from": init_from, "tokenizer": tokenizer_name, "labels": list(LABELS), "max_length": max_length,
            "base_sha256": base_sha256, "run_id": run_id}
    if cfg.mode in ("lora", "qlora"):
        weights_path = save_adapter(model, os.path.join(cfg.out_dir, "adapter"), metadata={"run_id": run_id})
    else:
        weights_path = os.path.join(cfg.out_dir, "classifier.pt")
        save_atomic({n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}, weights_path)
    info["weights_sha256"] = file_sha256(weights_path)
    write_json_atomic(info, os.path.join(cfg.out_dir, "classifier.json"))


def load_classifier(out_dir, device="cpu"):
    """A classifier saved by train_classifier -> (model in eval mode, tokenizer, info from classifier.json)."""
    from finetune_classifier import MODES, GPTClassifier, build_classifier  # the program's model (imported late: it imports us)

    info_path = os.path.join(out_dir, "classifier.json")
    if not os.path.isfile(info_path):
        raise FileNotFoundError(f"no classifier in {out_dir} ({info_path} missing); train one with `python finetune_classifier.py --out_dir {out_dir}`")
    needed = ("mode", "init_from", "tokenizer", "labels", "max_length", "base_sha256", "run_id", "weights_sha256")
    info = read_json(info_path, needed, what="classifier description written by finetune_classifier.py (train it again)")
    if info["mode"] not in MODES:
        raise UserError(f"{info_path}: 'mode' is {info['mode']!r}, but must be one of {', '.join(MODES)}")
    if info["labels"] != list(LABELS):
        raise ValueError(f"{out_dir} was trained with labels {info['labels']}, this script classifies {list(LABELS)}")
    weights_path = os.path.join(out_dir, "adapter", ADAPTER_WEIGHTS) if info["mode"] in ("lora", "qlora") else os.path.join(out_dir, "classifier.pt")
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"{weights_path} is missing: {info_path} says it holds the trained weights; train the classifier again")
    if file_sha256(weights_path) != info["weights_sha256"]:
        raise UserError(f"{weights_path} is not the file {info_path} was saved with (its checksum differs: a run killed while "
                        f"saving, or files copied in by hand); train the classifier again")
    summary_path = os.path.join(out_dir, "summary.json")
    if os.path.isfile(summary_path) and read_json(summary_path, ["run_id"], what="classifier summary")["run_id"] != info["run_id"]:
        raise UserError(f"{summary_path} and {info_path} come from different runs; train the classifier again in an empty --out_dir")
    gpt, tokenizer_name = load_base_model(info["init_from"], device)
    if weights_sha256(gpt) != info["base_sha256"]:
        raise ValueError(f"the base model at {info['init_from']} is not the one {out_dir} was trained on (its weights differ); "
                         f"retrain the classifier, or restore that base")
    if info["mode"] in ("lora", "qlora"):
        model = GPTClassifier(gpt).to(device)
        if info["mode"] == "qlora":
            quantize_model(model, skip=("head",))
        load_adapter(model, os.path.join(out_dir, "adapter"))  # adds the adapters and fills in A, B and the head
    else:
        model = build_classifier(gpt, info["mode"])
        trained = load_tensor_file(weights_path, what="classifier weights file", fix="train the classifier again")
        expected = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(trained) != expected:
            raise KeyError(f"{out_dir}/classifier.pt holds {len(trained)} tensors but mode {info['mode']} trains {len(expected)}; is the base in classifier.json the one it was trained on?")
        bad = next((n for n, v in trained.items() if not (torch.is_tensor(v) and v.is_floating_point() and torch.isfinite(v).all())), None)
        if bad is not None:
            raise UserError(f"{weights_path}: {bad!r} is not a tensor of finite floats; train the classifier again")
        model.load_state_dict({n: v.to(device) for n, v in trained.items()}, strict=False)
    return model.eval().requires_grad_(False), get_tokenizer(tokenizer_name), info
