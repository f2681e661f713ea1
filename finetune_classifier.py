"""
Fine-tuning is for structure: turn the language model into a spam classifier (as in chapter 6 of
Raschka's "Build a Large Language Model (From Scratch)"). The model, the data and the metrics are classifier.py's;
this script trains, saves and reloads one:

    token ids -> GPT blocks -> final LayerNorm -> hidden state of the LAST real token -> head -> ham / spam

    python finetune_classifier.py                         # LoRA on the tiny base, embedded SMS sample (offline)
    python finetune_classifier.py --mode last_block       # the book's baseline: head + last block + final norm
    python finetune_classifier.py --mode qlora            # LoRA on a 4-bit NF4 base
    python finetune_classifier.py --dataset uci           # the real SMS Spam Collection, downloaded from UCI
    python finetune_classifier.py --data_path FILE        # a local copy of it (label<TAB>text per line)
    python finetune_classifier.py --classify "WIN a prize! Call 0800 now" --out_dir out/classifier

Modes (what trains; everything else stays frozen):
    head        the new head only (a linear probe of the frozen model's features)
    last_block  head + the last transformer block + the final LayerNorm (the book's baseline)
    lora        head + LoRA adapters on --lora_targets (Hu et al. 2021)
    qlora       the same on a base stored in 4-bit NF4 (Dettmers et al. 2023)
    full        every weight

`python finetune_classifier.py --help` lists every setting with its default.
"""

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

import lora
from checkpoints import load_base_model
from classifier import (LABELS, MODES, SPLIT_SEED, GPTClassifier, balance_classes, build_classifier, cache_trunk, classify, collate_activations,
                        collate_messages, encode_messages, evaluate_classifier, format_confusion, load_messages, make_batches, split_messages)
from common import (autocast_context, parse_config, peak_memory_bytes, pick_device, reset_peak_memory, save_atomic, save_figure_atomic,
                    training_state_bytes, write_csv_atomic, write_json_atomic)
from model import PRETRAINED, count_parameters
from optim import clip_gradients, lr_at_step, make_optimizer, set_learning_rate
from quantize import quantize_model
from safety import (UserError, check_finite, check_finite_settings, check_optimizer_ranges, error_line, file_sha256, load_tensor_file, lock_out_dir,
                    main_errors, new_run_id, read_json, remove_earlier_run)

DEFAULT_LEARNING_RATES = {"head": 1e-2, "last_block": 5e-4, "lora": 2e-3, "qlora": 2e-3, "full": 1e-4}


