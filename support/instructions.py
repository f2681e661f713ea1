"""
Instruction data: Alpaca-style prompts and chat conversations, dataset loading, the collate functions that pad
(or pack) and mask, the batches a training run draws (InstructionData), greedy answers to instructions
(answer_examples) and the scorer that checks them.

An example {"instruction", "input", "output"} becomes one token sequence

    prompt(instruction, input) + output + <|endoftext|>

and the model learns to continue a prompt with its response and then stop. Targets are the inputs shifted by
one; padding positions get the target -100, which cross-entropy ignores. With mask_prompt the prompt's positions
get -100 too, so the loss (and the gradient) comes only from the response (compare both with --mask_prompt).

A conversation in TRL's conversational format, {"messages": [{"role": "system" | "user" | "assistant", "content"}, ...]},
becomes one sequence through CHAT_TEMPLATE (below), a plain-text template for models that have no chat tokens (GPT-2,
the byte-level base); with mask_prompt only the assistant turns (and the <|endoftext|> ending each) are learned.
The prompt templates of TEMPLATES ("alpaca", "compact", "bare") apply to Alpaca examples; conversations always use
CHAT_TEMPLATE, and are answered and scored at their last assistant turn (example_prompt, score_responses).

Packing (pack_examples, collate_packed) puts several examples in one row, each still computed as if alone.
"""

import bisect
import itertools
import json
import os
from collections import Counter

import torch

from support.files import DOWNLOAD_DIR, REPO_DIR, UserError, download_file
from support.tokenizer import EOT_TEXT  # the text both tokenizers read as the end-of-text token

PROMPT_HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
# Three prompt templates. "alpaca" is Alpaca's own (what GPT-2 runs use); "compact" drops its 105-byte preamble
# sentence and keeps the three section markers; "bare" drops the markers too: the instruction, the input on the next
# line, a blank line, the response. A byte-level model pays for every byte of the prompt on every example and learns
# nothing from text that never changes: the markers are 33-46 of an example's 123 bytes on average, so "bare" makes
# a step of the tiny base about 27% cheaper (docs/results.md); the tiny base uses it (train.py: --prompt_template).
TEMPLATES = ("alpaca", "compact", "bare")
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
EMBEDDED_INSTRUCTIONS_PATH = os.path.join(REPO_DIR, "data", "instructions.json")  # made by data/make_instructions.py


def format_prompt(example, template="alpaca"):
    """The Alpaca prompt (Taori et al. 2023), with the '### Input:' section only when there is an input;
    template="compact" leaves out the preamble sentence, template="bare" the section markers as well."""
    if template not in TEMPLATES:
        raise ValueError(f"prompt template {template!r}: use one of {', '.join(TEMPLATES)}")
    if template == "bare":  # a blank line is what tells the response apart
        return example["instruction"] + (f"\n{example['input']}" if example.get("input") else "") + "\n\n"
    prompt = (f"{PROMPT_HEADER}\n\n" if template == "alpaca" else "") + f"### Instruction:\n{example['instruction']}"
    if example.get("input"):
        prompt += f"\n\n### Input:\n{example['input']}"
    return prompt + "\n\n### Response:\n"


def validate_examples(examples, source, required=("instruction", "output")):
    """Raise a ValueError naming the first malformed entry, before anything trains on the data. A list whose first
    entry has "messages" is a chat dataset (validate_conversations); otherwise every entry must be Alpaca's
    {"instruction", "input", "output"}, with the keys in `required` non-empty strings, "input" a string, and the
    scoring keys "answer" and "kind", where present, strings too (check_scoring_keys). No text may hold a literal
    <|endoftext|>: the tokenizer would read it as the end-of-text token and cut the example there."""
    if isinstance(examples, list) and examples and isinstance(examples[0], dict) and "messages" in examples[0]:
        return validate_conversations(examples, source)
    if not isinstance(examples, list) or not examples:
        raise ValueError(f"{source}: expected a non-empty JSON list of {{'instruction', 'input', 'output'}} objects")
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict):
            raise ValueError(f"{source}: entry {i} is a {type(ex).__name__}, expected an object with {' and '.join(map(repr, required))}")
        for key in required:
            if not isinstance(ex.get(key), str) or not ex[key].strip():
                raise ValueError(f"{source}: entry {i} has no non-empty string '{key}': {json.dumps(ex)[:200]}")
        for key in ("input", "output"):
            if key in ex and not isinstance(ex[key], str):
                raise ValueError(f"{source}: entry {i} has an '{key}' that is not a string: {json.dumps(ex)[:200]}")
        check_scoring_keys(ex, source, f"entry {i}")
        check_no_end_token(source, f"entry {i}", {k: ex.get(k) for k in ("instruction", "input", "output", "answer")})
    return examples


