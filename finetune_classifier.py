"""
Fine-tuning is for structure: turn the language model into a spam classifier (chapter 6 of Raschka's "Build a
Large Language Model (From Scratch)").

    token ids -> GPT blocks -> final LayerNorm -> hidden state of the LAST real token -> head -> ham / spam

A GPT's output head maps each position's hidden state to next-token logits (n_embd -> vocab_size). A classifier
swaps it for a new, much smaller head (n_embd -> 2) and reads only the last real token: with causal attention it is
the one position that has seen the whole message, and the padding after it cannot change what it sees.

    python finetune_classifier.py                         # LoRA on the tiny base, embedded SMS sample (offline)
    python finetune_classifier.py --mode last_block       # the book's baseline: head + last block + final norm
    python finetune_classifier.py --mode qlora            # LoRA on a 4-bit NF4 base
    python finetune_classifier.py --mode qlora --dequantize kernel   # the same values, dequantized by a C loop
    python finetune_classifier.py --dataset uci           # the real SMS Spam Collection, downloaded from UCI
    python finetune_classifier.py --dataset FILE          # a local copy of it (label<TAB>text per line)
    python finetune_classifier.py --classify "WIN a prize! Call 0800 now" --out_dir out/classifier

Modes (what trains; everything else stays frozen):
    head        the new head only (a linear probe of the frozen model's features)
    last_block  head + the last transformer block + the final LayerNorm (the book's baseline)
    lora        head + LoRA adapters on --lora_targets (Hu et al. 2021)
    qlora       the same on a base stored in 4-bit NF4 (Dettmers et al. 2023)
    full        every weight
"""

import functools
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from model import count_parameters
from quantize import quantize_model
from support.checkpoints import load_base_model, weights_sha256
from support.classifier_files import load_classifier, save_trained
from support.cli import check_classifier_config, error_line, main_errors, parse_config
from support.fast_dequantize import use_fast_dequantize
from support.files import UserError
from support.optim import clip_gradients, lr_at_step, make_optimizer, set_learning_rate
from support.reports import write_classifier_log, write_classifier_summary
from support.runs import (
    autocast_context,
    check_finite,
    lock_out_dir,
    new_run_id,
    peak_memory_bytes,
    pick_device,
    remove_earlier_run,
    reset_peak_memory,
)
from support.sms_data import (
    LABELS,
    SPLIT_SEED,
    balance_classes,
    collate_activations,
    collate_messages,
    encode_messages,
    evaluate_classifier,
    load_messages,
    make_batches,
    split_messages,
)
from support.tokenizer import get_tokenizer

MODES = ("head", "last_block", "lora", "qlora", "full")
DEFAULT_LEARNING_RATES = {"head": 1e-2, "last_block": 5e-4, "lora": 2e-3, "qlora": 2e-3, "full": 1e-4}
CLASSIFIER_FILES = (
    "classifier.json",
    "classifier.pt",
    "adapter/adapter_model.safetensors",  # what a run writes
    "adapter/adapter_config.json",
    "summary.json",
    "log.csv",
    "curves.png",
)


