"""
Instruction data: Alpaca-style prompts, dataset loading, the collate function that pads and masks, and the scorer
that checks answers.

An example {"instruction", "input", "output"} becomes one token sequence

    prompt(instruction, input) + output + <|endoftext|>

and the model learns to continue a prompt with its response and then stop. Targets are the inputs shifted by
one; padding positions get the target -100, which cross-entropy ignores. With mask_prompt the prompt's positions
get -100 too, so the loss (and the gradient) comes only from the response (compare both with --mask_prompt).
"""

import json
import os
import re
from collections import Counter

import torch

PROMPT_HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
# Two prompt templates. "alpaca" is Alpaca's own (what GPT-2 runs use); "compact" drops its 105-byte preamble sentence
# and keeps the three section markers. A byte-level model pays for every byte of the prompt on every example and
# learns nothing from a sentence that never changes, so the tiny base uses "compact" (train.py: --prompt_template).
TEMPLATES = ("alpaca", "compact")
# Kinds of the embedded set whose answer is a fact about the world rather than a rule applied to the prompt
# (see data/make_instructions.py): on held-out items fine-tuning cannot teach them, only guess.
FACT_KINDS = ("capital", "animal_class", "antonym")

DATASETS = {  # name -> (canonical URL, file name under data/downloads)
    "instruction-data": (
        "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json",
        "instruction-data.json",
    ),
    "alpaca": ("https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json", "alpaca_data.json"),
}
REPO_DIR = os.path.dirname(os.path.abspath(__file__))
EMBEDDED_PATH = os.path.join(REPO_DIR, "data", "instructions.json")
DOWNLOAD_DIR = os.path.join(REPO_DIR, "data", "downloads")


def format_prompt(example, template="alpaca"):
    """The Alpaca prompt (Taori et al. 2023), with the '### Input:' section only when there is an input;
    template="compact" leaves out the preamble sentence."""
    if template not in TEMPLATES:
        raise ValueError(f"prompt template {template!r}: use one of {', '.join(TEMPLATES)}")
    prompt = (f"{PROMPT_HEADER}\n\n" if template == "alpaca" else "") + f"### Instruction:\n{example['instruction']}"
    if example.get("input"):
        prompt += f"\n\n### Input:\n{example['input']}"
    return prompt + "\n\n### Response:\n"


def validate_examples(examples, source, required=("instruction", "output")):
    """Raise a ValueError naming the first malformed entry."""
    if not isinstance(examples, list) or not examples:
        raise ValueError(f"{source}: expected a non-empty JSON list of {{'instruction', 'input', 'output'}} objects")
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict):
            raise ValueError(f"{source}: entry {i} is a {type(ex).__name__}, expected an object with {' and '.join(map(repr, required))}")
        for key in required:
            if not isinstance(ex.get(key), str) or not ex[key].strip():
                raise ValueError(f"{source}: entry {i} has no non-empty string '{key}': {json.dumps(ex)[:200]}")
        if not isinstance(ex.get("input", ""), str):
            raise ValueError(f"{source}: entry {i} has an 'input' that is not a string: {json.dumps(ex)[:200]}")
    return examples


def dataset_path(name):
    """Local path of a dataset: 'embedded' ships with the repo, a DATASETS name is downloaded once, else a file path."""
    if name == "embedded":
        return EMBEDDED_PATH
    if name in DATASETS:
        from model import download_file

        url, filename = DATASETS[name]
        os.makedirs(DOWNLOAD_DIR, exist_ok=True)
        return download_file(url, os.path.join(DOWNLOAD_DIR, filename))
    if os.path.isfile(name):
        return name
    raise ValueError(f"unknown dataset {name!r}: use 'embedded', {', '.join(repr(d) for d in DATASETS)} or a path to an Alpaca-format .json file")


def read_json_list(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8 ({e.reason} at byte {e.start}); save the dataset as UTF-8") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); expected a list of {{'instruction', 'input', 'output'}} objects") from e


def load_examples(name):
    path = dataset_path(name)
    return validate_examples(read_json_list(path), path)


