"""Instruction datasets as files: the embedded set, the downloads, a local .json or .jsonl of Alpaca examples or
chat conversations, each checked before anything trains on it (one line naming the first bad entry)."""

import json
import os

from support.files import DOWNLOAD_DIR, REPO_DIR, download_file
from support.tokenizer import EOT_TEXT  # the text both tokenizers read as the end-of-text token

CHAT_ROLES = ("system", "user", "assistant")
RAW = "https://raw.githubusercontent.com"
DATASETS = {  # name -> (canonical URL, file name under data/downloads)
    "instruction-data": (
        f"{RAW}/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json",
        "instruction-data.json",
    ),
    "alpaca": (f"{RAW}/tatsu-lab/stanford_alpaca/main/alpaca_data.json", "alpaca_data.json"),
}
EMBEDDED_INSTRUCTIONS_PATH = os.path.join(REPO_DIR, "data", "instructions.json")  # made by data/make_instructions.py
ALPACA = "{'instruction', 'input', 'output'} objects"


def validate_examples(examples, source, required=("instruction", "output")):
    """Raise a ValueError naming the first malformed entry: Alpaca entries, or a chat dataset (the first entry has
    "messages"); no text may hold a literal <|endoftext|> (the tokenizer would end the example there)."""
    if isinstance(examples, list) and examples and isinstance(examples[0], dict) and "messages" in examples[0]:
        return validate_conversations(examples, source)
    if not isinstance(examples, list) or not examples:
        raise ValueError(f"{source}: expected a non-empty JSON list of {ALPACA}")
    for i, ex in enumerate(examples):
        entry = f"{source}: entry {i}"
        if not isinstance(ex, dict):
            raise ValueError(
                f"{entry} is a {type(ex).__name__}, expected an object with {' and '.join(map(repr, required))}"
            )
        for key in required:
            if not isinstance(ex.get(key), str) or not ex[key].strip():
                raise ValueError(f"{entry} has no non-empty string '{key}': {json.dumps(ex)[:200]}")
        for key in ("input", "output"):
            if key in ex and not isinstance(ex[key], str):
                raise ValueError(f"{entry} has an '{key}' that is not a string: {json.dumps(ex)[:200]}")
        check_scoring_keys(ex, entry)
        check_no_end_token(entry, {k: ex.get(k) for k in ("instruction", "input", "output", "answer")})
    return examples


def validate_conversations(examples, source):
    for i, ex in enumerate(examples):
        entry, messages = f"{source}: entry {i}", ex.get("messages") if isinstance(ex, dict) else None
        if not isinstance(messages, list) or not messages:
            raise ValueError(
                f"{entry} has no non-empty 'messages' list; a chat dataset has {{'messages': [...]}} in every entry"
            )
        for j, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
                role = message.get("role") if isinstance(message, dict) else message
                raise ValueError(f"{entry} message {j} has role {role!r}; use one of {', '.join(CHAT_ROLES)}")
            if not isinstance(message.get("content"), str) or not message["content"].strip():
                raise ValueError(f"{entry} message {j} ({message['role']}) has no non-empty string 'content'")
            if message["role"] == "system" and j > 0:
                raise ValueError(f"{entry} message {j} is a system message after the start; put it first")
            check_no_end_token(f"{entry} message {j}", {"content": message["content"]})
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{entry} has no assistant turn, so nothing to learn; add an 'assistant' message")
        check_scoring_keys(ex, entry)
    return examples


def check_scoring_keys(example, entry):
    """The key "answer" and the "kind" scores are grouped by are strings where present."""
    for key, what in (
        ("answer", "a string (the key answer), or left out"),
        ("kind", "a non-empty string, or left out"),
    ):
        if key in example and not (isinstance(example[key], str) and (key == "answer" or example[key].strip())):
            raise ValueError(f"{entry} has '{key}': {json.dumps(example[key])[:80]}, but it must be {what}")


def check_no_end_token(entry, texts):
    for key, text in texts.items():
        if isinstance(text, str) and EOT_TEXT in text:
            raise ValueError(f"{entry}'s '{key}' holds the text {EOT_TEXT}, the end-of-text token; remove or reword it")


def dataset_path(name):
    """'embedded' ships with the repo, a DATASETS name is downloaded once, anything else is a file path."""
    if name == "embedded":
        return EMBEDDED_INSTRUCTIONS_PATH
    if name in DATASETS:
        url, filename = DATASETS[name]
        os.makedirs(DOWNLOAD_DIR, exist_ok=True)
        return download_file(url, os.path.join(DOWNLOAD_DIR, filename))
    if os.path.isfile(name):
        return name
    if os.path.isdir(name):
        files = sorted(f for f in os.listdir(name) if f.endswith((".json", ".jsonl")))
        example = f", e.g. {os.path.join(name, files[0])}" if files else " (it holds none)"
        raise ValueError(f"--dataset {name} is a directory; give a .json or .jsonl file{example}")
    choices = ", ".join(map(repr, ["embedded", *DATASETS]))
    raise ValueError(f"unknown dataset {name!r}: use {choices} or the path of an Alpaca or chat .json/.jsonl file")


def read_json_list(path):
    """A JSON list, or JSON Lines (always for .jsonl; otherwise when the text is not one JSON value)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8 ({e.reason} at byte {e.start}); save it as UTF-8") from None
    lines = [line for line in text.splitlines() if line.strip()]
    too_deep = f"{path} nests lists or objects too deeply for Python's JSON reader; a dataset is a list of flat objects"
    if not path.endswith(".jsonl"):
        try:
            return json.loads(text)
        except RecursionError:
            raise ValueError(too_deep) from None
        except json.JSONDecodeError as e:
            if len(lines) < 2 or not lines[0].lstrip().startswith("{"):  # not JSON Lines either
                raise ValueError(f"{path} is not valid JSON ({e}); expected a list of {ALPACA} or JSON Lines") from e
    examples = []
    for number, line in enumerate(lines, 1):
        try:
            examples.append(json.loads(line))
        except RecursionError:
            raise ValueError(f"{too_deep} (line {number})") from None
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path} line {number} is not valid JSON ({e}); JSON Lines hold one object per line"
            ) from e
    return examples


def load_examples(name):
    path = dataset_path(name)
    return validate_examples(read_json_list(path), path)


def load_answer_file(path):
    """Examples to answer: like a dataset, but an Alpaca example's 'output' (the reference) is optional."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--answer_file {path}: no such file; give a JSON list of {{'instruction', 'input'}} objects"
        )
    return validate_examples(read_json_list(path), path, required=("instruction",))


def split_examples(examples, train_frac=0.85, val_frac=0.05):
    """The fixed split, in file order: first 85% train, next 5% validation, last 10% test."""
    n_train, n_val = int(len(examples) * train_frac), int(len(examples) * val_frac)
    return examples[:n_train], examples[n_train : n_train + n_val], examples[n_train + n_val :]
