"""
A GPT as a spam classifier (as in chapter 6 of Raschka's "Build a Large Language Model (From Scratch)"): the SMS
data, the model and its metrics. finetune_classifier.py trains it; the experiments and notebook 04 use it too.

    token ids -> GPT blocks -> final LayerNorm -> hidden state of the LAST real token -> head -> ham / spam

A GPT's output head maps each position's hidden state to next-token logits (n_embd -> vocab_size). For a
classifier we swap it for a new, much smaller head (n_embd -> 2) and read only the last real token: with
causal attention it is the one position that has seen the whole message. Padding sits after it, so no
amount of padding can change what it sees.

What trains, per mode (everything else stays frozen; build_classifier):
    head        the new head only (a linear probe of the frozen model's features)
    last_block  head + the last transformer block + the final LayerNorm (the book's baseline)
    lora        head + LoRA adapters on the chosen targets (Hu et al. 2021)
    qlora       the same on a base stored in 4-bit NF4 (Dettmers et al. 2023)
    full        every weight
"""

import os
import random
import zipfile
from collections import namedtuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from common import DOWNLOAD_DIR, REPO_DIR, autocast_context, download_file
from quantize import quantize_model
from safety import UserError

LABELS = ("ham", "spam")  # class index -> name; spam = 1 is the "positive" class
MODES = ("head", "last_block", "lora", "qlora", "full")
SMS_SAMPLE_PATH = os.path.join(REPO_DIR, "data", "sms_sample.tsv")  # 600 messages written for this repository
UCI_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
UCI_MEMBER = "SMSSpamCollection"  # the tab-separated file inside the zip
SPLIT_SEED = 123  # the book's random_state: same balancing and split sizes as the published results


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


def load_messages(data_path="", dataset="embedded"):
    """The messages of a label<TAB>text file at data_path, or else of `dataset`: 'embedded' (data/sms_sample.tsv) or
    'uci' (the SMS Spam Collection, downloaded once)."""
    if data_path:
        return read_sms_file(data_path)
    return read_sms_file(download_sms_collection() if dataset == "uci" else SMS_SAMPLE_PATH)


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


def collate_messages(rows, pad_id):
    """Right-pad a list of (ids, label) to the longest -> ids (B, T), lengths (B,), labels (B,).
    The pad id is never read: the head looks at position length - 1 only."""
    lengths = torch.tensor([len(ids) for ids, _ in rows])
    x = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, (ids, _) in enumerate(rows):
        x[i, : len(ids)] = torch.tensor(ids)
    return x, lengths, torch.tensor([label for _, label in rows])


def make_batches(rows, batch_size, pad_id, generator=None, collate_rows=collate_messages):
    """Training: shuffled by `generator` (a torch.Generator). Evaluation (no generator): sorted by length,
    which changes no metric (padding is never read) but keeps the padding, and so the compute, small.
    collate_rows: `collate_messages` for (ids, label) rows, `collate_activations` for the rows of cache_trunk."""
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
            quantize_model(model, skip=("head",))  # the base goes to 4 bits; the head must stay trainable
        lora.apply_lora(model, rank=lora_rank, alpha=lora_alpha, targets=lora_targets, dropout=lora_dropout, trainable=("head",))
        return model
    model.requires_grad_(mode == "full")
    if mode == "last_block":
        model.gpt.transformer.h[-1].requires_grad_(True)
        model.gpt.transformer.ln_f.requires_grad_(True)
    model.head.requires_grad_(True)
    return model


# ---------------------------------------------------------------------------------------------- metrics and use


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
        x, lengths, _ = collate_messages([rows[i] for i in batch], pad_id)
        with autocast_context(device):
            activations = model.trunk(x.to(device), n_blocks)
        for i, row_activations, length in zip(batch, activations, lengths.tolist()):
            cached[i] = (row_activations[:length].clone(), rows[i][1])  # clone: keep the row, not the whole padded batch
    return cached


@torch.no_grad()
def evaluate_classifier(model, batches, device, from_block=0):
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