def load_answer_file(path):
    """Examples to answer: like a dataset, but 'output' is optional (a reference, if present)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--answer_file {path}: no such file; give a JSON list of {{'instruction', 'input'}} objects")
    return validate_examples(read_json_list(path), path, required=("instruction",))


def split_examples(examples, train_frac=0.85, val_frac=0.05):
    """The fixed split, in file order: first 85% train, next 5% validation, last 10% test."""
    n_train = int(len(examples) * train_frac)
    n_val = int(len(examples) * val_frac)
    return examples[:n_train], examples[n_train : n_train + n_val], examples[n_train + n_val :]


def tokenize_examples(examples, tokenizer, max_length, template="alpaca"):
    """Each example -> (token ids, prompt length). Examples longer than max_length tokens are dropped (cutting
    one would cut its response and its end-of-text token); returns (kept, number dropped)."""
    kept, dropped = [], 0
    for ex in examples:
        prompt = tokenizer.encode(format_prompt(ex, template))
        ids = prompt + tokenizer.encode(ex["output"]) + [tokenizer.eot_token]
        if len(ids) > max_length:
            dropped += 1
        else:
            kept.append((ids, len(prompt)))
    return kept, dropped


def collate(batch, pad_token, mask_prompt=False, ignore_index=-100):
    """A list of (ids, prompt_length) -> (inputs, targets), each (B, longest - 1).
    inputs are ids[:-1] padded with pad_token; targets are ids[1:] padded with ignore_index. With mask_prompt the
    targets that are still prompt tokens become ignore_index: position t predicts token t+1, so the first kept target
    is the first response token, predicted from the last prompt token."""
    width = max(len(ids) for ids, _ in batch) - 1
    inputs = torch.full((len(batch), width), pad_token, dtype=torch.long)
    targets = torch.full((len(batch), width), ignore_index, dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(batch):
        ids = torch.tensor(ids, dtype=torch.long)
        inputs[row, : len(ids) - 1] = ids[:-1]
        targets[row, : len(ids) - 1] = ids[1:]
        if mask_prompt:
            targets[row, : prompt_length - 1] = ignore_index
    return inputs, targets


# ---------------------------------------------------------------------------------------------- scoring answers


def normalized_words(text, keep_case=False):
    """Lower-case words with the punctuation around them stripped, so '"Cats".' and 'cats' compare equal while
    punctuation inside a word stays ('1,234' is not '1234', "don't" is not 'dont')."""
    words = (w.strip(".,;:!?\"'()[]") for w in (text if keep_case else text.lower()).split())
    return [w for w in words if w]


def contains_answer(response, answer):
    """True when the key answer appears in the response as whole words: 'cats' is in 'The plural is "cats".',
    but not in 'cat' or 'catsup', and '20' is not in '120'. Case is ignored, except for an answer written in
    capitals, where the capitals are the answer ('PEPPER' is not in 'pepper')."""
    keep_case = answer.isupper() and len(answer) > 1
    key, words = normalized_words(answer, keep_case), normalized_words(response, keep_case)
    if not key:
        raise ValueError(f"empty key answer {answer!r}")
    return any(words[i : i + len(key)] == key for i in range(len(words) - len(key) + 1))


def exact_match(response, reference):
    return normalized_words(response) == normalized_words(reference)


def token_f1(response, reference):
    """Harmonic mean of word precision and recall against the reference (the SQuAD metric, Rajpurkar et al. 2016)."""
    got, want = normalized_words(response), normalized_words(reference)
    if not got or not want:
        return float(got == want)
    common = sum((Counter(got) & Counter(want)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def score_responses(examples, responses):
    """Score responses against their examples -> (overall, per kind, per example).
    Every example with an 'output' gets exact match and token F1 against it; one with an 'answer' key also gets
    accuracy (the key answer is in the response). Examples without a 'kind' are counted under 'all'."""
    per_example = []
    for ex, response in zip(examples, responses, strict=True):
        row = {"kind": ex.get("kind", "all")}
        if ex.get("output"):
            row["exact_match"] = exact_match(response, ex["output"])
            row["f1"] = token_f1(response, ex["output"])
        if ex.get("answer"):
            row["correct"] = contains_answer(response, ex["answer"])
        per_example.append(row)

    def mean_of(rows):
        out = {"examples": len(rows)}
        for metric, name in (("correct", "accuracy"), ("exact_match", "exact_match"), ("f1", "f1")):
            values = [float(r[metric]) for r in rows if metric in r]
            if values:
                out[name] = sum(values) / len(values)
        return out

    by_kind = {}
    for row in per_example:
        by_kind.setdefault(row["kind"], []).append(row)
    return mean_of(per_example), {k: mean_of(v) for k, v in sorted(by_kind.items())}, per_example