@dataclass
class ClassifierConfig:
    mode: str = field(default="lora", metadata={"help": "what trains: " + ", ".join(MODES)})
    init_from: str = field(default="tiny", metadata={"help": "'tiny' (the offline base in checkpoints/tiny-base, pretrained first if missing), one of " + ", ".join(PRETRAINED) + ", or a checkpoint file/directory of train.py"})
    dataset: str = field(default="embedded", metadata={"help": "'embedded' (data/sms_sample.tsv, 600 messages written for this repo) or 'uci' (the SMS Spam Collection, downloaded)"})
    data_path: str = field(default="", metadata={"help": "read this label<TAB>text file instead of --dataset (e.g. a local copy of the SMS Spam Collection)"})
    out_dir: str = field(default="out/classifier", metadata={"help": "where the log, plot, summary.json and trained weights go"})
    # LoRA (modes lora and qlora)
    lora_rank: int = field(default=16, metadata={"help": "rank r of each update B @ A"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator: scaling = alpha / r"})
    lora_targets: str = field(default="all-linear", metadata={"help": "comma-separated layers to adapt: q, k, v, o, mlp_in, mlp_out, or all-linear"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch's input"})
    loraplus_ratio: float = field(default=1.0, metadata={"help": "LoRA+: learning rate of B = ratio x that of A; 1 = plain LoRA"})
    # data
    max_length: int = field(default=0, metadata={"help": "truncate messages to this many tokens, keeping the start (0 = the model's block_size)"})
    split_seed: int = field(default=SPLIT_SEED, metadata={"help": "seed of the balancing and the 70/10/20 split"})
    # optimisation
    epochs: int = field(default=5, metadata={"help": "passes over the training split"})
    batch_size: int = field(default=8, metadata={"help": "messages per optimizer step"})
    learning_rate: float = field(default=0.0, metadata={"help": "peak learning rate (0 = per mode: " + ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LEARNING_RATES.items()) + ")"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "fraction of the steps spent in linear warmup"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decay ends at learning_rate x this"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decoupled weight decay, on matrices only"})
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm (0 = off)"})
    seed: int = field(default=123, metadata={"help": "seed of the head's initialisation, the adapters and the batch order"})
    cache_trunk: bool = field(default=True, metadata={"help": "compute the frozen blocks below the lowest trainable one once per message and train on their "
                                                              "outputs (modes head and last_block; same logits, epochs after the first much cheaper)"})
    # system
    device: str = field(default="auto", metadata={"help": "'auto' (cuda, then mps, then cpu), 'cuda', 'mps' or 'cpu'"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    # inference only
    classify: str = field(default=None, metadata={"help": "classify this message with the model saved in --out_dir and exit"})


def check_classifier_config(cfg):
    if cfg.mode not in MODES:
        raise ValueError(f"--mode {cfg.mode!r}: use one of {', '.join(MODES)}")
    if cfg.data_path and cfg.dataset != "embedded":
        raise ValueError(f"--data_path and --dataset {cfg.dataset} both name the data; give only one")
    if not cfg.data_path and cfg.dataset not in ("embedded", "uci"):
        raise ValueError(f"--dataset {cfg.dataset!r}: use 'embedded' or 'uci', or --data_path FILE for a local file")
    if cfg.init_from == "scratch":
        raise ValueError("--init_from scratch: a classifier starts from a pretrained model; use 'tiny', a GPT-2 name or a checkpoint")
    for name in ("epochs", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.max_length < 0:
        raise ValueError(f"--max_length must be positive (or 0 for the model's block size), got {cfg.max_length}")
    check_finite_settings(cfg)  # each setting within its valid range (train.check_values does the same for train.py)
    if cfg.lora_rank < 1:
        raise UserError(f"--lora_rank {cfg.lora_rank}: use an integer >= 1")
    check_optimizer_ranges(cfg, {"warmup_ratio": (0 <= cfg.warmup_ratio <= 1, "in [0, 1]")})
    if cfg.mode in ("lora", "qlora"):
        lora.resolve_targets(lora.parse_targets(cfg.lora_targets))  # names the first unknown target


# ---------------------------------------------------------------------------------------------- training


CLASSIFIER_FILES = ("classifier.json", "classifier.pt", "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                    "summary.json", "log.csv", "curves.png")


def train_classifier(cfg):
    """Fine-tune one classifier end to end; returns the summary also written to out_dir/summary.json. The run owns
    out_dir while it lasts (safety.lock_out_dir), and replaces an earlier run's files there once its base and data
    have loaded."""
    check_classifier_config(cfg)
    pick_device(cfg.device)  # a --device this machine lacks is refused before anything is loaded
    with lock_out_dir(cfg.out_dir):
        return run_classifier_training(cfg)


def run_classifier_training(cfg):
    """train_classifier() without the lock."""
    from tokenizer import get_tokenizer

    device = pick_device(cfg.device)
    run_id = new_run_id()
    t_start = time.time()
    gpt, tokenizer_name = load_base_model(cfg.init_from, device)
    tokenizer = get_tokenizer(tokenizer_name)
    max_length = cfg.max_length or gpt.config.block_size
    if max_length > gpt.config.block_size:
        raise ValueError(f"--max_length {max_length} is longer than the model's block_size {gpt.config.block_size}; use at most that")

    messages = load_messages(cfg.data_path, cfg.dataset)
    train_set, val_set, test_set = split_messages(balance_classes(messages, cfg.split_seed), cfg.split_seed)
    splits, truncated = {}, {}
    for name, subset in (("train", train_set), ("val", val_set), ("test", test_set)):
        splits[name], truncated[name] = encode_messages(subset, tokenizer, max_length)
    if not splits["val"] or not splits["test"]:
        raise ValueError(f"{len(messages)} messages leave no validation or test examples; the data needs at least 5 messages per class")
    print(f"{len(messages):,} messages -> balanced {len(train_set) + len(val_set) + len(test_set):,} -> "
          f"{len(train_set)} train / {len(val_set)} validation / {len(test_set)} test"
          + (f"; {sum(truncated.values())} cut to {max_length} tokens" if sum(truncated.values()) else ""))

    torch.manual_seed(cfg.seed)
    fingerprint = base_fingerprint(gpt)
    model = build_classifier(gpt, cfg.mode, cfg.lora_rank, cfg.lora_alpha, lora.parse_targets(cfg.lora_targets), cfg.lora_dropout)
    trainable, total = count_parameters(model)
    print(f"{cfg.mode}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%) on {device}")
    remove_earlier_run(cfg.out_dir, CLASSIFIER_FILES)

    steps_per_epoch = -(-len(splits["train"]) // cfg.batch_size)
    max_iters = cfg.epochs * steps_per_epoch
    peak_lr = cfg.learning_rate or DEFAULT_LEARNING_RATES[cfg.mode]
    warmup_iters = max(1, int(cfg.warmup_ratio * max_iters))
    optimizer = make_optimizer(model, peak_lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.loraplus_ratio)
    pad = tokenizer.eot_token
    from_block = model.frozen_blocks() if cfg.cache_trunk else 0
    t_cache = time.time()
    if from_block:  # train and evaluate on the frozen blocks' outputs, computed once here
        splits = {name: cache_trunk(model, rows, from_block, cfg.batch_size, pad, device) for name, rows in splits.items()}
        print(f"cached the outputs of the frozen embeddings and blocks 0-{from_block - 1} for every message in "
              f"{time.time() - t_cache:.1f} s; each epoch runs only the layers above them (--no-cache_trunk: every layer, every epoch)")
    cache_seconds = time.time() - t_cache
    collate_rows = collate_activations if from_block else collate_messages
    eval_batches = {name: make_batches(rows, cfg.batch_size, pad, collate_rows=collate_rows) for name, rows in splits.items()}

    before = {name: evaluate_classifier(model, eval_batches[name], device, from_block) for name in ("train", "val", "test")}
    print(f"before fine-tuning: accuracy {before['train']['accuracy']:.1%} train, {before['val']['accuracy']:.1%} validation, "
          f"{before['test']['accuracy']:.1%} test (a new head guesses)")
    rows = [{"epoch": 0, "step": 0, "lr": 0.0, "train_loss": before["train"]["loss"], "train_accuracy": before["train"]["accuracy"],
             "val_loss": before["val"]["loss"], "val_accuracy": before["val"]["accuracy"], "seconds": 0.0}]

    reset_peak_memory(device)
    t0, step = time.time(), 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        batches = make_batches(splits["train"], cfg.batch_size, pad, torch.Generator().manual_seed(cfg.seed + epoch), collate_rows)
        if cfg.progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 30)
        loss_sum, correct, seen = 0.0, 0, 0
        for x, lengths, y in batches:
            lr = lr_at_step(step, peak_lr, warmup_iters, max_iters, cfg.min_lr_ratio)
            set_learning_rate(optimizer, lr)
            x, lengths, y = x.to(device), lengths.to(device), y.to(device)
            with autocast_context(device):
                logits = model(x, lengths, from_block=from_block)
            loss = F.cross_entropy(logits.float(), y)
            loss.backward()
            grad_norm = clip_gradients(model, cfg.grad_clip)
            check_finite(step + 1, f"the training loss is {loss.item():g} and the gradient norm {grad_norm:g}", [loss.item(), grad_norm],
                         last_saved_step(rows), cfg.out_dir, peak_lr)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(dim=-1) == y).sum().item()
            seen += len(y)
            if cfg.progress:
                batches.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.1%}", refresh=False)
        val = evaluate_classifier(model, eval_batches["val"], device, from_block)
        check_finite(step, f"the validation loss after epoch {epoch} is {val['loss']:g}", [val["loss"]], last_saved_step(rows), cfg.out_dir, peak_lr)
        rows.append({"epoch": epoch, "step": step, "lr": lr, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                     "val_loss": val["loss"], "val_accuracy": val["accuracy"], "seconds": round(time.time() - t0, 3)})
        print(f"epoch {epoch}: train loss {loss_sum / seen:.4f}, accuracy {correct / seen:.1%} (during the epoch) | "
              f"validation loss {val['loss']:.4f}, accuracy {val['accuracy']:.1%}")
        save_trained(model, cfg, tokenizer_name, max_length, fingerprint, run_id)
        write_csv_atomic(rows, os.path.join(cfg.out_dir, "log.csv"), list(rows[0]))
        plot_curves(rows, os.path.join(cfg.out_dir, "curves.png"), f"{cfg.mode} on {describe_data(cfg)}")
    seconds = time.time() - t0
    peak = peak_memory_bytes(device)

    after = {name: evaluate_classifier(model, eval_batches[name], device, from_block) for name in ("train", "val", "test")}
    check_finite(step, "the train / validation / test loss after training is " + " / ".join(f"{after[n]['loss']:g}" for n in after),
                 [after[name]["loss"] for name in after], last_saved_step(rows), cfg.out_dir, peak_lr)
    summary = {
        "mode": cfg.mode, "init_from": cfg.init_from, "dataset": describe_data(cfg), "device": device,
        "lora_rank": cfg.lora_rank if cfg.mode in ("lora", "qlora") else None,
        "lora_alpha": cfg.lora_alpha if cfg.mode in ("lora", "qlora") else None,
        "lora_targets": cfg.lora_targets if cfg.mode in ("lora", "qlora") else None,
        "trainable_params": trainable, "total_params": total, "trainable_fraction": trainable / total,
        "train_examples": len(splits["train"]), "val_examples": len(splits["val"]), "test_examples": len(splits["test"]),
        "truncated_examples": sum(truncated.values()), "max_length": max_length,
        **{f"{name}_accuracy": after[name]["accuracy"] for name in ("train", "val", "test")},
        **{f"{name}_loss": after[name]["loss"] for name in ("train", "val", "test")},
        **{f"{name}_accuracy_before": before[name]["accuracy"] for name in ("train", "val", "test")},
        "confusion_matrix": {"labels": list(LABELS), "rows": "true class", "columns": "predicted class",
                             **{name: after[name]["confusion"] for name in ("train", "val", "test")}},
        "epochs": cfg.epochs, "steps": step, "learning_rate": peak_lr,
        "seconds": round(seconds, 3), "total_seconds": round(time.time() - t_start, 3),
        "cached_blocks": from_block, "trunk_cache_seconds": round(cache_seconds, 3),
        "peak_memory_bytes": peak, "training_state_bytes": training_state_bytes(model, optimizer), "config": asdict(cfg), "run_id": run_id,
    }
    write_json_atomic(summary, os.path.join(cfg.out_dir, "summary.json"))
    print(f"\naccuracy: train {summary['train_accuracy']:.1%}, validation {summary['val_accuracy']:.1%}, test {summary['test_accuracy']:.1%} "
          f"(test before fine-tuning: {summary['test_accuracy_before']:.1%})")
    print(f"test confusion matrix:\n{format_confusion(after['test']['confusion'])}")
    print(f"{cfg.mode}: {trainable:,} trainable / {total:,} total parameters; {seconds:.0f} s of training, "
          f"peak memory {peak / 2**20:.0f} MiB; outputs in {cfg.out_dir}")
    return summary


def last_saved_step(rows):
    """The step of the run's last save: each epoch (not row 0, before training) ends with one."""
    return rows[-1]["step"] if rows[-1]["epoch"] else None


def describe_data(cfg):
    return cfg.data_path or cfg.dataset


# ---------------------------------------------------------------------------------------------- outputs


def plot_curves(rows, path, title):
    """Loss and accuracy per epoch, train next to validation (epoch 0: before fine-tuning)."""
    from matplotlib.figure import Figure  # no pyplot: works headless and leaves a notebook's backend alone

    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2)
    for ax, metric, label in ((axes[0], "loss", "cross-entropy"), (axes[1], "accuracy", "accuracy")):
        ax.plot(epochs, [r[f"train_{metric}"] for r in rows], "o-", label="train")
        ax.plot(epochs, [r[f"val_{metric}"] for r in rows], "s--", label="validation")
        ax.set(xlabel="epoch (0 = before fine-tuning)", ylabel=label)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure_atomic(fig, path)


def base_fingerprint(gpt):
    """(parameter count, sum of squared weights) of a base model: cheap, and different for a retrained base."""
    tensors = list(gpt.state_dict().values())
    return [sum(t.numel() for t in tensors), sum(float(t.detach().cpu().double().square().sum()) for t in tensors)]


def save_trained(model, cfg, tokenizer_name, max_length, fingerprint, run_id=None):
    """Save what fine-tuning changed, and how to rebuild the rest. LoRA modes: the adapter directory (A, B and
    the head, via lora.save_adapter). Other modes: the trained tensors in classifier.pt. classifier.json
    names the base, so --classify can load base + trained parts. It is written last and records the run id and
    the SHA-256 of the weights file written before it: a folder left half-updated by a killed run is refused."""
    init_from = os.path.abspath(cfg.init_from) if os.path.exists(cfg.init_from) else cfg.init_from
    info = {"mode": cfg.mode, "init_from": init_from, "tokenizer": tokenizer_name, "labels": list(LABELS), "max_length": max_length,
            "base_fingerprint": fingerprint, "run_id": run_id}
    if cfg.mode in ("lora", "qlora"):
        weights_path = lora.save_adapter(model, os.path.join(cfg.out_dir, "adapter"), metadata={"run_id": run_id})
    else:
        weights_path = os.path.join(cfg.out_dir, "classifier.pt")
        save_atomic({n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}, weights_path)
    info["weights_sha256"] = file_sha256(weights_path)
    write_json_atomic(info, os.path.join(cfg.out_dir, "classifier.json"))


def load_classifier(out_dir, device="cpu"):
    """A classifier saved by train_classifier -> (model in eval mode, tokenizer, info from classifier.json)."""
    from tokenizer import get_tokenizer

    info_path = os.path.join(out_dir, "classifier.json")
    if not os.path.isfile(info_path):
        raise FileNotFoundError(f"no classifier in {out_dir} ({info_path} missing); train one with `python finetune_classifier.py --out_dir {out_dir}`")
    needed = ("mode", "init_from", "tokenizer", "labels", "max_length", "base_fingerprint", "run_id", "weights_sha256")
    info = read_json(info_path, needed, what="classifier description written by finetune_classifier.py (train it again)")
    if info["mode"] not in MODES:
        raise UserError(f"{info_path}: 'mode' is {info['mode']!r}, but must be one of {', '.join(MODES)}")
    if info["labels"] != list(LABELS):
        raise ValueError(f"{out_dir} was trained with labels {info['labels']}, this script classifies {list(LABELS)}")
    weights_path = os.path.join(out_dir, "adapter", lora.ADAPTER_WEIGHTS) if info["mode"] in ("lora", "qlora") else os.path.join(out_dir, "classifier.pt")
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"{weights_path} is missing: {info_path} says it holds the trained weights; train the classifier again")
    if file_sha256(weights_path) != info["weights_sha256"]:
        raise UserError(f"{weights_path} is not the file {info_path} was saved with (its checksum differs: a run killed while "
                        f"saving, or files copied in by hand); train the classifier again")
    summary_path = os.path.join(out_dir, "summary.json")
    if os.path.isfile(summary_path) and read_json(summary_path, ["run_id"], what="classifier summary")["run_id"] != info["run_id"]:
        raise UserError(f"{summary_path} and {info_path} come from different runs; train the classifier again in an empty --out_dir")
    gpt, tokenizer_name = load_base_model(info["init_from"], device)
    count, square_sum = base_fingerprint(gpt)
    if count != info["base_fingerprint"][0] or not math.isclose(square_sum, info["base_fingerprint"][1], rel_tol=1e-6):
        raise ValueError(f"the base model at {info['init_from']} is not the one {out_dir} was trained on (its weights differ); "
                         f"retrain the classifier, or restore that base")
    if info["mode"] in ("lora", "qlora"):
        model = GPTClassifier(gpt).to(device)
        if info["mode"] == "qlora":
            quantize_model(model, skip=("head",))
        lora.load_adapter(model, os.path.join(out_dir, "adapter"))  # adds the adapters and fills in A, B and the head
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


def parse_args(argv=None):
    return parse_config(ClassifierConfig, argv, __doc__)


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.classify is not None:
        if not cfg.classify.strip():
            raise UserError("--classify is empty: give the message to classify, e.g. --classify \"WIN a free cruise! Call now\"")
        device = pick_device(cfg.device)
        model, tokenizer, info = load_classifier(cfg.out_dir, device)
        label, probability = classify(model, tokenizer, cfg.classify, info["max_length"], device)
        print(f"{label} (probability {probability:.3f})")
        return label, probability
    return train_classifier(cfg)


if __name__ == "__main__":
    try:
        main()
    except main_errors() as e:
        sys.exit(error_line(e))
