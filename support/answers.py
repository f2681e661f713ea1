"""Greedy answers to instructions, batched across prompt lengths, and the scores they get against the data's key
answers and reference outputs."""

import itertools
from collections import Counter

import torch

from support.files import UserError
from support.instructions import example_prompt


def check_max_new_tokens(max_new_tokens, block_size):
    if not 1 <= max_new_tokens < block_size:
        raise UserError(
            f"--max_new_tokens {max_new_tokens}: the model sees {block_size} tokens at a time and the prompt needs "
            f"some of them, so use 1 to {block_size - 1}"
        )


def answer_examples(model, tokenizer, examples, device, max_new_tokens=80, template="alpaca", batch_size=64):
    """Greedy responses to examples (an Alpaca example prompted in `template`, a conversation at its last assistant
    turn), each cut at the end-of-text token. Prompts are sorted by length and the shorter ones of a batch
    left-padded with the padding masked (GPT.generate's left_padding), so each gets what it would get alone."""
    check_max_new_tokens(max_new_tokens, model.config.block_size)
    keep = model.config.block_size - max_new_tokens  # room for the answer; a longer prompt keeps its end
    prompts = [tokenizer.encode(example_prompt(ex, template)[0])[-keep:] for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    groups = [order]
    if any(getattr(m, "method", None) == "prefix" for m in model.modules()):  # a learned prefix stands before every
        # row, where no padding can go (a smeared key would mix the prefix with filler): prompts of one length a batch
        groups = [list(group) for _, group in itertools.groupby(order, key=lambda i: len(prompts[i]))]
    batches = [group[start : start + batch_size] for group in groups for start in range(0, len(group), batch_size)]
    responses = [""] * len(prompts)
    was_training = model.training
    model.eval()  # greedy answers must not depend on dropout, or a reloaded adapter could not reproduce them
    for batch in batches:
        width = max(len(prompts[i]) for i in batch)
        pads = [width - len(prompts[i]) for i in batch]
        rows = torch.tensor([[tokenizer.eot_token] * pad + prompts[i] for i, pad in zip(batch, pads)], device=device)
        left_padding = torch.tensor(pads, device=device) if any(pads) else None
        out = model.generate(
            rows, max_new_tokens, temperature=0, eos_token_id=tokenizer.eot_token, left_padding=left_padding
        )
        for i, tokens in zip(batch, out[:, width:].tolist()):
            tokens = tokens[: tokens.index(tokenizer.eot_token)] if tokenizer.eot_token in tokens else tokens
            responses[i] = tokenizer.decode(tokens).strip()
    model.train(was_training)
    return responses


def answer(model, tokenizer, instruction, device, max_new_tokens=80, input_text="", template="alpaca"):
    """Greedy response to one instruction (answer_examples of one example)."""
    example = {"instruction": instruction, "input": input_text}
    return answer_examples(model, tokenizer, [example], device, max_new_tokens, template)[0]


def normalized_words(text, keep_case=False):
    """Lower-case words with the punctuation around them stripped (inside a word it stays: '1,234', "don't")."""
    words = (w.strip(".,;:!?\"'()[]") for w in (text if keep_case else text.lower()).split())
    return [w for w in words if w]


def contains_answer(response, answer):
    """The key answer appears in the response as whole words ('20' is not in '120'), case ignored unless the
    answer is written in capitals ('PEPPER' is not in 'pepper')."""
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
    """-> (overall, per kind, per example): exact match and token F1 against the reference (an 'output', or a
    conversation's last assistant turn), accuracy where there is a key 'answer'; no 'kind' counts as 'all'."""
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
