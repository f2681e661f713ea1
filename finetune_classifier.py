"""
Fine-tuning is for structure: turn the language model into a spam classifier (as in chapter 6 of
Raschka's "Build a Large Language Model (From Scratch)").

    token ids -> GPT blocks -> final LayerNorm -> hidden state of the LAST real token -> head -> ham / spam

A GPT's output head maps each position's hidden state to next-token logits (n_embd -> vocab_size). For a
classifier we swap it for a new, much smaller head (n_embd -> 2) and read only the last real token: with
causal attention it is the one position that has seen the whole message. Padding sits after it, so no
amount of padding can change what it sees.

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
import random
import sys
import time
import zipfile
from collections import namedtuple
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from model import PRETRAINED, download_file
from safety import (UserError, check_finite_settings, check_optimizer_ranges, error_line, file_sha256, load_tensor_file, lock_out_dir, main_errors,
                    new_run_id, read_json)
from train import (REPO_DIR, autocast_context, check_finite, clip_gradients, load_base_model, learning_rate, make_optimizer,
                   parse_config, peak_memory_bytes, pick_device, reset_peak_memory, save_atomic, save_figure_atomic,
                   training_state_bytes, write_csv_atomic, write_json_atomic)

LABELS = ("ham", "spam")  # class index -> name; spam = 1 is the "positive" class
MODES = ("head", "last_block", "lora", "qlora", "full")
DEFAULT_LEARNING_RATES = {"head": 1e-2, "last_block": 5e-4, "lora": 2e-3, "qlora": 2e-3, "full": 1e-4}
EMBEDDED_PATH = os.path.join(REPO_DIR, "data", "sms_sample.tsv")
DOWNLOAD_DIR = os.path.join(REPO_DIR, "data", "downloads")
UCI_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
UCI_MEMBER = "SMSSpamCollection"  # the tab-separated file inside the zip
SPLIT_SEED = 123  # the book's random_state: same balancing and split sizes as the published results


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


def check_config(cfg):
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
    check_values(cfg)


def check_values(cfg):
    """Each setting within its valid range (train.check_values does the same for train.py)."""
    check_finite_settings(cfg)
    if cfg.lora_rank < 1:
        raise UserError(f"--lora_rank {cfg.lora_rank}: use an integer >= 1")
    check_optimizer_ranges(cfg, {"warmup_ratio": (0 <= cfg.warmup_ratio <= 1, "in [0, 1]")})
    if cfg.mode in ("lora", "qlora"):
        lora.resolve_targets(parse_targets(cfg.lora_targets))  # names the first unknown target


# ---------------------------------------------------------------------------------------------- data

Message = namedtuple("Message", "text label")  # label: index into LABELS


def read_sms_file(path):
    """Parse the SMS Spam Collection's format: UTF-8, one `label<TAB>text` per line, label ham or spam.
    The file from UCI has no header; copies elsewhere (and data/sms_sample.tsv) start with `Label<TAB>SMS`,
    which is skipped. Only the first tab separates: the text keeps any tabs of its own."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no SMS file at {path}; pass --data_path to an existing file, or use --dataset embedded or uci")
    with open(path, "rb") as f:
        raw = f.read()
    messages = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            line = line.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError as e:
            raise ValueError(f"line {number} of {path} is not valid UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8") from None
        if number == 1:
            line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
        if not line.strip():
            continue  # blank lines, e.g. the one after the final newline
        label, tab, text = line.partition("\t")
        if number == 1 and label.strip().lower() == "label":
            continue  # header line
        if not tab:
            raise ValueError(f"line {number} of {path} has no tab: {line[:60]!r}; each line must be 'ham<TAB>text' or 'spam<TAB>text'")
        if label not in LABELS:
            raise ValueError(f"line {number} of {path} has label {label!r}; labels must be exactly 'ham' or 'spam' (lower case), "
                             f"followed by a tab and the message")
        if not text.strip():
            raise ValueError(f"line {number} of {path} has an empty message; remove the line or add its text")
        messages.append(Message(text, LABELS.index(label)))
    if not messages:
        raise ValueError(f"{path} holds no messages; expected lines 'ham<TAB>text' or 'spam<TAB>text' as in the SMS Spam Collection")
    return messages


