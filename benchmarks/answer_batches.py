"""
How long the default job's 400 answers before training take, batched as train.py batches them, and as it did before
prompts of different lengths could share a batch. The tiny base with train.py's default adapters, freshly made (B = 0,
so it answers as the base does), answers the embedded set's test prompts twice, 80 new tokens each:

    python -m benchmarks.answer_batches      # needs checkpoints/tiny-base (python train.py makes it); ~1 minute

1. as train.py does it: support.answers.answer_examples, which sorts the prompts by length and left-pads the
   shorter ones in each batch of 64 (GPT.generate's left_padding);
2. the prompts of each length apart, as many batches as lengths (how train.py answered until left padding).
Both must give the same answers; the script says whether they did.
"""

import argparse
import sys
import time

import torch

import train
from lora import apply_lora
from support.answers import answer_examples
from support.checkpoints import load_base_model
from support.cli import error_line, main_errors
from support.instructions import InstructionData, example_prompt, resolve_template
from support.tokenizer import get_tokenizer

BATCH = 64  # answer_examples's batch size


def measure(init_from="tiny", limit=None, new_tokens=80):
    """Time both ways of answering the first `limit` test prompts (all by default); print and return the figures."""
    cfg = train.resolve_defaults(train.TrainConfig(init_from=init_from, device="cpu"))  # train.py's defaults
    torch.manual_seed(cfg.seed)
    model, tokenizer_name = load_base_model(cfg.init_from, "cpu", progress=False, pretrain=False)
    apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha or None, targets=cfg.lora_targets)
    tokenizer, template = get_tokenizer(tokenizer_name), resolve_template(cfg.prompt_template, tokenizer_name)
    data = InstructionData(cfg.dataset, tokenizer, model.config.block_size, cfg.seed, cfg.mask_prompt, template)
    examples = data.test_examples[:limit]
    keep = model.config.block_size - new_tokens  # answer_examples crops a longer prompt to its end the same way
    prompts = [tokenizer.encode(example_prompt(ex, template)[0])[-keep:] for ex in examples]
    lengths = sorted({len(p) for p in prompts})
    print(
        f"{len(prompts)} test prompts of {lengths[0]}-{lengths[-1]} tokens, {len(lengths)} distinct lengths; "
        f"{torch.get_num_threads()} threads"
    )

    start = time.perf_counter()
    padded = answer_examples(model, tokenizer, examples, "cpu", new_tokens, template)
    padded_seconds = time.perf_counter() - start
    batches = -(-len(prompts) // BATCH)
    print(f"sorted by length, left-padded, {batches} batches of up to {BATCH}: {padded_seconds:.1f} s")

    start = time.perf_counter()
    grouped = [None] * len(examples)
    for length in lengths:  # each length its own call: no row of a batch is padded
        rows = [i for i, p in enumerate(prompts) if len(p) == length]
        for i, answer in zip(
            rows, answer_examples(model, tokenizer, [examples[i] for i in rows], "cpu", new_tokens, template)
        ):
            grouped[i] = answer
    grouped_seconds = time.perf_counter() - start
    same = grouped == padded
    print(
        f"one length per batch ({len(lengths)} lengths): {grouped_seconds:.1f} s "
        f"({grouped_seconds / padded_seconds:.1f}x the time); the same {len(prompts)} answers: {'yes' if same else 'NO'}"
    )
    return {
        "prompts": len(prompts),
        "lengths": len(lengths),
        "batches": batches,
        "padded_seconds": padded_seconds,
        "grouped_seconds": grouped_seconds,
        "same_answers": same,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    parser.add_argument(
        "--init_from", default="tiny", help="the base, as train.py's --init_from (default: the tiny base)"
    )
    parser.add_argument("--limit", type=int, default=None, help="answer the first N test prompts only (default: all)")
    parser.add_argument(
        "--new_tokens", type=int, default=80, help="tokens generated per answer (train.py's default: 80)"
    )
    args = parser.parse_args()
    try:
        measure(args.init_from, args.limit, args.new_tokens)
    except main_errors() as e:
        sys.exit(error_line(e))