def check_scoring_keys(example, source, where):
    """"answer" (the key answer an accuracy is scored against) and "kind" (what the scores are grouped by) are
    strings where present; an empty answer means none."""
    for key, what in (("answer", "a string (the key answer), or left out"), ("kind", "a non-empty string, or left out")):
        if key in example and not (isinstance(example[key], str) and (key == "answer" or example[key].strip())):
            raise ValueError(f"{source}: {where} has '{key}': {json.dumps(example[key])[:80]}, but it must be {what}")


def check_no_end_token(source, where, texts):
    for key, text in texts.items():
        if isinstance(text, str) and EOT_TEXT in text:
            raise ValueError(f"{source}: {where}'s '{key}' holds the text {EOT_TEXT}, which the tokenizer reads as the end-of-text "
                             f"token (the example would end there); remove it or write it differently")


def dataset_path(name):
    """Local path of a dataset: 'embedded' ships with the repo, a DATASETS name is downloaded once, else a file path."""
    if name == "embedded":
        return EMBEDDED_INSTRUCTIONS_PATH
    if name in DATASETS:
        url, filename = DATASETS[name]
        os.makedirs(DOWNLOAD_DIR, exist_ok=True)
        return download_file(url, os.path.join(DOWNLOAD_DIR, filename))
    if os.path.isfile(name):
        return name
    if os.path.isdir(name):
        files = sorted(f for f in os.listdir(name) if f.endswith((".json", ".jsonl")))[:3]
        raise ValueError(f"--dataset {name} is a directory; give a .json or .jsonl file" +
                         (f", e.g. {os.path.join(name, files[0])}" if files else " (it holds none)"))
    raise ValueError(f"unknown dataset {name!r}: use 'embedded', {', '.join(repr(d) for d in DATASETS)} or a path to an Alpaca-format or chat .json/.jsonl file")


def read_json_list(path):
    """The entries of a dataset file: a JSON list, or JSON Lines (one object per line, as TRL's datasets often come).
    A .jsonl file is always read as JSON Lines, anything else as JSON first."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8 ({e.reason} at byte {e.start}); save the dataset as UTF-8") from None
    lines = [line for line in text.splitlines() if line.strip()]
    too_deep = (f"{path} nests lists or objects too deeply for Python's JSON reader; a dataset is a list of flat objects "
                f"(or JSON Lines of them)")
    if not path.endswith(".jsonl"):
        try:
            return json.loads(text)
        except RecursionError:
            raise ValueError(too_deep) from None
        except json.JSONDecodeError as e:
            if len(lines) < 2 or not lines[0].lstrip().startswith("{"):  # not JSON Lines either
                raise ValueError(f"{path} is not valid JSON ({e}); expected a list of {{'instruction', 'input', 'output'}} objects or JSON Lines of {{'messages': [...]}}") from e
    examples = []
    for number, line in enumerate(lines, 1):
        try:
            examples.append(json.loads(line))
        except RecursionError:
            raise ValueError(f"{too_deep} (line {number})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number} is not valid JSON ({e}); a JSON Lines file holds one object per line") from e
    return examples


def load_examples(name):
    """The examples of a dataset (read_json_list): Alpaca examples or {"messages": [...]} conversations."""
    path = dataset_path(name)
    return validate_examples(read_json_list(path), path)


def load_answer_file(path):
    """Examples to answer: like a dataset, but an Alpaca example's 'output' is optional (a reference, if present).
    A chat file's conversations are answered at their last assistant turn, which is the reference."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--answer_file {path}: no such file; give a JSON list of {{'instruction', 'input'}} objects")
    return validate_examples(read_json_list(path), path, required=("instruction",))