def download_sms_collection(directory=DOWNLOAD_DIR):
    """Fetch the SMS Spam Collection zip from the UCI repository (once) and extract its tab-separated file."""
    path = os.path.join(directory, UCI_MEMBER)
    if os.path.isfile(path):
        return path
    os.makedirs(directory, exist_ok=True)
    try:
        zip_path = download_file(UCI_URL, os.path.join(directory, "sms_spam_collection.zip"))
    except OSError as e:  # no network, DNS failure, HTTP error (urllib's errors are OSErrors)
        raise ConnectionError(f"could not download the SMS Spam Collection from {UCI_URL} ({e}). Fetch and unzip it on a "
                              f"machine with a network and pass --data_path .../{UCI_MEMBER}, or use --dataset embedded") from e
    try:
        with zipfile.ZipFile(zip_path) as archive:
            if UCI_MEMBER not in archive.namelist():
                raise ValueError(f"{zip_path} has no {UCI_MEMBER} (it holds {', '.join(archive.namelist())}); delete it and run again to re-download")
            with archive.open(UCI_MEMBER) as source, open(path + ".part", "wb") as target:
                target.write(source.read())
    except zipfile.BadZipFile:
        raise ValueError(f"{zip_path} is not a valid zip file; delete it and run again to re-download") from None
    os.replace(path + ".part", path)
    return path


def load_messages(cfg):
    if cfg.data_path:
        return read_sms_file(cfg.data_path)
    return read_sms_file(download_sms_collection() if cfg.dataset == "uci" else EMBEDDED_PATH)


def balance_classes(messages, seed=SPLIT_SEED):
    """Undersample each larger class at random to the size of the smallest (ham down to the spam count),
    keeping the original order within each class."""
    groups = [[m for m in messages if m.label == label] for label in range(len(LABELS))]
    if not all(groups):
        counts = ", ".join(f"{len(g)} {name}" for name, g in zip(LABELS, groups))
        raise ValueError(f"the data has {counts}; a classifier needs examples of both classes")
    n, rng = min(len(g) for g in groups), random.Random(seed)
    balanced = []
    for group in groups:
        keep = sorted(rng.sample(range(len(group)), n))
        balanced += [group[i] for i in keep]
    return balanced


def split_messages(messages, seed=SPLIT_SEED, train_fraction=0.7, val_fraction=0.1):
    """Shuffle once with a fixed seed, then cut 70% train / 10% validation / the rest (20%) test."""
    shuffled = list(messages)
    random.Random(seed).shuffle(shuffled)
    n_train, n_val = int(train_fraction * len(shuffled)), int(val_fraction * len(shuffled))
    return shuffled[:n_train], shuffled[n_train : n_train + n_val], shuffled[n_train + n_val :]


def encode_messages(messages, tokenizer, max_length):
    """-> [(token ids, label)] and how many messages were cut to max_length tokens (their start is kept)."""
    rows, truncated = [], 0
    for m in messages:
        ids = tokenizer.encode(m.text)
        truncated += len(ids) > max_length
        rows.append((ids[:max_length], m.label))
    return rows, truncated


def collate(rows, pad_id):
    """Right-pad a list of (ids, label) to the longest -> ids (B, T), lengths (B,), labels (B,).
    The pad id is never read: the head looks at position length - 1 only."""
    lengths = torch.tensor([len(ids) for ids, _ in rows])
    x = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, (ids, _) in enumerate(rows):
        x[i, : len(ids)] = torch.tensor(ids)
    return x, lengths, torch.tensor([label for _, label in rows])