@dataclass
class ClassifierConfig:
    # the job: what to start from, what to learn, where the results go
    mode: Literal[MODES] = "lora"  # what trains (the list above); qlora: LoRA on a base in 4-bit NF4
    init_from: str = "tiny"  # 'tiny' (checkpoints/tiny-base, pretrained first if missing), gpt2 / gpt2-medium / ...,
    #   an HF GPT-2 directory, or the out_dir of a train.py pretraining or full fine-tuning run
    dataset: str = "embedded"  # 'embedded' (data/sms_sample.tsv), 'uci' (downloaded into data/downloads/), or a
    #   label<TAB>text file such as UCI's SMSSpamCollection (--data_path: the same)
    out_dir: str = "out/classifier"  # where the log, plot, summary.json and trained weights go
    # LoRA (modes lora and qlora)
    lora_rank: int = 16  # rank r of each update B @ A
    lora_alpha: float = 0.0  # scaling = alpha / r; default (0): 2 x rank, so alpha / r = 2 at every rank (as in
    #   train.py)
    lora_targets: str = "all-linear"  # comma-separated layers to adapt: q, k, v, o, mlp_in, mlp_out, or all-linear
    lora_dropout: float = 0.0  # dropout on the LoRA branch's input
    loraplus_ratio: float = 1.0  # LoRA+: B learns at this many times A's rate (arXiv 2402.12354 suggests 16)
    dequantize: Literal["reference", "table", "kernel"] = "reference"  # mode qlora: a faster way to the same values
    # data
    max_length: int = 0  # truncate messages to this many tokens, keeping the start; default (0): the model's block_size
    split_seed: int = SPLIT_SEED  # seed of the class balancing and the 70/10/20 split
    # optimisation
    epochs: int = 5  # passes over the training split
    batch_size: int = 8  # messages per optimizer step
    learning_rate: float = 0.0  # peak rate; default (0): the mode's, head 1e-2, last_block 5e-4, (q)lora 2e-3,
    #   full 1e-4
    warmup_ratio: float = 0.05  # fraction of the steps spent in linear warmup
    min_lr_ratio: float = 0.1  # cosine decay ends at learning_rate x this
    weight_decay: float = 0.1  # AdamW decoupled weight decay, on matrices only
    beta1: float = 0.9  # AdamW's decay rate of the gradient's running mean
    beta2: float = 0.999  # AdamW's decay rate of the squared gradient's running mean
    grad_clip: float = 1.0  # clip the global gradient norm; 0 = off
    seed: int = 123  # seed of the head's initialisation, the adapters and the batch order
    # runtime
    device: str = "auto"  # 'auto' (cuda, then mps, then cpu), 'cuda' (or cuda:N), 'mps' or 'cpu'
    progress: bool = True  # show a progress bar
    cache_trunk: bool = True  # modes head and last_block: run the frozen lower blocks once per message, not per epoch
    # classify with a trained classifier (trains nothing)
    classify: str = None  # classify this message with the classifier saved in --out_dir, and exit


# ---------------------------------------------------------------------------------------------- the model


class GPTClassifier(nn.Module):
    """A GPT with its language-model head swapped for a classification head on the last real token. The GPT keeps
    its lm_head (tied to the token embedding, so it costs nothing) but never calls it."""

    def __init__(self, gpt, num_classes=len(LABELS)):
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.n_embd, num_classes)

    def forward(self, idx, lengths=None):
        """(B, T) right-padded token ids and each row's real length -> (B, num_classes) logits. Without lengths every
        row is unpadded and its last position is read."""
        return self.head_on_last_token(self.gpt.hidden_states(idx), lengths)  # hidden states: (B, T, n_embd)

    def head_on_last_token(self, hidden, lengths):
        if lengths is None:
            return self.head(hidden[:, -1])
        lengths = lengths.to(hidden.device)
        if lengths.shape != (hidden.size(0),) or lengths.min() < 1 or lengths.max() > hidden.size(1):
            raise ValueError(f"lengths must hold one length in 1..{hidden.size(1)} per row, got {lengths.tolist()}")
        last = hidden[torch.arange(hidden.size(0), device=hidden.device), lengths - 1]  # (B, n_embd)
        return self.head(last)

    # Frozen-trunk caching (modes head and last_block): the blocks below what trains compute the same in every epoch,
    # so cache_trunk runs them once per message (trunk) and training runs the rest (forward_from_block).

    def trunk(self, idx, n_blocks):
        """(B, T) token ids -> the (B, T, n_embd) residual stream entering block n_blocks: the first steps of
        GPT.hidden_states (embeddings, then blocks 0 .. n_blocks - 1)."""
        transformer = self.gpt.transformer
        x = transformer.drop(transformer.wte(idx) + transformer.wpe(torch.arange(idx.size(1), device=idx.device)))
        for block in transformer.h[:n_blocks]:
            x = block(x)
        return x

    def forward_from_block(self, x, lengths, block):
        """The residual stream entering `block` (trunk(idx, block)) -> the logits forward(idx, lengths) gives: the
        model's own blocks `block`.. and final norm run on it."""
        for later_block in self.gpt.transformer.h[block:]:
            x = later_block(x)
        return self.head_on_last_token(self.gpt.transformer.ln_f(x), lengths)

    def frozen_blocks(self):
        """How many blocks, counted from the input, compute the same function in every epoch: nothing in them or below
        them trains (a prefix-tuning wrapper trains), and no dropout makes them random. Their outputs can be computed
        once per message (cache_trunk): 0 for lora, qlora and full; n_layer - 1 for last_block; n_layer for head."""
        gpt = self.gpt
        if gpt.config.dropout > 0:
            return 0
        if any(p.requires_grad for p in (*gpt.transformer.wte.parameters(), *gpt.transformer.wpe.parameters())):
            return 0
        frozen = 0
        for block in gpt.transformer.h:
            if any(p.requires_grad for p in block.parameters()):
                break
            frozen += 1
        return frozen