def split_examples(examples, train_frac=0.85, val_frac=0.05):
    """The fixed split, in file order: first 85% train, next 5% validation, last 10% test."""
    n_train = int(len(examples) * train_frac)
    n_val = int(len(examples) * val_frac)
    return examples[:n_train], examples[n_train : n_train + n_val], examples[n_train + n_val :]


def tokenize_examples(examples, tokenizer, max_length, template="alpaca"):
    """Each example -> (token ids, what to learn): for Alpaca the prompt length (the ids after it are the response;
    the prompt is format_prompt's in `template`), for a conversation one bool per token, True on assistant turns
    (tokenize_conversation; conversations have their own CHAT_TEMPLATE, so `template` does not apply to them).
    Examples longer than max_length tokens are dropped (cutting one would cut its response and its end-of-text
    token); returns (kept, number dropped)."""
    kept, dropped = [], 0
    for ex in examples:
        if "messages" in ex:
            ids, learned = tokenize_conversation(ex["messages"], tokenizer)
        else:
            prompt = tokenizer.encode(format_prompt(ex, template))
            ids, learned = prompt + tokenizer.encode(ex["output"]) + [tokenizer.eot_token], len(prompt)
        if len(ids) > max_length:
            dropped += 1
        else:
            kept.append((ids, learned))
    return kept, dropped


def example_targets(ids, learned, mask_prompt=False, ignore_index=-100):
    """One tokenized example -> (inputs, targets) of length len(ids) - 1: inputs are ids[:-1], targets ids[1:]. With
    mask_prompt, a target that is not a learned token becomes ignore_index. `learned` is a prompt length (the tokens
    from there on are learned) or one bool per token. Position t predicts token t+1, so the first kept target of a
    response is its first token, predicted from the last prompt token."""
    ids = torch.tensor(ids, dtype=torch.long)
    inputs, targets = ids[:-1], ids[1:].clone()
    if mask_prompt:
        if isinstance(learned, int):
            targets[: learned - 1] = ignore_index
        else:
            targets[~torch.tensor(learned[1:], dtype=torch.bool)] = ignore_index
    return inputs, targets


def collate(batch, pad_token, mask_prompt=False, ignore_index=-100):
    """A list of (ids, prompt_length or learned flags) -> (inputs, targets), each (B, longest - 1).
    inputs are ids[:-1] padded with pad_token; targets are ids[1:] padded with ignore_index. With mask_prompt the
    targets that are still prompt tokens become ignore_index (example_targets)."""
    width = max(len(ids) for ids, _ in batch) - 1
    inputs = torch.full((len(batch), width), pad_token, dtype=torch.long)
    targets = torch.full((len(batch), width), ignore_index, dtype=torch.long)
    for row, (ids, learned) in enumerate(batch):
        example_inputs, example_targets_ = example_targets(ids, learned, mask_prompt, ignore_index)
        inputs[row, : len(ids) - 1] = example_inputs
        targets[row, : len(ids) - 1] = example_targets_
    return inputs, targets


# ---------------------------------------------------------------------------------------------- packing


