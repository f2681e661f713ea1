"""
How long the default job's 400 answers before training take, and what batching prompts of different lengths could
save (docs/results.md, "1,800 fine-tuning steps"). The tiny base with train.py's default adapters, freshly made (B = 0,
so it answers as the base does), answers the embedded set's test prompts twice, 80 new tokens each:

    python -m benchmarks.answer_batches      # needs checkpoints/tiny-base (python train.py makes it); ~1 minute

1. as train.py does it: support.instructions.answer_examples, which batches prompts of equal length only;
2. an estimate of batching across lengths: every prompt cropped to the shortest one's length, in batches of 64, with
   no end token so every row runs all its steps (as the base's rows do before training). Cropping changes the
   answers; left padding would keep them and add a mask, so this is what the batching costs without the mask.
"""

import argparse
import sys
import time

import torch

import train
from lora import apply_lora
from support.checkpoints import load_base_model
from support.instructions import InstructionData, answer_examples, example_prompt, resolve_template
from support.safety import error_line, main_errors
from support.tokenizer import get_tokenizer

BATCH = 64  # what answer_examples uses for a batch of equal-length prompts


def measure(init_from="tiny", limit=None, new_tokens=80):
    """Time both ways of answering the first `limit` test prompts (all by default); print and return the figures."""
    cfg = train.resolve_defaults(train.TrainConfig(init_from=init_from, device="cpu"))  # train.py's defaults
    torch.manual_seed(cfg.seed)
    model, tokenizer_name = load_base_model(cfg.init_from, "cpu", progress=False, pretrain=False)
    apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets)
    tokenizer, template = get_tokenizer(tokenizer_name), resolve_template(cfg.prompt_template, tokenizer_name)
    data = InstructionData(cfg.dataset, tokenizer, model.config.block_size, cfg.seed, cfg.mask_prompt, template)
    examples = data.test_examples[:limit]
    keep = model.config.block_size - new_tokens  # answer_examples crops a longer prompt to its end the same way
    prompts = [tokenizer.encode(example_prompt(ex, template)[0])[-keep:] for ex in examples]
    lengths = sorted({len(p) for p in prompts})
    print(f"{len(prompts)} test prompts of {lengths[0]}-{lengths[-1]} tokens, {len(lengths)} distinct lengths; "
          f"{torch.get_num_threads()} threads")

    start = time.perf_counter()
    answer_examples(model, tokenizer, examples, "cpu", new_tokens, template)
    grouped = time.perf_counter() - start
    print(f"batched by equal length ({len(lengths)} lengths, up to {BATCH} a batch): {grouped:.1f} s")

    model.eval()
    cropped = torch.tensor([p[-lengths[0]:] for p in prompts])
    batches = -(-len(prompts) // BATCH)
    start = time.perf_counter()
    for i in range(0, len(prompts), BATCH):
        model.generate(cropped[i : i + BATCH], new_tokens, temperature=0)
    batched = time.perf_counter() - start
    print(f"cropped to {lengths[0]} tokens, {batches} batches of up to {BATCH}: {batched:.1f} s "
          f"({grouped / batched:.1f}x faster)")
    return {"prompts": len(prompts), "lengths": len(lengths), "batches": batches, "grouped_seconds": grouped,
            "batched_seconds": batched}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    parser.add_argument("--init_from", default="tiny", help="the base, as train.py's --init_from (default: the tiny base)")
    parser.add_argument("--limit", type=int, default=None, help="answer the first N test prompts only (default: all)")
    parser.add_argument("--new_tokens", type=int, default=80, help="tokens generated per answer (train.py's default: 80)")
    args = parser.parse_args()
    try:
        measure(args.init_from, args.limit, args.new_tokens)
    except main_errors() as e:
        sys.exit(error_line(e))
