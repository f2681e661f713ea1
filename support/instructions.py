"""Instruction data: prompt templates, the chat format, tokenizing, collating and packing with the prompt masked
(targets -100), and the batches a run draws (InstructionData)."""

import bisect

import torch

from support.files import UserError
from support.instruction_files import load_examples, split_examples

PROMPT_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
# "alpaca" is Alpaca's own; "compact" drops the preamble; "bare" the section markers too: a byte-level model pays
# for every prompt byte and learns nothing from text that never changes, so the tiny base uses "bare".
TEMPLATES = ("alpaca", "compact", "bare")
# kinds of the embedded set whose answer is a fact about the world, not a rule applied to the prompt
FACT_KINDS = ("capital", "animal_class", "antonym")


def format_prompt(example, template="alpaca"):
    """The Alpaca prompt (Taori et al. 2023), '### Input:' only when there is an input, in `template`."""
    if template not in TEMPLATES:
        raise ValueError(f"prompt template {template!r}: use one of {', '.join(TEMPLATES)}")
    if template == "bare":  # a blank line is what tells the response apart
        return example["instruction"] + (f"\n{example['input']}" if example.get("input") else "") + "\n\n"
    prompt = (f"{PROMPT_HEADER}\n\n" if template == "alpaca" else "") + f"### Instruction:\n{example['instruction']}"
    if example.get("input"):
        prompt += f"\n\n### Input:\n{example['input']}"
    return prompt + "\n\n### Response:\n"


def resolve_template(template, tokenizer_name):
    """--prompt_template auto: the bare template for the byte-level base, Alpaca's for GPT-2's tokenizer."""
    if template == "auto":
        return "bare" if tokenizer_name == "bytes" else "alpaca"
    return template


def tokenize_examples(examples, tokenizer, max_length, template="alpaca"):
    """-> ([(token ids, prompt length or one learned flag per token)], how many were longer than max_length and
    dropped: cutting one would cut its response and its end-of-text token)."""
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
    """(ids[:-1], ids[1:]); with mask_prompt a target that is not a learned token becomes ignore_index."""
    ids = torch.tensor(ids, dtype=torch.long)
    inputs, targets = ids[:-1], ids[1:].clone()
    if mask_prompt:
        if isinstance(learned, int):
            targets[: learned - 1] = ignore_index
        else:
            targets[~torch.tensor(learned[1:], dtype=torch.bool)] = ignore_index
    return inputs, targets


def collate(batch, pad_token, mask_prompt=False, ignore_index=-100):
    """Examples -> (inputs, targets), each (B, longest - 1), padded with pad_token and ignore_index."""
    return collate_packed([[example] for example in batch], pad_token, mask_prompt, ignore_index)[:2]


# ---------------------------------------------------------------------------------------------- packing


def pack_examples(examples, capacity):
    """Rows of at most `capacity` input positions by best-fit decreasing (TRL's default): longest example first,
    each into the fullest row it still fits, a new row when none has room."""
    order = sorted(range(len(examples)), key=lambda i: -(len(examples[i][0]) - 1))  # stable: ties keep their order
    rows, free = [], []  # free: sorted (space left, row index) pairs
    for i in order:
        size = len(examples[i][0]) - 1
        if size > capacity:
            raise ValueError(
                f"an example of {size + 1} tokens cannot be packed into rows of {capacity} positions; drop examples longer than the context first"
            )
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
    """Packed rows -> (inputs, targets, segment_ids): each example as collate gives it alone, numbered 0, 1, ... in
    its row so that GPT.forward restarts positions and attends within an example; padding is one more segment."""
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

CHAT_TEMPLATE = """A conversation {"messages": [{"role", "content"}, ...]} as plain text, a blank line between messages:
"### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\nHello.<|endoftext|>". With mask_prompt only each assistant
turn's content and its <|endoftext|> are learned; a prompt ends in "### Assistant:\n"."""
CHAT_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
CHAT_SEPARATOR = "\n\n"


