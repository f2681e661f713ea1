"""
What finetune_classifier.py saves and --classify loads: the trained parts (LoRA modes: an adapter directory; other
modes: classifier.pt), then classifier.json, written last, naming the base (and its weights' fingerprint), the run id
and the SHA-256 of the weights file: a half-updated folder or a retrained base is refused.
"""

import os

import torch

from quantize import quantize_model
from support.adapters import ADAPTER_WEIGHTS, load_adapter, save_adapter
from support.checkpoints import load_base_model, weights_sha256
from support.files import UserError, file_sha256, load_tensor_file, read_json, save_atomic, write_json_atomic
from support.sms_data import LABELS
from support.tokenizer import get_tokenizer


def weights_path_of(out_dir, mode):
    adapter = mode in ("lora", "qlora")
    return os.path.join(out_dir, "adapter", ADAPTER_WEIGHTS) if adapter else os.path.join(out_dir, "classifier.pt")


def save_trained(model, cfg, tokenizer_name, max_length, base_sha256, run_id=None):
    """The trained parts, then classifier.json: how to rebuild the rest, and on no other base."""
    weights_path = weights_path_of(cfg.out_dir, cfg.mode)
    if cfg.mode in ("lora", "qlora"):
        save_adapter(model, os.path.dirname(weights_path), metadata={"run_id": run_id})
    else:
        save_atomic({n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}, weights_path)
    init_from = os.path.abspath(cfg.init_from) if os.path.exists(cfg.init_from) else cfg.init_from
    info = dict(mode=cfg.mode, init_from=init_from, tokenizer=tokenizer_name, labels=list(LABELS))
    info |= dict(max_length=max_length, base_sha256=base_sha256, run_id=run_id)
    info["weights_sha256"] = file_sha256(weights_path)
    write_json_atomic(info, os.path.join(cfg.out_dir, "classifier.json"))


def load_classifier(out_dir, device="cpu"):
    """A classifier saved by save_trained -> (model in eval mode, tokenizer, info from classifier.json)."""
    from finetune_classifier import MODES, GPTClassifier, build_classifier  # imported late: it imports us

    info_path, again = os.path.join(out_dir, "classifier.json"), "train the classifier again"
    if not os.path.isfile(info_path):
        raise FileNotFoundError(f"no classifier in {out_dir}: train one with finetune_classifier.py --out_dir")
    needed = ("mode", "init_from", "tokenizer", "labels", "max_length", "base_sha256", "run_id", "weights_sha256")
    info = read_json(info_path, needed, what=f"classifier description written by finetune_classifier.py ({again})")
    if info["mode"] not in MODES or info["labels"] != list(LABELS):
        raise UserError(f"{info_path}: mode {info['mode']!r} or labels {info['labels']} are not ours; {again}")
    weights_path = weights_path_of(out_dir, info["mode"])
    if not os.path.isfile(weights_path) or file_sha256(weights_path) != info["weights_sha256"]:
        raise UserError(f"{weights_path} is not the file {info_path} was saved with (missing or changed); {again}")
    summary_path = os.path.join(out_dir, "summary.json")
    summary = read_json(summary_path, ["run_id"], what="classifier summary") if os.path.isfile(summary_path) else info
    if summary["run_id"] != info["run_id"]:
        raise UserError(f"{summary_path} and {info_path} come from different runs; {again} in an empty --out_dir")
    gpt, tokenizer_name = load_base_model(info["init_from"], device)
    if weights_sha256(gpt) != info["base_sha256"]:
        raise UserError(f"the base at {info['init_from']} is not the one {out_dir} was trained on; {again}")
    if info["mode"] in ("lora", "qlora"):
        model = GPTClassifier(gpt).to(device)
        if info["mode"] == "qlora":
            quantize_model(model, skip=("head",))
        load_adapter(model, os.path.dirname(weights_path))  # adds the adapters, fills in A, B and the head
    else:
        model = build_classifier(gpt, info["mode"])
        trained = load_tensor_file(weights_path, what="classifier weights file", fix=again)
        expected = {n for n, p in model.named_parameters() if p.requires_grad}
        finite = [
            torch.is_tensor(v) and v.is_floating_point() and bool(torch.isfinite(v).all()) for v in trained.values()
        ]
        if set(trained) != expected or not all(finite):
            raise UserError(f"{weights_path}: not the finite tensors mode {info['mode']} trains; {again}")
        model.load_state_dict({n: v.to(device) for n, v in trained.items()}, strict=False)
    return model.eval().requires_grad_(False), get_tokenizer(tokenizer_name), info