def make_batches(rows, batch_size, pad_id, generator=None, collate_rows=collate):
    """Training: shuffled by `generator` (a torch.Generator). Evaluation (no generator): sorted by length,
    which changes no metric (padding is never read) but keeps the padding, and so the compute, small.
    collate_rows: `collate` for (ids, label) rows, `collate_activations` for the rows of cache_trunk."""
    if generator is not None:
        order = torch.randperm(len(rows), generator=generator).tolist()
    else:
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    return [collate_rows([rows[i] for i in order[s : s + batch_size]], pad_id) for s in range(0, len(rows), batch_size)]


def collate_activations(rows, pad_id=None):
    """The collate of cached trunk outputs: [(activations (length, n_embd), label)] -> zero-padded (B, T, n_embd),
    lengths (B,), labels (B,). As with token ids, the padding sits after each row's last real position and is never read."""
    lengths = torch.tensor([len(activations) for activations, _ in rows])
    x = nn.utils.rnn.pad_sequence([activations for activations, _ in rows], batch_first=True)
    return x, lengths, torch.tensor([label for _, label in rows])


# ---------------------------------------------------------------------------------------------- the model


class GPTClassifier(nn.Module):
    """A GPT with its language-model head swapped for a classification head on the last real token.

    The GPT keeps its lm_head (tied to the token embedding, so it costs nothing) but it is never called:
    hidden_states gives the final-LayerNorm outputs, and `head` maps one of them to class logits."""

    def __init__(self, gpt, num_classes=len(LABELS)):
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.n_embd, num_classes)

    def forward(self, idx, lengths=None, from_block=0):
        """(B, T) right-padded ids and each row's real length -> (B, num_classes) logits.
        Without lengths every row is taken to be unpadded, and the last position is read.

        from_block k > 0: idx is not token ids but the (B, T, n_embd) residual stream entering block k, as `trunk`
        computes it (cache_trunk stores it per message); only blocks k.. run, the last of them only where the head reads
        (last_position_output), so the logits are the same."""
        if from_block > 0:
            return self.forward_from_block(idx, lengths, from_block)
        hidden = self.gpt.hidden_states(idx)  # (B, T, n_embd)
        if lengths is None:
            return self.head(hidden[:, -1])
        lengths = lengths.to(idx.device)
        if lengths.shape != (idx.size(0),) or lengths.min() < 1 or lengths.max() > idx.size(1):
            raise ValueError(f"lengths must hold one length in 1..{idx.size(1)} per row of idx, got {lengths.tolist()}")
        last = hidden[torch.arange(idx.size(0), device=idx.device), lengths - 1]  # (B, n_embd)
        return self.head(last)

    def forward_from_block(self, x, lengths, from_block):
        """forward(x, lengths, from_block) for a from_block > 0 (see forward)."""
        transformer = self.gpt.transformer
        lengths = torch.full((x.size(0),), x.size(1), device=x.device) if lengths is None else lengths.to(x.device)
        if from_block < len(transformer.h):
            for block in transformer.h[from_block:-1]:
                x = block(x)
            last = last_position_output(transformer.h[-1], x, lengths)
        else:  # head mode: every block is cached
            last = x[torch.arange(x.size(0), device=x.device), lengths - 1]
        return self.head(transformer.ln_f(last))

    def trunk(self, idx, n_blocks):
        """(B, T) token ids -> the (B, T, n_embd) residual stream entering block n_blocks: the first steps of
        GPT.hidden_states (embeddings, then blocks 0 .. n_blocks - 1), for forward(..., from_block=n_blocks)."""
        transformer = self.gpt.transformer
        positions = torch.arange(idx.size(1), device=idx.device)
        x = transformer.drop(transformer.wte(idx) + transformer.wpe(positions))
        for block in transformer.h[:n_blocks]:
            x = block(x)
        return x

    def frozen_blocks(self):
        """How many blocks, counted from the input, compute the same function in every epoch: nothing in them or
        below them (the embeddings) trains, and no dropout or prefix makes them random. Their outputs can be computed
        once per message (cache_trunk): 0 for lora, qlora and full; n_layer - 1 for last_block; n_layer for head."""
        gpt = self.gpt
        if gpt.config.dropout > 0 or gpt.prefix is not None:
            return 0
        if any(p.requires_grad for p in (*gpt.transformer.wte.parameters(), *gpt.transformer.wpe.parameters())):
            return 0
        frozen = 0
        for block in gpt.transformer.h:
            if any(p.requires_grad for p in block.parameters()):
                break
            frozen += 1
        return frozen


