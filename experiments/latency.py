"""
The latency claim, measured: LoRA §3 and Table 1 in miniature.

LoRA's paper says adapters add inference latency (+20-30% at batch 1 on a GPU for GPT-2 medium, Table 1) and a
merged LoRA adds none. This script times one forward pass (logits for every position) of the same random base in
several forms, at batch 1 x 128 tokens and at a larger batch:

    base            the frozen model
    lora_merged     LoRA r=8 on q,v folded into the weights (lora.merge_lora)
    lora_unmerged   the same adapter kept beside the weights: two extra thin matmuls per adapted layer
    houlsby         bottleneck adapters (m=64 on GPT-2's 768) after attention and MLP, and per-adapter LayerNorms
    pfeiffer        one bottleneck adapter after the MLP
    prefix          10 virtual tokens: every layer attends over 138 positions instead of 128
    ia3             (IA)³ vectors applied on the fly (merged, it is the base: ia3.merge_ia3)
    llama_adapter   LLaMA-Adapter, 10 prompts in every layer: 10 more keys per query, a second softmax, open gates

Each form runs once per round, in an order that rotates from round to round, and the table gives each one's
median over the rounds as a ratio to the base's median: drifts of a shared machine hit all forms alike. The minimum
over the rounds (the least-disturbed run) is recorded too: when other jobs share the core, it is the steadier figure.

    python -m experiments.latency                               # GPT-2 124M's shape, batch 1 and 8, 15 rounds
    python -m experiments.latency --shape tiny --rounds 40      # the tiny base's shape (4 x 256, byte-level)

Writes --out (default experiments/results/latency.json) and prints a markdown table.
"""

import argparse
import copy
import os
import platform
import statistics
import sys
import time

import torch

import lora
from model import GPT, GPTConfig
from other_methods.adapters import apply_adapters
from other_methods.ia3 import apply_ia3
from other_methods.llama_adapter import apply_llama_adapter
from other_methods.prefix_tuning import apply_prefix_tuning
from support.files import write_json_atomic

SHAPES = {  # name -> (GPTConfig, Houlsby bottleneck m)
    "gpt2": (GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768), 64),
    "tiny": (GPTConfig(block_size=512, vocab_size=257, n_layer=4, n_head=4, n_embd=256), 16),
}
FORMS = ("base", "lora_merged", "lora_unmerged", "houlsby", "pfeiffer", "prefix", "ia3", "llama_adapter")


def perturb_trainable(model, seed=0, scale=0.02):
    """Nonzero adapters, as after training (a zero up-projection or B would not change the work, but be honest)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def build_forms(config, bottleneck, prefix_tokens):
    torch.manual_seed(0)
    base = GPT(config).eval().requires_grad_(False)
    forms = {"base": base}
    for name in FORMS[1:]:
        model = copy.deepcopy(base)
        torch.manual_seed(1)  # the same adapter in lora_merged and lora_unmerged
        if name.startswith("lora"):
            lora.apply_lora(model, rank=8, alpha=16, targets=("q", "v"))
        elif name in ("houlsby", "pfeiffer"):
            apply_adapters(model, bottleneck=bottleneck, placement=name)
        elif name == "prefix":
            apply_prefix_tuning(model, num_virtual_tokens=prefix_tokens)
        elif name == "llama_adapter":
            apply_llama_adapter(model, prompt_length=prefix_tokens)
        else:
            apply_ia3(model)
        perturb_trainable(model)
        if name == "lora_merged":
            lora.merge_lora(model)
        forms[name] = model.eval().requires_grad_(False)
    return forms


def measure(forms, batch, tokens, rounds, vocab):
    idx = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(1))
    times = {name: [] for name in forms}
    names = list(forms)
    with torch.inference_mode():
        for name in names:  # warm-up: first calls allocate
            forms[name](idx)
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                t0 = time.perf_counter()
                forms[name](idx)
                times[name].append(time.perf_counter() - t0)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=tuple(SHAPES), default="gpt2")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--prefix_tokens", type=int, default=10)
    parser.add_argument("--out", default="experiments/results/latency.json")
    args = parser.parse_args(argv)
    config, bottleneck = SHAPES[args.shape]
    forms = build_forms(config, bottleneck, args.prefix_tokens)
    results = {
        "shape": args.shape,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "command": " ".join(sys.argv),
        "batches": {},
    }
    for batch in (int(b) for b in args.batches.split(",")):
        times = measure(forms, batch, args.tokens, args.rounds, config.vocab_size)
        medians = {name: statistics.median(t) for name, t in times.items()}
        minima = {
            name: min(t) for name, t in times.items()
        }  # the least-disturbed run: robust when other jobs share the core
        results["batches"][str(batch)] = {
            name: {
                "median_ms": round(1000 * m, 3),
                "ratio": round(m / medians["base"], 3),
                "min_ms": round(1000 * minima[name], 3),
                "ratio_of_min": round(minima[name] / minima["base"], 3),
                "samples_ms": [round(1000 * t, 3) for t in times[name]],
            }
            for name, m in medians.items()
        }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json_atomic(results, args.out)
    batches = list(results["batches"])
    print(
        f"forward pass, {args.shape} shape, {args.tokens} tokens, median of {args.rounds} rotating rounds, {results['threads']} thread(s)"
    )
    print("| form | " + " | ".join(f"batch {b}: median ms | ratio | min ms | ratio" for b in batches) + " |")
    print("|---|" + "---:|---:|---:|---:|" * len(batches))
    for name in results["batches"][batches[0]]:
        cells = " | ".join(
            f"{results['batches'][b][name]['median_ms']:.1f} | {results['batches'][b][name]['ratio']:.3f} | "
            f"{results['batches'][b][name]['min_ms']:.1f} | {results['batches'][b][name]['ratio_of_min']:.3f}"
            for b in batches
        )
        print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main()