def pack_examples(examples, capacity):
    """Group tokenized examples into rows of at most `capacity` input positions (an example of n tokens takes n - 1:
    its inputs ids[:-1]), by best-fit decreasing, TRL's default packing strategy: longest example first, each into the
    row whose free space is smallest but still enough, a new row when none has room. Best-fit decreasing never uses
    more than 11/9 of the optimal number of rows (+ 6/9; Dosa 2007). Returns a list of rows, each a list of examples,
    longest first. An example longer than the capacity is an error (tokenize_examples drops and counts those)."""
    order = sorted(range(len(examples)), key=lambda i: -(len(examples[i][0]) - 1))  # stable: ties keep their order
    rows, free = [], []  # free: sorted (space left, row index) pairs
    for i in order:
        size = len(examples[i][0]) - 1
        if size > capacity:
            raise ValueError(f"an example of {size + 1} tokens cannot be packed into rows of {capacity} positions; drop examples longer than the context first")
        slot = bisect.bisect_left(free, (size, -1))  # the row with the least space that still fits
        if slot == len(free):
            rows.append([])
            space, row = capacity, len(rows) - 1
        else:
            space, row = free.pop(slot)
        rows[row].append(examples[i])
        if space - size > 0:
            bisect.insort(free, (space - size, row))
    return rows


def collate_packed(batch, pad_token, mask_prompt=False, ignore_index=-100):
    """A list of packed rows (each a list of (ids, learned) examples) -> (inputs, targets, segment_ids), each (B, width)
    with width the longest row. Each example contributes exactly what collate would give it alone (example_targets:
    the same prompt masking, no target crosses into the next example), and segment_ids number the examples of a row
    0, 1, ... so that GPT.forward restarts positions and blocks attention between them. Padding gets its own segment
    id and ignored targets. The mean loss over a packed batch equals the mean over the same examples unpacked."""
    width = max(sum(len(ids) - 1 for ids, _ in row) for row in batch)
    inputs = torch.full((len(batch), width), pad_token, dtype=torch.long)
    targets = torch.full((len(batch), width), ignore_index, dtype=torch.long)
    segment_ids = torch.empty((len(batch), width), dtype=torch.long)
    for r, row in enumerate(batch):
        start = 0
        for segment, (ids, learned) in enumerate(row):
            end = start + len(ids) - 1
            inputs[r, start:end], targets[r, start:end] = example_targets(ids, learned, mask_prompt, ignore_index)
            segment_ids[r, start:end] = segment
            start = end
        segment_ids[r, start:] = len(row)
    return inputs, targets, segment_ids


# ---------------------------------------------------------------------------------------------- chat

CHAT_ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = """A conversation {"messages": [{"role", "content"}, ...]} is rendered as plain text, one block per message,
blocks separated by a blank line, each assistant turn ended by <|endoftext|> (so generation stops where a turn ends):

    ### System:
    You answer in one word.

    ### User:
    Capital of France?

    ### Assistant:
    Paris.<|endoftext|>

    ### User:
    And of Italy?

    ### Assistant:
    Rome.<|endoftext|>

With mask_prompt, the learned tokens are each assistant turn's content and its <|endoftext|>; headers, system and user
turns are context only. A prompt for generation is the conversation so far followed by "### Assistant:\n"."""
CHAT_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
CHAT_SEPARATOR = "\n\n"


def validate_conversations(examples, source):
    """Raise a ValueError naming the first malformed conversation: every entry a {"messages": [...]} object, every
    message {"role": one of CHAT_ROLES, "content": non-empty string}, a system message only first, and at least one
    assistant turn (without one there is nothing to learn)."""
    for i, ex in enumerate(examples):
        messages = ex.get("messages") if isinstance(ex, dict) else None
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{source}: entry {i} has no non-empty 'messages' list; a chat dataset has {{'messages': [{{'role', 'content'}}, ...]}} in every entry")
        for j, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
                role = message.get("role") if isinstance(message, dict) else message
                raise ValueError(f"{source}: entry {i} message {j} has role {role!r}; use one of {', '.join(CHAT_ROLES)}")
            if not isinstance(message.get("content"), str) or not message["content"].strip():
                raise ValueError(f"{source}: entry {i} message {j} ({message['role']}) has no non-empty string 'content'")
            if message["role"] == "system" and j > 0:
                raise ValueError(f"{source}: entry {i} message {j} is a system message after the start; put the system message first")
            check_no_end_token(source, f"entry {i} message {j}", {"content": message["content"]})
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{source}: entry {i} has no assistant turn, so nothing to learn; every conversation needs at least one 'assistant' message")
        check_scoring_keys(ex, source, f"entry {i}")
    return examples