def tokenize_conversation(messages, tokenizer):
    """-> (ids, one learned flag per token), tokenized piece by piece so the learned boundary is exact."""
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
    """(the conversation before its last assistant turn + the assistant header, that turn's content)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    text = ""
    for i, message in enumerate(messages[:last]):
        text += (CHAT_SEPARATOR if i else "") + CHAT_HEADERS[message["role"]] + message["content"]
        if message["role"] == "assistant":
            text += "<|endoftext|>"
    return text + (CHAT_SEPARATOR if last else "") + CHAT_HEADERS["assistant"], messages[last]["content"]


def example_prompt(example, template="alpaca"):
    """(prompt text, reference or None); a conversation is always in CHAT_TEMPLATE, whatever `template` says."""
    if "messages" in example:
        return chat_prompt(example["messages"])
    return format_prompt(example, template), example.get("output")


# ---------------------------------------------------------------------------------------------- training data


LENGTH_WINDOW = 8  # --group_by_length sorts this many batches together: few enough that a batch still mixes kinds


class InstructionData:
    """A dataset split 85/5/10 and tokenized; each epoch shuffled by (seed, epoch), optionally grouped by length or
    packed (training rows only: the loss is the same either way)."""

    def __init__(
        self,
        dataset,
        tokenizer,
        block_size,
        seed,
        mask_prompt,
        template="alpaca",
        pack=False,
        grad_accum=1,
        group_by_length=False,
    ):
        self.grad_accum, self.group_by_length = grad_accum, group_by_length
        self.train_examples, self.val_examples, self.test_examples = split_examples(load_examples(dataset))
        sizes = [len(self.train_examples), len(self.val_examples), len(self.test_examples)]
        if not all(sizes):
            raise UserError(
                f"dataset {dataset!r} has {sum(sizes)} examples, which the 85/5/10 split cuts into {sizes[0]} train / "
                f"{sizes[1]} validation / {sizes[2]} test; every split needs one or more, so use at least 20 examples"
            )
        self.dropped, splits = 0, []
        named = zip(("train", "validation", "test"), (self.train_examples, self.val_examples, self.test_examples))
        for split, examples in named:
            kept, dropped = tokenize_examples(examples, tokenizer, block_size + 1, template)  # inputs + 1 target
            if not kept:  # an empty split would train on nothing or report a loss of 0
                raise UserError(
                    f"dataset {dataset!r}: all {len(examples)} {split} examples are longer than the model's context of "
                    f"{block_size} tokens; use shorter examples or a base with a longer block_size"
                )
            self.dropped, splits = self.dropped + dropped, splits + [kept]
        self.train, self.val, self.test = splits
        self.pad, self.seed, self.mask_prompt, self.block_size = tokenizer.eot_token, seed, mask_prompt, block_size
        self.epoch_order = {}
        self.packed = pack_examples(self.train, block_size) if pack else None

    def train_batch(self, step, micro, batch_size):
        """The batch of (step, micro) alone, so a resumed run sees the same batches; packed: with segment_ids."""
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
        """The example (or packed row) at position i of the stream: epoch i // n, shuffled by (seed, epoch)."""
        n = len(self.train if self.packed is None else self.packed)
        epoch, offset = divmod(i, n)
        if epoch not in self.epoch_order:  # one epoch kept: batches are read in order, a window spans two at most
            shuffle = torch.Generator().manual_seed(self.seed + epoch)
            self.epoch_order = {epoch: torch.randperm(n, generator=shuffle).tolist()}
        return self.epoch_order[epoch][offset]

    def batch_of_similar_lengths(self, index, batch_size):
        """Windows of LENGTH_WINDOW batches, each sorted by length, cut into batches taken in a shuffled order:
        every example still comes once an epoch, with little padding in its batch."""
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
        text = f"{len(self.train)} train / {len(self.val)} validation / {len(self.test)} test examples"
        text += f" ({self.dropped} longer than the block size dropped)" if self.dropped else ""
        if self.packed is not None:
            full = sum(len(ids) - 1 for ids, _ in self.train) / (len(self.packed) * self.block_size)
            text += f"; packed into {len(self.packed)} rows ({full:.0%} full)"
        return text