def build_classifier(gpt, mode, lora_rank=16, lora_alpha=None, lora_targets=("all-linear",), lora_dropout=0.0):
    """Put a new head on gpt and set requires_grad to exactly what `mode`, one of MODES, trains (see the module
    docstring). lora_alpha None: lora.apply_lora's default."""
    model = GPTClassifier(gpt).to(gpt.transformer.wte.weight.device)
    if mode in ("lora", "qlora"):
        if mode == "qlora":
            quantize_model(model, skip=("head",))  # the base goes to 4 bits; the head must stay trainable
        lora.apply_lora(
            model,
            rank=lora_rank,
            alpha=lora_alpha or None,
            targets=lora_targets,
            dropout=lora_dropout,
            trainable=("head",),
        )
        return model
    trained_with_the_head = {"head": [], "last_block": [gpt.transformer.h[-1], gpt.transformer.ln_f], "full": [gpt]}
    model.requires_grad_(False)
    for module in [model.head, *trained_with_the_head[mode]]:
        module.requires_grad_(True)
    return model


@torch.no_grad()
def cache_trunk(model, rows, n_blocks, batch_size, pad_id, device):
    """Frozen-trunk caching: [(ids, label)] -> [(activations entering block n_blocks, (length, n_embd), label)].
    In head and last_block modes the embeddings and the blocks below the trained ones are frozen and deterministic
    (frozen_blocks), so every epoch would recompute the same activations. Computed once here, each epoch runs only
    the trainable part: the last block and the head, or the head alone. Costs n_embd floats per token of the data."""
    model.eval()
    cached = [None] * len(rows)
    by_length = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # little padding, as in evaluation
    for start in range(0, len(rows), batch_size):
        batch = by_length[start : start + batch_size]
        x, lengths, _ = collate_messages([rows[i] for i in batch], pad_id)
        with autocast_context(device):
            activations = model.trunk(x.to(device), n_blocks)
        for i, row_activations, length in zip(batch, activations, lengths.tolist()):
            cached[i] = (row_activations[:length].clone(), rows[i][1])  # clone: keep the row, not the padded batch
    return cached


@torch.no_grad()
def classify(model, tokenizer, text, max_length, device="cpu"):
    """-> (label name, probability of that label) for one message."""
    ids = tokenizer.encode(text)[:max_length]
    if not ids:
        raise ValueError("the message is empty; give some text to classify")
    probabilities = model(torch.tensor([ids], device=device)).float().softmax(dim=-1)[0]
    if not torch.isfinite(probabilities).all():
        raise UserError(
            f"the classifier's output for this message is {probabilities.tolist()}: its weights are "
            f"broken; train it again"
        )
    label = int(probabilities.argmax())
    return LABELS[label], probabilities[label].item()


# ---------------------------------------------------------------------------------------------- training


def train_classifier(cfg):
    """Fine-tune one classifier end to end; returns the summary also written to out_dir/summary.json. The run owns
    out_dir while it lasts (lock_out_dir) and replaces an earlier run's files there once its base and data loaded."""
    check_classifier_config(cfg, MODES)
    pick_device(cfg.device)  # a --device this machine lacks is refused before anything is loaded
    with lock_out_dir(cfg.out_dir):
        return run_classifier_training(cfg)