def tokenize_conversation(messages, tokenizer):
    """messages -> (ids, learned): the CHAT_TEMPLATE rendering, tokenized piece by piece (header, content, end), and
    one bool per token, True for the content and <|endoftext|> of assistant turns. Tokenizing the pieces apart keeps
    the boundary between context and learned tokens exact. The byte-level tokenizer gives the same ids for the whole
    text at once (chat_prompt's); GPT-2's BPE does too wherever a piece does not end in whitespace, since the pieces
    meet at newlines and its pre-tokenizer splits there anyway."""
    ids, learned = [], []
    for i, message in enumerate(messages):
        header = (CHAT_SEPARATOR if i else "") + CHAT_HEADERS[message["role"]]
        pieces = [(header, False), (message["content"], message["role"] == "assistant")]
        for text, is_learned in pieces:
            tokens = tokenizer.encode(text)
            ids += tokens
            learned += [is_learned] * len(tokens)
        if message["role"] == "assistant":
            ids.append(tokenizer.eot_token)
            learned.append(True)
    return ids, learned


def chat_prompt(messages):
    """The text a model continues to answer: the conversation up to its last assistant turn, then the assistant header.
    Returns (prompt text, the last assistant turn's content: the reference answer)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    text = ""
    for i, message in enumerate(messages[:last]):
        text += (CHAT_SEPARATOR if i else "") + CHAT_HEADERS[message["role"]] + message["content"]
        if message["role"] == "assistant":
            text += "<|endoftext|>"
    return text + (CHAT_SEPARATOR if last else "") + CHAT_HEADERS["assistant"], messages[last]["content"]


def example_prompt(example, template="alpaca"):
    """(prompt text a model continues, reference response or None) of an example to answer: an Alpaca example's
    format_prompt in `template` and its 'output' (if any); a conversation's chat_prompt (always CHAT_TEMPLATE,
    whatever `template` says) and its last assistant turn."""
    if "messages" in example:
        return chat_prompt(example["messages"])
    return format_prompt(example, template), example.get("output")


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
    accuracy (the key answer is in the response). Examples without a 'kind' are counted under 'all'.
    A conversation ({"messages": [...]}) was answered at its last assistant turn (example_prompt), so that turn is
    its reference output: exact match and token F1 against it; chat data has no key answers, so no accuracy."""
    per_example = []
    for ex, response in zip(examples, responses, strict=True):
        row = {"kind": ex.get("kind", "all")}
        reference = example_prompt(ex)[1]
        if reference:
            row["exact_match"] = exact_match(response, reference)
            row["f1"] = token_f1(response, reference)
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


# ---------------------------------------------------------------------------------------------- training data


LENGTH_WINDOW = 8  # --group_by_length sorts this many batches of the stream together: few enough that a batch of 8
# embedded examples still holds 5.8 of the 20 kinds on average (6.6 drawn at random)