def last_position_output(block, x, lengths):
    """block(x)[b, lengths[b] - 1] for each row b, (B, n_embd), computing only what that one position needs.

    The head reads one position per message, so in the last block the other positions are wanted only as keys and
    values for its attention: their queries, attention outputs, o_proj and MLP (about 5/6 of the block's work) would
    be thrown away. Causal attention of the last real position = attention to every position up to it, which the
    key mask below expresses; padding after it is masked out as the causal mask would."""
    attn, (B, T, C) = block.attn, x.shape
    rows = torch.arange(B, device=x.device)
    h = block.ln_1(x)
    split_heads = lambda t: t.view(B, -1, attn.n_head, C // attn.n_head).transpose(1, 2)  # (B, n_head, length, head_size)
    q = split_heads(attn.q_proj(h[rows, lengths - 1])[:, None])  # one query per row
    k, v = split_heads(attn.k_proj(h)), split_heads(attn.v_proj(h))
    visible = torch.arange(T, device=x.device)[None, :] < lengths[:, None]  # (B, T): the keys that position may see
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :], dropout_p=attn.dropout if block.training else 0.0)
    last = x[rows, lengths - 1] + attn.resid_dropout(attn.o_proj(y.transpose(1, 2).reshape(B, C)))
    return last + block.mlp(block.ln_2(last))