def run_classifier_training(cfg):
    """train_classifier() without the lock."""
    device, run_id, t_start = pick_device(cfg.device), new_run_id(), time.time()
    gpt, tokenizer_name = load_base_model(cfg.init_from, device)
    tokenizer = get_tokenizer(tokenizer_name)
    max_length = cfg.max_length or gpt.config.block_size
    if max_length > gpt.config.block_size:
        raise UserError(
            f"--max_length {max_length} is longer than the model's block_size {gpt.config.block_size}; use at most that"
        )

    # data: balanced classes, split 70/10/20, token ids
    messages = load_messages(cfg.dataset)
    train_set, val_set, test_set = split_messages(balance_classes(messages, cfg.split_seed), cfg.split_seed)
    splits, truncated = {}, {}
    for name, subset in (("train", train_set), ("val", val_set), ("test", test_set)):
        splits[name], truncated[name] = encode_messages(subset, tokenizer, max_length)
    if not splits["val"] or not splits["test"]:
        raise UserError(
            f"{len(messages)} messages leave no validation or test examples; the data needs at least 5 "
            f"messages per class"
        )
    print(
        f"{len(messages):,} messages -> balanced {sum(len(s) for s in splits.values()):,} -> {len(train_set)} train /"
        f" {len(val_set)} validation / {len(test_set)} test"
        + (f"; {sum(truncated.values())} cut to {max_length} tokens" if sum(truncated.values()) else "")
    )

    # the model, and what trains
    torch.manual_seed(cfg.seed)
    base_sha256 = weights_sha256(gpt)  # before anything changes it: --classify checks it loads the same base
    model = build_classifier(gpt, cfg.mode, cfg.lora_rank, cfg.lora_alpha or None, cfg.lora_targets, cfg.lora_dropout)
    if cfg.mode == "qlora":
        use_fast_dequantize(model, cfg.dequantize)
    trainable, total = count_parameters(model)
    print(f"{cfg.mode}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%) on {device}")
    remove_earlier_run(cfg.out_dir, CLASSIFIER_FILES)
    steps_per_epoch = -(-len(splits["train"]) // cfg.batch_size)
    max_iters = cfg.epochs * steps_per_epoch
    peak_lr = cfg.learning_rate or DEFAULT_LEARNING_RATES[cfg.mode]
    warmup_iters = max(1, int(cfg.warmup_ratio * max_iters))
    optimizer = make_optimizer(model, peak_lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.loraplus_ratio)

    # frozen-trunk caching: compute the frozen lower blocks once per message (modes head and last_block)
    pad, t_cache = tokenizer.eot_token, time.time()
    cached_blocks = model.frozen_blocks() if cfg.cache_trunk else 0
    if cached_blocks:
        splits = {
            name: cache_trunk(model, rows, cached_blocks, cfg.batch_size, pad, device) for name, rows in splits.items()
        }
        print(
            f"cached the outputs of the frozen embeddings and blocks 0-{cached_blocks - 1} for every message in "
            f"{time.time() - t_cache:.1f} s; each epoch runs only the layers above them"
        )
    cache_seconds = time.time() - t_cache
    # a batch's logits: from its token ids, or from its cached activations entering block cached_blocks (the same)
    logits_of = functools.partial(model.forward_from_block, block=cached_blocks) if cached_blocks else model
    collate_rows = collate_activations if cached_blocks else collate_messages
    eval_batches = {
        name: make_batches(rows, cfg.batch_size, pad, collate_rows=collate_rows) for name, rows in splits.items()
    }
    before = {name: evaluate_classifier(model, eval_batches[name], device, logits_of) for name in eval_batches}
    print(
        f"before fine-tuning: accuracy {before['train']['accuracy']:.1%} train, {before['val']['accuracy']:.1%} "
        f"validation, {before['test']['accuracy']:.1%} test (a new head guesses)"
    )
    rows = [
        {
            "epoch": 0,
            "step": 0,
            "lr": 0.0,
            "train_loss": before["train"]["loss"],
            "train_accuracy": before["train"]["accuracy"],
            "val_loss": before["val"]["loss"],
            "val_accuracy": before["val"]["accuracy"],
            "seconds": 0.0,
        }
    ]

    # the loop: one optimizer step per batch, an evaluation and a save after each epoch
    reset_peak_memory(device)
    t0, step, saved_step = time.time(), 0, None
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        batches = make_batches(
            splits["train"], cfg.batch_size, pad, torch.Generator().manual_seed(cfg.seed + epoch), collate_rows
        )
        if cfg.progress:
            from tqdm import tqdm

            batches = tqdm(
                batches,
                desc=f"epoch {epoch}/{cfg.epochs}",
                dynamic_ncols=True,
                mininterval=1 if sys.stderr.isatty() else 30,
            )
        loss_sum, correct, seen = 0.0, 0, 0
        for x, lengths, y in batches:
            lr = lr_at_step(step, peak_lr, warmup_iters, max_iters, cfg.min_lr_ratio)
            set_learning_rate(optimizer, lr)
            x, lengths, y = x.to(device), lengths.to(device), y.to(device)
            with autocast_context(device):
                logits = logits_of(x, lengths)
            loss = F.cross_entropy(logits.float(), y)
            loss.backward()
            grad_norm = clip_gradients(model, cfg.grad_clip)
            check_finite(
                step + 1,
                f"the training loss is {loss.item():g} and the gradient norm {grad_norm:g}",
                [loss.item(), grad_norm],
                saved_step,
                cfg.out_dir,
                peak_lr,
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_sum, seen = loss_sum + loss.item() * len(y), seen + len(y)
            correct += (logits.argmax(dim=-1) == y).sum().item()
            if cfg.progress:
                batches.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.1%}", refresh=False)
        val = evaluate_classifier(model, eval_batches["val"], device, logits_of)
        check_finite(
            step,
            f"the validation loss after epoch {epoch} is {val['loss']:g}",
            [val["loss"]],
            saved_step,
            cfg.out_dir,
            peak_lr,
        )
        rows.append(
            {
                "epoch": epoch,
                "step": step,
                "lr": lr,
                "train_loss": loss_sum / seen,
                "train_accuracy": correct / seen,
                "val_loss": val["loss"],
                "val_accuracy": val["accuracy"],
                "seconds": round(time.time() - t0, 3),
            }
        )
        print(
            f"epoch {epoch}: train loss {loss_sum / seen:.4f}, accuracy {correct / seen:.1%} (during the epoch) | "
            f"validation loss {val['loss']:.4f}, accuracy {val['accuracy']:.1%}"
        )
        save_trained(model, cfg, tokenizer_name, max_length, base_sha256, run_id)
        write_classifier_log(rows, cfg)
        saved_step = step

    # the result
    seconds, peak = time.time() - t0, peak_memory_bytes(device)
    after = {name: evaluate_classifier(model, eval_batches[name], device, logits_of) for name in eval_batches}
    check_finite(
        step,
        "the train / validation / test loss after training is " + " / ".join(f"{after[n]['loss']:g}" for n in after),
        [after[n]["loss"] for n in after],
        saved_step,
        cfg.out_dir,
        peak_lr,
    )
    run = dict(
        device=device,
        trainable=trainable,
        total=total,
        steps=step,
        learning_rate=peak_lr,
        seconds=seconds,
        total_seconds=time.time() - t_start,
        cached_blocks=cached_blocks,
        cache_seconds=cache_seconds,
        peak=peak,
        run_id=run_id,
    )
    return write_classifier_summary(cfg, model, optimizer, before, after, splits, truncated, max_length, run)


def parse_args(argv=None):
    return parse_config(ClassifierConfig, argv, __doc__, aliases={"data_path": "dataset"})


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.classify is None:
        return train_classifier(cfg)
    if not cfg.classify.strip():
        raise UserError('--classify is empty: give the message to classify, e.g. --classify "WIN a free cruise!"')
    device = pick_device(cfg.device)
    model, tokenizer, info = load_classifier(cfg.out_dir, device)
    label, probability = classify(model, tokenizer, cfg.classify, info["max_length"], device)
    print(f"{label} (probability {probability:.3f})")
    return label, probability


if __name__ == "__main__":
    try:
        main()
    except main_errors() as e:
        sys.exit(error_line(e))
