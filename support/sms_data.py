"""The SMS Spam Collection for finetune_classifier.py: reading it (the embedded sample, the UCI download, a local
file), balancing the classes, the 70/10/20 split and padded batches; and the classifier's metrics."""

import os
import random
import zipfile
from collections import namedtuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from support.files import DOWNLOAD_DIR, REPO_DIR, download_file
from support.runs import autocast_context

LABELS = ("ham", "spam")  # class index -> name; spam = 1 is the "positive" class
SMS_SAMPLE_PATH = os.path.join(REPO_DIR, "data", "sms_sample.tsv")  # 600 messages written for this repository
UCI_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
UCI_MEMBER = "SMSSpamCollection"  # the tab-separated file inside the zip
SPLIT_SEED = 123  # the book's random_state: same balancing and split sizes as the published results

Message = namedtuple("Message", "text label")  # label: index into LABELS


def read_sms_file(path):
    """UTF-8 lines `ham<TAB>text` or `spam<TAB>text` (a `Label<TAB>SMS` header skipped; the text keeps its tabs)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no SMS file at {path}; give --dataset an existing label<TAB>text file, 'embedded' or 'uci'"
        )
    with open(path, "rb") as f:
        raw = f.read()
    messages = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        where = f"line {number} of {path}"
        try:
            line = line.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{where} is not valid UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8"
            ) from None
        if number == 1:
            line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
        if not line.strip():
            continue  # blank lines, e.g. the one after the final newline
        label, tab, text = line.partition("\t")
        if number == 1 and label.strip().lower() == "label":
            continue  # header line
        if not tab:
            raise ValueError(f"{where} has no tab: {line[:60]!r}; each line must be 'ham<TAB>text' or 'spam<TAB>text'")
        if label not in LABELS:
            raise ValueError(f"{where} has label {label!r}; use 'ham' or 'spam' (lower case), a tab and the message")
        if not text.strip():
            raise ValueError(f"{where} has an empty message; remove the line or add its text")
        messages.append(Message(text, LABELS.index(label)))
    if not messages:
        raise ValueError(f"{path} holds no messages; expected lines 'ham<TAB>text' or 'spam<TAB>text'")
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
        raise ConnectionError(
            f"could not download the SMS Spam Collection from {UCI_URL} ({e}). Fetch and unzip it on a "
            f"machine with a network and pass --dataset .../{UCI_MEMBER}, or use --dataset embedded"
        ) from e
    try:
        with zipfile.ZipFile(zip_path) as archive:
            if UCI_MEMBER not in archive.namelist():
                raise ValueError(f"{zip_path} has no {UCI_MEMBER}; delete it and run again to download it again")
            with archive.open(UCI_MEMBER) as source, open(path + ".part", "wb") as target:
                target.write(source.read())
    except zipfile.BadZipFile:
        raise ValueError(f"{zip_path} is not a valid zip file; delete it and run again to re-download") from None
    os.replace(path + ".part", path)
    return path


def load_messages(dataset="embedded"):
    """'embedded' (data/sms_sample.tsv), 'uci' (the SMS Spam Collection, downloaded once) or a file's messages."""
    if dataset == "embedded":
        return read_sms_file(SMS_SAMPLE_PATH)
    return read_sms_file(download_sms_collection() if dataset == "uci" else dataset)


def balance_classes(messages, seed=SPLIT_SEED):
    """Each larger class undersampled at random to the size of the smallest, in the original order."""
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
    """(ids, label) rows right-padded -> ids (B, T), lengths (B,), labels (B,); the head never reads the padding."""
    lengths = torch.tensor([len(ids) for ids, _ in rows])
    x = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, (ids, _) in enumerate(rows):
        x[i, : len(ids)] = torch.tensor(ids)
    return x, lengths, torch.tensor([label for _, label in rows])


def make_batches(rows, batch_size, pad_id, generator=None, collate_rows=collate_messages):
    """Shuffled by `generator`, or (evaluation) sorted by length, which keeps the padding small."""
    if generator is not None:
        order = torch.randperm(len(rows), generator=generator).tolist()
    else:
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    return [collate_rows([rows[i] for i in order[s : s + batch_size]], pad_id) for s in range(0, len(rows), batch_size)]


def collate_activations(rows, pad_id=None):
    """collate_messages for cached trunk outputs: [(activations (length, n_embd), label)] -> (B, T, n_embd), ..."""
    lengths = torch.tensor([len(activations) for activations, _ in rows])
    x = nn.utils.rnn.pad_sequence([activations for activations, _ in rows], batch_first=True)
    return x, lengths, torch.tensor([label for _, label in rows])


@torch.no_grad()
def evaluate_classifier(model, batches, device, logits_of=None):
    """Mean cross-entropy, accuracy and confusion matrix (rows: true class) over the batches; logits_of(x, lengths)
    computes a batch's logits (default: the model; trunk caching passes model.forward_from_block)."""
    model.eval()
    logits_of = model if logits_of is None else logits_of
    n = len(LABELS)
    total_loss, confusion = 0.0, torch.zeros(n, n, dtype=torch.long)
    for x, lengths, y in batches:
        x, lengths, y = x.to(device), lengths.to(device), y.to(device)
        with autocast_context(device):
            logits = logits_of(x, lengths)
        total_loss += F.cross_entropy(logits.float(), y, reduction="sum").item()
        predictions = logits.argmax(dim=-1)
        confusion += torch.bincount(y.cpu() * n + predictions.cpu(), minlength=n * n).view(n, n)
    count = int(confusion.sum())
    accuracy = confusion.trace().item() / max(count, 1)
    return {"loss": total_loss / max(count, 1), "accuracy": accuracy, "confusion": confusion.tolist()}


def format_confusion(confusion):
    width = max(len(name) for name in LABELS) + 2
    lines = [" " * (width + 6) + "predicted", " " * (width + 6) + "".join(f"{name:>{width}}" for name in LABELS)]
    for name, row in zip(LABELS, confusion):
        lines.append(f"true {name:<{width}} " + "".join(f"{n:>{width}}" for n in row))
    return "\n".join(lines)
