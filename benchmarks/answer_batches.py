"""
How long the default job's 400 answers before training take, and what batching prompts of different lengths could
save (docs/results.md, "1,800 fine-tuning steps"). The tiny base with fresh LoRA adapters (B = 0, so it answers as
the base does) answers the embedded set's test prompts twice, 80 new tokens each:

    python -m benchmarks.answer_batches      # needs checkpoints/tiny-base (python train.py makes it); ~1 minute

1. as train.py does it: support.instructions.answer_examples, which batches prompts of equal length only;
2. an estimate of batching across lengths: every prompt cropped to the shortest one's length, in batches of 64, with
   no end token so every row runs all 80 steps (as the base's rows do before training). Cropping changes the
   answers; left padding would keep them and add a mask, so this is what the batching costs without the mask.
"""

import sys
import time

import torch

from lora import apply_lora
from support.checkpoints import load_base_model
from support.instructions import InstructionData, answer_examples, example_prompt
from support.safety import error_line, main_errors
from support.tokenizer import get_tokenizer

NEW_TOKENS, BATCH = 80, 64


def main():
    torch.manual_seed(1337)
    model, tokenizer_name = load_base_model("tiny", "cpu", progress=False, pretrain=False)
    apply_lora(model, rank=32, alpha=64, targets="all-linear")  # what train.py answers with before its first step
    tokenizer = get_tokenizer(tokenizer_name)
    data = InstructionData("embedded", tokenizer, model.config.block_size, 1337, True, "compact")
    examples = data.test_examples
    prompts = [tokenizer.encode(example_prompt(ex, "compact")[0]) for ex in examples]
    lengths = sorted({len(p) for p in prompts})
    print(f"{len(prompts)} test prompts of {lengths[0]}-{lengths[-1]} bytes, {len(lengths)} distinct lengths; "
          f"{torch.get_num_threads()} threads")

    start = time.perf_counter()
    answer_examples(model, tokenizer, examples, "cpu", NEW_TOKENS, "compact")
    grouped = time.perf_counter() - start
    print(f"batched by equal length ({len(lengths)} lengths, up to {BATCH} a batch): {grouped:.1f} s")

    model.eval()
    cropped = torch.tensor([p[-lengths[0]:] for p in prompts])
    start = time.perf_counter()
    for i in range(0, len(prompts), BATCH):
        model.generate(cropped[i : i + BATCH], NEW_TOKENS, temperature=0)
    batched = time.perf_counter() - start
    print(f"cropped to {lengths[0]} bytes, {-(-len(prompts) // BATCH)} batches of up to {BATCH}: {batched:.1f} s "
          f"({grouped / batched:.1f}x faster)")


if __name__ == "__main__":
    try:
        main()
    except main_errors() as e:
        sys.exit(error_line(e))