def build_classifier(gpt, mode, lora_rank=16, lora_alpha=16.0, lora_targets=("all-linear",), lora_dropout=0.0):
    """Put a new head on gpt and set requires_grad to exactly what `mode` trains (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    model = GPTClassifier(gpt).to(gpt.transformer.wte.weight.device)
    if mode in ("lora", "qlora"):
        if mode == "qlora":
            from quantize import quantize_model

            quantize_model(model, skip=("head",))  # the base goes to 4 bits; the head must stay trainable
        lora.apply_lora(model, rank=lora_rank, alpha=lora_alpha, targets=lora_targets, dropout=lora_dropout, trainable=("head",))
        return model
    model.requires_grad_(mode == "full")
    if mode == "last_block":
        model.gpt.transformer.h[-1].requires_grad_(True)
        model.gpt.transformer.ln_f.requires_grad_(True)
    model.head.requires_grad_(True)
    return model


def parse_targets(text):
    return tuple(t.strip() for t in text.split(",") if t.strip())


# ---------------------------------------------------------------------------------------------- training


@torch.no_grad()
def cache_trunk(model, rows, n_blocks, batch_size, pad_id, device):
    """Frozen-trunk caching: [(ids, label)] -> [(activations entering block n_blocks, (length, n_embd), label)].

    In head and last_block modes the embeddings and the blocks below the trained ones are frozen and deterministic
    (GPTClassifier.frozen_blocks), so every epoch would recompute exactly the same activations for a message. Computing
    them once, here, and training on them with model(x, lengths, from_block=n_blocks) leaves each epoch only the
    trainable part: the last block and the head, or the head alone. Costs n_embd floats per token of the data."""
    model.eval()
    cached = [None] * len(rows)
    by_length = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # little padding, as make_batches for evaluation
    for start in range(0, len(rows), batch_size):
        batch = by_length[start : start + batch_size]
        x, lengths, _ = collate([rows[i] for i in batch], pad_id)
        with autocast_context(device):
            activations = model.trunk(x.to(device), n_blocks)
        for i, row_activations, length in zip(batch, activations, lengths.tolist()):
            cached[i] = (row_activations[:length].clone(), rows[i][1])  # clone: keep the row, not the whole padded batch
    return cached


@torch.no_grad()
def evaluate(model, batches, device, from_block=0):
    """Mean cross-entropy, accuracy and confusion matrix (rows: true class, columns: predicted) over all batches.
    from_block > 0: the batches hold cached trunk activations (see cache_trunk)."""
    model.eval()
    total_loss, confusion = 0.0, torch.zeros(len(LABELS), len(LABELS), dtype=torch.long)
    for x, lengths, y in batches:
        x, lengths, y = x.to(device), lengths.to(device), y.to(device)
        with autocast_context(device):
            logits = model(x, lengths, from_block=from_block)
        total_loss += F.cross_entropy(logits.float(), y, reduction="sum").item()
        predictions = logits.argmax(dim=-1)
        confusion += torch.bincount(y.cpu() * len(LABELS) + predictions.cpu(), minlength=len(LABELS) ** 2).view(len(LABELS), len(LABELS))
    count = int(confusion.sum())
    return {"loss": total_loss / max(count, 1), "accuracy": confusion.trace().item() / max(count, 1), "confusion": confusion.tolist()}


def format_confusion(confusion):
    width = max(len(name) for name in LABELS) + 2
    lines = [" " * (width + 6) + "predicted", " " * (width + 6) + "".join(f"{name:>{width}}" for name in LABELS)]
    for name, row in zip(LABELS, confusion):
        lines.append(f"true {name:<{width}} " + "".join(f"{n:>{width}}" for n in row))
    return "\n".join(lines)


CLASSIFIER_FILES = ("classifier.json", "classifier.pt", "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                    "summary.json", "log.csv", "curves.png")


def train_classifier(cfg):
    """Fine-tune one classifier end to end; returns the summary also written to out_dir/summary.json. The run owns
    out_dir while it lasts (safety.lock_out_dir), and replaces an earlier run's files there once its base and data
    have loaded."""
    check_config(cfg)
    pick_device(cfg.device)  # a --device this machine lacks is refused before anything is loaded
    with lock_out_dir(cfg.out_dir):
        return run_classifier_training(cfg)


def remove_earlier_run(out_dir):
    """Otherwise an earlier run's files would sit beside this run's until overwritten (or forever, if it is killed)."""
    earlier = [name for name in CLASSIFIER_FILES if os.path.exists(os.path.join(out_dir, name))]
    if earlier:
        print(f"{out_dir} holds an earlier run ({', '.join(earlier)}): replacing it")
        for name in earlier:
            os.remove(os.path.join(out_dir, name))


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

    messages = load_messages(cfg)
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
    model = build_classifier(gpt, cfg.mode, cfg.lora_rank, cfg.lora_alpha, parse_targets(cfg.lora_targets), cfg.lora_dropout)
    trainable, total = lora.count_parameters(model)
    print(f"{cfg.mode}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%) on {device}")
    remove_earlier_run(cfg.out_dir)

    steps_per_epoch = -(-len(splits["train"]) // cfg.batch_size)
    max_iters = cfg.epochs * steps_per_epoch
    schedule = SimpleNamespace(learning_rate=cfg.learning_rate or DEFAULT_LEARNING_RATES[cfg.mode], min_lr_ratio=cfg.min_lr_ratio,
                               warmup_iters=max(1, int(cfg.warmup_ratio * max_iters)), max_iters=max_iters)
    settings = SimpleNamespace(**{**asdict(cfg), "learning_rate": schedule.learning_rate})  # cfg with the mode's default filled in
    optimizer = make_optimizer(model, settings)
    pad = tokenizer.eot_token
    from_block = model.frozen_blocks() if cfg.cache_trunk else 0
    t_cache = time.time()
    if from_block:  # train and evaluate on the frozen blocks' outputs, computed once here
        splits = {name: cache_trunk(model, rows, from_block, cfg.batch_size, pad, device) for name, rows in splits.items()}
        print(f"cached the outputs of the frozen embeddings and blocks 0-{from_block - 1} for every message in "
              f"{time.time() - t_cache:.1f} s; each epoch runs only the layers above them (--no-cache_trunk: every layer, every epoch)")
    cache_seconds = time.time() - t_cache
    collate_rows = collate_activations if from_block else collate
    eval_batches = {name: make_batches(rows, cfg.batch_size, pad, collate_rows=collate_rows) for name, rows in splits.items()}

    before = {name: evaluate(model, eval_batches[name], device, from_block) for name in ("train", "val", "test")}
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
            lr = learning_rate(step, schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            x, lengths, y = x.to(device), lengths.to(device), y.to(device)
            with autocast_context(device):
                logits = model(x, lengths, from_block=from_block)
            loss = F.cross_entropy(logits.float(), y)
            loss.backward()
            grad_norm = clip_gradients(model, cfg.grad_clip)
            check_finite(step + 1, f"the training loss is {loss.item():g} and the gradient norm {grad_norm:g}", [loss.item(), grad_norm],
                         saved_rows(rows), settings)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(dim=-1) == y).sum().item()
            seen += len(y)
            if cfg.progress:
                batches.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.1%}", refresh=False)
        val = evaluate(model, eval_batches["val"], device, from_block)
        check_finite(step, f"the validation loss after epoch {epoch} is {val['loss']:g}", [val["loss"]], saved_rows(rows), settings)
        rows.append({"epoch": epoch, "step": step, "lr": lr, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                     "val_loss": val["loss"], "val_accuracy": val["accuracy"], "seconds": round(time.time() - t0, 3)})
        print(f"epoch {epoch}: train loss {loss_sum / seen:.4f}, accuracy {correct / seen:.1%} (during the epoch) | "
              f"validation loss {val['loss']:.4f}, accuracy {val['accuracy']:.1%}")
        save_trained(model, cfg, tokenizer_name, max_length, fingerprint, run_id)
        write_log(rows, os.path.join(cfg.out_dir, "log.csv"))
        plot_curves(rows, os.path.join(cfg.out_dir, "curves.png"), f"{cfg.mode} on {describe_data(cfg)}")
    seconds = time.time() - t0
    peak = peak_memory_bytes(device)

    after = {name: evaluate(model, eval_batches[name], device, from_block) for name in ("train", "val", "test")}
    check_finite(step, "the train / validation / test loss after training is " + " / ".join(f"{after[n]['loss']:g}" for n in after),
                 [after[name]["loss"] for name in after], saved_rows(rows), settings)
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
        "epochs": cfg.epochs, "steps": step, "learning_rate": schedule.learning_rate,
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


def saved_rows(rows):
    """The log rows in train.check_finite's terms: each epoch (not row 0, before training) ended with a save."""
    return [{"iter": r["step"], "val_loss": r["val_loss"] if r["epoch"] else ""} for r in rows]


def describe_data(cfg):
    return cfg.data_path or cfg.dataset


# ---------------------------------------------------------------------------------------------- outputs


def write_log(rows, path):
    write_csv_atomic(rows, path, list(rows[0]))


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
            from quantize import quantize_model

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


@torch.no_grad()
def classify(model, tokenizer, text, max_length, device="cpu"):
    """-> (label name, probability of that label) for one message."""
    ids = tokenizer.encode(text)[:max_length]
    if not ids:
        raise ValueError("the message is empty; give some text to classify")
    logits = model(torch.tensor([ids], device=device))
    probabilities = logits.float().softmax(dim=-1)[0]
    if not torch.isfinite(probabilities).all():
        raise UserError(f"the classifier's output for this message is {probabilities.tolist()}: its weights are broken; train it again")
    label = int(probabilities.argmax())
    return LABELS[label], probabilities[label].item()


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