class InstructionData:
    """Alpaca-format examples or chat conversations, split 85/5/10, tokenized, each epoch shuffled by (seed, epoch).
    With group_by_length, a batch holds examples of about one length (batch_of_similar_lengths). With pack, the
    training examples are packed once into rows of up to block_size positions (best-fit decreasing) and the rows are
    shuffled instead; validation and test batches stay unpacked (the loss is the same either way)."""

    def __init__(self, dataset, tokenizer, block_size, seed, mask_prompt, template="alpaca", pack=False, grad_accum=1,
                 group_by_length=False):
        self.train_examples, self.val_examples, self.test_examples = split_examples(load_examples(dataset))
        sizes = [len(self.train_examples), len(self.val_examples), len(self.test_examples)]
        if not all(sizes):
            raise UserError(f"dataset {dataset!r} has {sum(sizes)} examples, which the 85/5/10 split cuts into {sizes[0]} train / "
                            f"{sizes[1]} validation / {sizes[2]} test; every split needs one or more, so use at least 20 examples")
        max_length = block_size + 1  # inputs and targets are the sequence shifted by one
        self.train, dropped = tokenize_examples(self.train_examples, tokenizer, max_length, template)
        self.val, dropped_val = tokenize_examples(self.val_examples, tokenizer, max_length, template)
        self.test, dropped_test = tokenize_examples(self.test_examples, tokenizer, max_length, template)
        self.dropped = dropped + dropped_val + dropped_test
        for split, kept, examples in (("train", self.train, self.train_examples), ("validation", self.val, self.val_examples), ("test", self.test, self.test_examples)):
            if not kept:  # an empty split would train on nothing or report a loss of 0
                raise UserError(f"dataset {dataset!r}: all {len(examples)} {split} examples are longer than the model's context of "
                                f"{block_size} tokens; use shorter examples or a base with a longer block_size")
        self.pad, self.seed, self.mask_prompt, self.grad_accum = tokenizer.eot_token, seed, mask_prompt, grad_accum
        self.packed, self.block_size, self.group_by_length, self.epoch_order = None, block_size, group_by_length, {}
        if pack:
            self.packed = pack_examples(self.train, block_size)

    def train_batch(self, step, micro, batch_size):
        """(inputs, targets) of micro-batch `micro` (of grad_accum) of optimizer step `step`; with packing also
        segment_ids (see GPT.hidden_states). It depends on its arguments alone: a resumed run sees the same batches."""
        units = self.train if self.packed is None else self.packed  # examples, or rows of packed examples
        index = (step * self.grad_accum + micro) * batch_size  # position in the endless stream of epochs
        if self.group_by_length and self.packed is None:  # packed rows are full already
            chosen = self.batch_of_similar_lengths(index, batch_size)
        else:
            chosen = [self.stream_unit(i) for i in range(index, index + batch_size)]
        rows = [units[u] for u in chosen]
        if self.packed is not None:
            return collate_packed(rows, self.pad, self.mask_prompt)
        return collate(rows, self.pad, self.mask_prompt)

    def stream_unit(self, i):
        """Which example (or packed row) is at position i of the stream: epoch i // n, shuffled by (seed, epoch)."""
        n = len(self.train if self.packed is None else self.packed)
        epoch, offset = divmod(i, n)
        if epoch not in self.epoch_order:  # one epoch kept: batches are read in order, a window spans two at most
            shuffle = torch.Generator().manual_seed(self.seed + epoch)
            self.epoch_order = {epoch: torch.randperm(n, generator=shuffle).tolist()}
        return self.epoch_order[epoch][offset]

    def batch_of_similar_lengths(self, index, batch_size):
        """--group_by_length: the stream is read in windows of LENGTH_WINDOW batches; each window is sorted by length,
        cut into batches again, and its batches are taken in a shuffled order. Every example still comes once an epoch
        (a window may straddle two), but a batch holds examples of about one length, so less of it is padding: with
        batches of 8 on data/instructions.json, 22% of the positions -> 5%, and a step costs about 15% less (collate
        pads each batch to its longest example). HF Trainer's group_by_length sorts windows of up to 50 batches, longest
        first."""
        window = batch_size * LENGTH_WINDOW
        start = index - index % window
        pool = sorted((self.stream_unit(i) for i in range(start, start + window)), key=lambda u: len(self.train[u][0]))
        shuffle = torch.Generator().manual_seed(self.seed + 7_777_777 + start)  # apart from the epochs' seed + epoch
        order = torch.randperm(LENGTH_WINDOW, generator=shuffle).tolist()
        first = order[(index - start) // batch_size] * batch_size
        return pool[first : first + batch_size]

    def val_batches(self, batch_size, split="val"):
        rows = self.val if split == "val" else self.test
        return [collate(rows[i : i + batch_size], self.pad, self.mask_prompt) for i in range(0, len(rows), batch_size)]

    def describe(self):
        packed = ""
        if self.packed is not None:
            positions = sum(len(ids) - 1 for ids, _ in self.train)
            packed = f"; packed into {len(self.packed)} rows ({positions / (len(self.packed) * self.block_size):.0%} full)"
        return (f"{len(self.train)} train / {len(self.val)} validation / {len(self.test)} test examples"
                + (f" ({self.dropped} longer than the block size dropped)" if self.dropped else "") + packed)


# ---------------------------------------------------------------------------------------------- answering


def resolve_template(template, tokenizer_name):
    """--prompt_template auto: the bare template for the byte-level base, Alpaca's for GPT-2's tokenizer."""
    if template == "auto":
        return "bare" if tokenizer_name == "bytes" else "alpaca"
    return template


def check_max_new_tokens(max_new_tokens, block_size):
    if not 1 <= max_new_tokens < block_size:
        raise UserError(f"--max_new_tokens {max_new_tokens}: the model sees {block_size} tokens at a time and the prompt needs "
                        f"some of them, so use 1 to {block_size - 1}")


def answer_examples(model, tokenizer, examples, device, max_new_tokens=80, template="alpaca", batch_size=64):
    """Greedy responses to a list of examples, each cut at the end-of-text token: Alpaca {"instruction", "input"}
    examples prompted in `template`, conversations ({"messages": [...]}) answered at their last assistant turn in
    CHAT_TEMPLATE (example_prompt). Batched by complete_prompts."""
    return complete_prompts(model, tokenizer, [example_prompt(ex, template)[0] for ex in examples], device, max_new_tokens, batch_size)


def complete_prompts(model, tokenizer, prompt_texts, device, max_new_tokens=80, batch_size=64):
    """Greedy continuations of prompt texts, each cut at the end-of-text token. Prompts are sorted by length and
    batched; the shorter ones in a batch are left-padded, and the padding is masked (GPT.generate's left_padding), so
    each row gets the tokens it would get alone (to float rounding; tests/test_model.py and test_train.py check it)."""
    check_max_new_tokens(max_new_tokens, model.config.block_size)
    keep = model.config.block_size - max_new_tokens  # room for the answer; a longer prompt keeps its end
    prompts = [tokenizer.encode(text)[-keep:] for text in prompt_texts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # sorted: little padding in a batch
    groups = [order]
    if getattr(model, "prefix", None) is not None:  # a learned prefix (other_methods/prefix_tuning.py) fills the KV
        # cache ahead of every row, where no padding can go: with one, a batch holds prompts of one length only
        groups = [list(group) for _, group in itertools.groupby(order, key=lambda i: len(prompts[i]))]
    batches = [group[start : start + batch_size] for group in groups for start in range(0, len(group), batch_size)]
    responses = [""] * len(prompts)
    was_training = model.training
    model.eval()  # greedy answers must not depend on dropout (e.g. LoRA's), or a reloaded adapter could not reproduce them
    for batch in batches:
        width = max(len(prompts[i]) for i in batch)
        pads = [width - len(prompts[i]) for i in batch]
        rows = torch.tensor([[tokenizer.eot_token] * pad + prompts[i] for i, pad in zip(batch, pads)], device=device)
        out = model.generate(rows, max_new_tokens, temperature=0, eos_token_id=tokenizer.eot_token,
                             left_padding=torch.tensor(pads, device=device) if any(pads) else None)
        for i, tokens in zip(batch, out[:, width:].tolist()):
            tokens = tokens[: tokens.index(tokenizer.eot_token)] if tokenizer.eot_token in tokens else tokens
            responses[i] = tokenizer.decode(tokens).strip()
    model.train(was_training)
    return responses


def complete(model, tokenizer, prompt_text, device, max_new_tokens=80):
    """Greedy continuation of one prompt text (already in its template: format_prompt's, chat_prompt's, or none),
    cut at the end-of-text token."""
    return complete_prompts(model, tokenizer, [prompt_text], device, max_new_tokens)[0]


def answer(model, tokenizer, instruction, device, max_new_tokens=80, input_text="", template="alpaca"):
    """Greedy response to one instruction, cut at the end-of-text token."""
    return answer_examples(model, tokenizer, [{"instruction": instruction, "input": input_text}], device, max_new_tokens, template)[0]
