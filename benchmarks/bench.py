"""
Is this from-scratch code slower or heavier than what you would otherwise use? This script runs the same work
through our model.py / lora.py / quantize.py and through Hugging Face transformers' GPT2LMHeadModel (+ peft LoRA,
+ bitsandbytes NF4), in one process, on one machine, alternating the two, and prints medians and ratios:

    python -m benchmarks.bench                   # GPT-2 124M's shape, batch 4 x 128 tokens, every row (~10 min on 2 CPU cores)
    python -m benchmarks.bench --quick           # the tiny base's shape (4 layers x 256, bytes), 2 repeats: about a minute
    python -m benchmarks.bench --only train,nf4 --repeats 10
    python -m benchmarks.bench --only train_lora_qv_masked,peak_lora_qv_masked,classify   # issue 15's rows
    python -m benchmarks.bench --device cuda     # the same on a GPU (fp32 everywhere, as on the CPU)

(from the repository root).

It writes benchmarks/results.json (every sample) and benchmarks/results.md (the table the README shows).

Like with like: both models get identical random weights in GPT-2's shape (one copy saved to a temporary directory
and loaded by both libraries), fp32, dropout 0, PyTorch's scaled_dot_product_attention, the same batch, the same
AdamW and the same thread count. HF fuses q, k and v into one `c_attn`, so PEFT's LoRA on c_attn adapts all three
with one A (r x 768) and one B (2304 x r); we adapt q and v separately (the LoRA paper's choice), which happens to
train exactly as many parameters, and also show ours on q, k, v. QLoRA on both sides: NF4 blocks of 64, double
quantization, fp32 compute, LoRA r=8 on top.
"""

import argparse
import ctypes
import functools
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from lora import apply_lora, merge_lora
from model import GPT, count_parameters
from quantize import quantize_model, quantize_nf4
from support import fast_dequantize
from support.files import REPO_DIR
from support.runs import peak_memory_bytes, reset_peak_memory

SHAPES = {  # model shape, and the work done with it
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024, batch=4, seq=128, new_tokens=64),
    # the offline tiny base that `python train.py` fine-tunes: byte-level, 4 layers x 256
    "small": dict(n_layer=4, n_head=4, n_embd=256, vocab_size=257, block_size=512, batch=4, seq=128, new_tokens=32),
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, vocab_size=512, block_size=64, batch=2, seq=32, new_tokens=8),  # tests
}
LORA_RANK, LORA_ALPHA = 8, 16
TRAIN_MODES = {  # mode -> (our LoRA targets, NF4 base?); PEFT always adapts the fused c_attn
    "full": (None, False),
    "lora_qv": (("q", "v"), False),
    "lora_qkv": (("q", "k", "v"), False),
    "qlora_qv": (("q", "v"), True),
    "qlora_qkv": (("q", "k", "v"), True),
}
# Issue 15: the same LoRA step when half of every row's positions have no target (-100), as with train.py --mask_prompt:
# ours skips the output layer there, HF computes every logit. Row mode -> the TRAIN_MODES mode it builds.
MASKED_MODES = {"lora_qv_masked": "lora_qv"}
MODE_LABELS = {
    "full": "full fine-tuning",
    "lora_qv": "LoRA r=8: ours q,v; PEFT c_attn",
    "lora_qkv": "LoRA r=8: ours q,k,v; PEFT c_attn",
    "qlora_qv": "QLoRA NF4+DQ, LoRA r=8: ours q,v; PEFT c_attn",
    "qlora_qkv": "QLoRA NF4+DQ, LoRA r=8: ours q,k,v; PEFT c_attn",
    "lora_qv_masked": "LoRA r=8, half the positions without a target: ours q,v; PEFT c_attn",
}
TRAIN_ROWS = [f"train_{m}" for m in (*TRAIN_MODES, *MASKED_MODES)]  # seconds per step
PARAM_ROWS = [f"params_{m}" for m in TRAIN_MODES]  # trainable parameters
STATE_ROWS = [f"state_{m}" for m in TRAIN_MODES]  # bytes of weights + gradients + AdamW state
PEAK_ROWS = [f"peak_{m}" for m in (*TRAIN_MODES, *MASKED_MODES)]  # peak memory of a training step
CLASSIFY_MESSAGES, CLASSIFY_BATCH, CLASSIFY_EPOCHS = (
    32,
    8,
    5,
)  # the classification row: random messages of seq/8 .. seq/4 tokens
ROW_GROUPS = {  # --only takes these group names or the row ids; the table lists rows in this order
    "train": TRAIN_ROWS + PARAM_ROWS,
    "infer": ["infer_base", "infer_lora", "infer_lora_merged", "infer_qlora"],
    "generate": ["generate"],
    "nf4": ["nf4_quantize", "nf4_dequantize", "nf4_dequantize_table", "nf4_dequantize_kernel"],
    "classify": ["classify_last_block"],
    "memory": STATE_ROWS + PEAK_ROWS,
}
ALL_ROWS = [row for rows in ROW_GROUPS.values() for row in rows]


# ---------------------------------------------------------------------------------------------- the two models


def save_random_gpt2(shape, directory, seed=0):
    """One random GPT2LMHeadModel (GPT-2's init) in HF format: config.json + model.safetensors, which both
    libraries load, so ours and HF compute the same function."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=shape["vocab_size"],
        n_positions=shape["block_size"],
        n_embd=shape["n_embd"],
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


def build_ours(mode, weights_dir, device, dequantize="reference"):
    """Our GPT for a TRAIN_MODES (or MASKED_MODES) mode, trainable parameters set, in train mode. A QLoRA mode's
    4-bit layers dequantize by `dequantize` (fast_dequantize.PATHS)."""
    targets, quantized = TRAIN_MODES[MASKED_MODES.get(mode, mode)]
    model = GPT.from_pretrained(weights_dir).to(device)
    if quantized:  # fp32 compute, like bnb_4bit_compute_dtype=float32 below (on a GPU ours would default to bf16)
        quantize_model(model, block_size=64, double_quant=True, compute_dtype=torch.float32)
        fast_dequantize.use_fast_dequantize(model, dequantize)
    if targets is not None:
        apply_lora(model, rank=LORA_RANK, alpha=LORA_ALPHA, targets=targets, dropout=0.0)
    return model.train()


def build_hf(mode, weights_dir, device):
    """GPT2LMHeadModel for the same mode: + peft LoRA on c_attn, + bitsandbytes NF4 with double quantization."""
    from transformers import BitsAndBytesConfig, GPT2LMHeadModel

    targets, quantized = TRAIN_MODES[MASKED_MODES.get(mode, mode)]
    # disable_mmap: read the weights into memory, as ours does. Memory-mapped, HF's weights would sit in the page
    # cache (counted in RSS, including pages of the fp32 weights that were quantized away) instead of in the heap.
    if quantized:
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        model = GPT2LMHeadModel.from_pretrained(
            weights_dir,
            attn_implementation="sdpa",
            dtype=torch.float32,
            disable_mmap=True,
            quantization_config=bnb,
            device_map={"": device},
        )
    else:
        model = GPT2LMHeadModel.from_pretrained(
            weights_dir, attn_implementation="sdpa", dtype=torch.float32, disable_mmap=True
        ).to(device)
    if targets is not None:
        from peft import LoraConfig, get_peft_model

        # GPT-2's Conv1D stores weights as (in, out): fan_in_fan_out; bitsandbytes' Linear4bit is a plain (out, in)
        config = LoraConfig(
            r=LORA_RANK,
            lora_alpha=LORA_ALPHA,
            lora_dropout=0.0,
            target_modules=["c_attn"],
            fan_in_fan_out=not quantized,
            bias="none",
        )
        model = get_peft_model(model, config)
    return model.train()


def quiet_transformers():
    """No progress bars or advice from transformers and peft in the middle of the table."""
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*"
    )  # peft calls a deprecated transformers API


def trainable_parameters(model):
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model):
    """The same AdamW for both: one group, decoupled weight decay, PyTorch's default implementation."""
    return torch.optim.AdamW(trainable_parameters(model), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)


def training_step(model, optimizer, tokens, is_hf, masked=False):
    """A closure doing forward + backward + AdamW step on tokens (B, T + 1). masked: the first half of every row's
    positions have no target (-100), like a masked prompt; the same positions for both libraries."""
    x, y, labels = tokens[:, :-1], tokens[:, 1:], tokens[:, :-1]
    if masked:
        half = x.size(1) // 2
        y, labels = y.clone(), labels.clone()
        y[:, :half] = -100  # ours: y[:, t] is position t's target
        labels[:, : half + 1] = -100  # HF: labels[:, t + 1] is position t's target

    def step():
        if is_hf:  # HF shifts labels itself: position t predicts labels[t + 1]
            loss = model(input_ids=x, labels=labels).loss
        else:
            loss = model(x, y)[1]  # as train.py trains: logits only where a target is
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def state_bytes(model, optimizer):
    """(weights, gradients, optimizer state) in bytes, every tensor counted once. bitsandbytes keeps a 4-bit
    layer's scales in weight.quant_state rather than in a parameter or buffer, so those are added by hand."""
    weights = {}
    for t in (*model.parameters(), *model.buffers()):
        weights[t.data_ptr()] = t.numel() * t.element_size()
    for module in model.modules():
        quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
        while quant_state is not None:  # the absmax of the absmax ("state2") with double quantization
            for t in (quant_state.absmax, quant_state.code, getattr(quant_state, "offset", None)):
                if torch.is_tensor(t):
                    weights[t.data_ptr()] = t.numel() * t.element_size()
            quant_state = getattr(quant_state, "state2", None)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    states = sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )
    return sum(weights.values()), grads, states


def random_tokens(shape, rows, length, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(shape["vocab_size"], (rows, length), generator=g).to(device)


# ---------------------------------------------------------------------------------------------- timing


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def alternate(ours, hf, repeats, warmup, device):
    """Run ours and HF one after the other, `warmup` times untimed, then `repeats` times timed; the order flips
    every repeat (ours, HF, HF, ours, ...) so neither always runs in the other's wake. Returns two lists of seconds."""
    for _ in range(warmup):
        ours()
        hf()
    times = {"ours": [], "hf": []}
    for i in range(repeats):
        for name in ("ours", "hf") if i % 2 == 0 else ("hf", "ours"):
            fn = ours if name == "ours" else hf
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times["ours"], times["hf"]


def record(results, row, label, unit, ours, hf, higher_is_better=None, **extra):
    """One table row. ours/hf: a number or a list of samples (the median is reported)."""
    entry = dict(label=label, unit=unit, higher_is_better=higher_is_better, **extra)
    for name, value in (("ours", ours), ("hf", hf)):
        if isinstance(value, list):
            entry[name + "_samples"] = value
            value = statistics.median(value)
        entry[name] = value
    entry["ratio"] = entry["ours"] / entry["hf"] if entry["hf"] else None
    results[row] = entry
    ratio = f"{entry['ratio']:.2f}" if entry["ratio"] is not None else "-"
    print(
        f"  {label:<58} ours {format_value(entry['ours'], unit):>12}   HF {format_value(entry['hf'], unit):>12}   ours/HF {ratio}",
        flush=True,
    )


def release():
    """Hand back the memory of the models the caller has just deleted, before building the next ones."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- the rows


def bench_training(args, shape, weights_dir, wanted, results):
    """Training step time, trainable parameters and weights + gradients + AdamW state, per mode."""
    tokens = random_tokens(shape, shape["batch"], shape["seq"] + 1, args.device)
    for mode in (*TRAIN_MODES, *MASKED_MODES):
        rows = [f"train_{mode}", f"params_{mode}", f"state_{mode}"]
        if not any(r in wanted for r in rows):
            continue
        ours, hf = build_ours(mode, weights_dir, args.device, args.dequantize), build_hf(mode, weights_dir, args.device)
        ours_opt, hf_opt = make_optimizer(ours), make_optimizer(hf)
        masked = mode in MASKED_MODES
        ours_step, hf_step = (
            training_step(ours, ours_opt, tokens, False, masked),
            training_step(hf, hf_opt, tokens, True, masked),
        )
        if f"train_{mode}" in wanted:
            t_ours, t_hf = alternate(ours_step, hf_step, args.repeats, args.warmup, args.device)
            record(results, f"train_{mode}", f"train step, {MODE_LABELS[mode]}", "s", t_ours, t_hf, False)
        else:  # one step each so the optimizer state exists for the state_* row
            ours_step()
            hf_step()
        if f"params_{mode}" in wanted:
            n_hf = sum(p.numel() for p in trainable_parameters(hf))
            record(
                results,
                f"params_{mode}",
                f"trainable parameters, {MODE_LABELS[mode]}",
                "params",
                count_parameters(ours)[0],
                n_hf,
            )
        if f"state_{mode}" in wanted:
            (w_o, g_o, s_o), (w_h, g_h, s_h) = state_bytes(ours, ours_opt), state_bytes(hf, hf_opt)
            record(
                results,
                f"state_{mode}",
                f"weights + grads + AdamW state, {MODE_LABELS[mode]}",
                "MiB",
                (w_o + g_o + s_o) / 2**20,
                (w_h + g_h + s_h) / 2**20,
                False,
                ours_parts_MiB=dict(weights=w_o / 2**20, grads=g_o / 2**20, optimizer=s_o / 2**20),
                hf_parts_MiB=dict(weights=w_h / 2**20, grads=g_h / 2**20, optimizer=s_h / 2**20),
            )
        del ours, hf, ours_opt, hf_opt, ours_step, hf_step
        release()


@torch.no_grad()
def bench_inference(args, shape, weights_dir, wanted, results):
    """Forward latency (no grad) of the base model, LoRA unmerged, LoRA merged (LoRA §4.1: merging removes the
    adapter's latency), and QLoRA (4-bit base + unmerged adapter)."""
    x = random_tokens(shape, shape["batch"], shape["seq"], args.device, seed=2)
    ours, hf = build_ours("full", weights_dir, args.device).eval(), build_hf("full", weights_dir, args.device).eval()
    logits_difference = (ours(x)[0] - hf(input_ids=x).logits).abs().max().item()
    if logits_difference > 1e-3:
        raise RuntimeError(
            f"ours and HF disagree by {logits_difference:.2g} on the same weights: the comparison would be meaningless"
        )
    ours_forward, hf_forward = (lambda: ours(x)), (lambda: hf(input_ids=x))
    if "infer_base" in wanted:
        t_ours, t_hf = alternate(ours_forward, hf_forward, args.repeats, args.warmup, args.device)
        record(
            results,
            "infer_base",
            "forward, base model",
            "ms",
            scale(t_ours, 1e3),
            scale(t_hf, 1e3),
            False,
            max_logit_difference=logits_difference,
        )
    if "infer_lora" in wanted or "infer_lora_merged" in wanted:
        from peft import LoraConfig, get_peft_model

        apply_lora(ours, rank=LORA_RANK, alpha=LORA_ALPHA, targets=("q", "v"))
        hf = get_peft_model(
            hf, LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=["c_attn"], fan_in_fan_out=True)
        )
        for name, p in [*ours.named_parameters(), *hf.named_parameters()]:
            if "lora_B" in name:  # B = 0 at init would make the adapters no-ops; give them something to add
                p.normal_(std=0.02)
        ours.eval()  # the new LoRA layers start in training mode
        hf.eval()
        if "infer_lora" in wanted:
            t_ours, t_hf = alternate(ours_forward, hf_forward, args.repeats, args.warmup, args.device)
            record(
                results,
                "infer_lora",
                "forward, LoRA r=8 unmerged: ours q,v; PEFT c_attn",
                "ms",
                scale(t_ours, 1e3),
                scale(t_hf, 1e3),
                False,
            )
        if "infer_lora_merged" in wanted:
            merge_lora(ours)
            hf.merge_adapter()
            t_ours, t_hf = alternate(ours_forward, hf_forward, args.repeats, args.warmup, args.device)
            extra = {}
            if "infer_base" in results:  # LoRA §4.1: a merged adapter adds no latency, so this should be about 1
                extra["merged_over_base"] = {
                    side: statistics.median(t) * 1e3 / results["infer_base"][side]
                    for side, t in (("ours", t_ours), ("hf", t_hf))
                }
            record(
                results,
                "infer_lora_merged",
                "forward, LoRA r=8 merged",
                "ms",
                scale(t_ours, 1e3),
                scale(t_hf, 1e3),
                False,
                **extra,
            )
    del ours, hf, ours_forward, hf_forward
    release()
    if "infer_qlora" in wanted:
        ours = build_ours("qlora_qv", weights_dir, args.device, args.dequantize).eval()
        hf = build_hf("qlora_qv", weights_dir, args.device).eval()
        t_ours, t_hf = alternate(lambda: ours(x), lambda: hf(input_ids=x), args.repeats, args.warmup, args.device)
        record(
            results,
            "infer_qlora",
            "forward, QLoRA NF4+DQ + LoRA unmerged: ours q,v; PEFT c_attn",
            "ms",
            scale(t_ours, 1e3),
            scale(t_hf, 1e3),
            False,
        )
        del ours, hf
        release()


@torch.no_grad()
def bench_generation(args, shape, weights_dir, results):
    """Greedy generation, batch 1: our GPT.generate with its KV cache vs HF generate (DynamicCache)."""
    from transformers import GenerationConfig

    prompt = random_tokens(shape, 1, shape["seq"], args.device, seed=3)
    n = shape["new_tokens"]
    ours, hf = build_ours("full", weights_dir, args.device).eval(), build_hf("full", weights_dir, args.device).eval()
    config = GenerationConfig(max_new_tokens=n, do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
    outputs = {}

    def ours_generate():
        outputs["ours"] = ours.generate(prompt, n, temperature=0)

    def hf_generate():
        outputs["hf"] = hf.generate(prompt, generation_config=config)

    t_ours, t_hf = alternate(ours_generate, hf_generate, args.repeats, args.warmup, args.device)
    if outputs["ours"].shape != outputs["hf"].shape:
        raise RuntimeError(
            f"ours generated {tuple(outputs['ours'].shape)} tokens, HF {tuple(outputs['hf'].shape)}: not the same work"
        )
    same = (outputs["ours"] == outputs["hf"]).float().mean().item()
    record(
        results,
        "generate",
        f"generation, batch 1, {shape['seq']}-token prompt + {n} new (higher is better)",
        "tok/s",
        [n / t for t in t_ours],
        [n / t for t in t_hf],
        True,
        same_tokens_fraction=same,
    )
    del ours, hf
    release()


def bench_nf4(args, weights_dir, wanted, results):
    """NF4 with double quantization of every linear weight of the model (what quantize_model does), ours vs
    bitsandbytes.functional; throughput = fp32 bytes of the dense weights per second."""
    import bitsandbytes.functional as bnbf

    model = GPT.from_pretrained(weights_dir)
    weights = [
        m.weight.detach().to(args.device)
        for m in model.modules()
        if type(m) is torch.nn.Linear and m is not model.lm_head
    ]
    del model
    release()
    gigabytes = sum(w.numel() * 4 for w in weights) / 1e9

    def ours_quantize():
        return [quantize_nf4(w, block_size=64, double_quant=True) for w in weights]

    def bnb_quantize():
        return [bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4") for w in weights]

    ours_q, bnb_q = ours_quantize(), bnb_quantize()
    same_codes = all(torch.equal(o.codes.view(-1), b[0].view(-1)) for o, b in zip(ours_q, bnb_q))
    if "nf4_quantize" in wanted:
        t_ours, t_hf = alternate(ours_quantize, bnb_quantize, args.repeats, args.warmup, args.device)
        record(
            results,
            "nf4_quantize",
            f"NF4+DQ quantize, all {len(weights)} linear weights (higher is better)",
            "GB/s",
            [gigabytes / t for t in t_ours],
            [gigabytes / t for t in t_hf],
            True,
            identical_codes=same_codes,
            gigabytes=gigabytes,
        )
    paths = {"nf4_dequantize": "reference", "nf4_dequantize_table": "table", "nf4_dequantize_kernel": "kernel"}
    for row, path in paths.items():
        if row not in wanted:
            continue
        # the definition (quantize.dequantize_4bit, what runs by default), then the opt-ins of support/fast_dequantize.py
        dequantize = fast_dequantize.dequantizer(path)
        ran_on = fast_dequantize.status() if path == "kernel" and args.device == "cpu" else path
        ours_d, bnb_d = [dequantize(q) for q in ours_q], [bnbf.dequantize_4bit(c, s) for c, s in bnb_q]
        difference = max((a - b.view_as(a)).abs().max().item() for a, b in zip(ours_d, bnb_d))
        del ours_d, bnb_d
        t_ours, t_hf = alternate(
            lambda: [dequantize(q) for q in ours_q],
            lambda: [bnbf.dequantize_4bit(c, s) for c, s in bnb_q],
            args.repeats,
            args.warmup,
            args.device,
        )
        label = "NF4+DQ dequantize" + ("" if path == "reference" else f", --dequantize {path}")
        record(
            results,
            row,
            f"{label}, all {len(weights)} linear weights (higher is better)",
            "GB/s",
            [gigabytes / t for t in t_ours],
            [gigabytes / t for t in t_hf],
            True,
            max_difference=difference,
            gigabytes=gigabytes,
            path=ran_on,
        )
    del weights, ours_q, bnb_q
    release()


def bench_classification(args, shape, weights_dir, results):
    """Issue 15's frozen-trunk caching: `last_block` classification (finetune_classifier.py's training loop, without its
    evaluations and logging), CLASSIFY_EPOCHS epochs over CLASSIFY_MESSAGES random messages, with the trunk cached
    (cache_trunk inside the timed run: its cost counts) against the uncached path, every layer every epoch. Both sides
    are ours, so the "HF" column holds our uncached path here; no library offers this shortcut to compare with."""
    import torch.nn.functional as F

    import finetune_classifier as classifier  # what finetune_classifier.py trains with: the same build and cache
    from support import sms_data

    g = torch.Generator().manual_seed(4)
    lengths = torch.randint(
        max(1, shape["seq"] // 8), shape["seq"] // 4 + 1, (CLASSIFY_MESSAGES,), generator=g
    ).tolist()
    messages = [(torch.randint(shape["vocab_size"], (n,), generator=g).tolist(), i % 2) for i, n in enumerate(lengths)]
    models = {}
    for cache in (True, False):
        torch.manual_seed(0)
        model = classifier.build_classifier(GPT.from_pretrained(weights_dir).to(args.device), "last_block")
        models[cache] = (model, torch.optim.AdamW(trainable_parameters(model), lr=5e-4))

    def train_epochs(cache):
        model, optimizer = models[cache]
        cached_blocks = model.frozen_blocks() if cache else 0
        rows = (
            classifier.cache_trunk(model, messages, cached_blocks, CLASSIFY_BATCH, 0, args.device)
            if cached_blocks
            else messages
        )
        logits_of = functools.partial(model.forward_from_block, block=cached_blocks) if cached_blocks else model
        model.train()
        for epoch in range(CLASSIFY_EPOCHS):
            order = torch.Generator().manual_seed(epoch)
            for x, lengths, y in sms_data.make_batches(
                rows,
                CLASSIFY_BATCH,
                0,
                order,
                sms_data.collate_activations if cached_blocks else sms_data.collate_messages,
            ):
                F.cross_entropy(logits_of(x.to(args.device), lengths), y.to(args.device)).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    with torch.no_grad():  # both start from the same weights: the cached path must give the uncached logits
        x, lengths, _ = sms_data.collate_messages(messages, 0)
        cached_blocks = models[True][0].frozen_blocks()
        cached = sms_data.collate_activations(
            classifier.cache_trunk(models[True][0], messages, cached_blocks, CLASSIFY_BATCH, 0, args.device)
        )[0]
        from_cache = models[True][0].eval().forward_from_block(cached, lengths, cached_blocks)
        difference = (from_cache - models[False][0].eval()(x.to(args.device), lengths)).abs().max().item()
    t_cached, t_uncached = alternate(
        lambda: train_epochs(True), lambda: train_epochs(False), args.repeats, args.warmup, args.device
    )
    record(
        results,
        "classify_last_block",
        f"last_block classification, {CLASSIFY_EPOCHS} epochs x {CLASSIFY_MESSAGES} messages: "
        f"ours trunk cached vs (HF column) ours uncached",
        "s",
        t_cached,
        t_uncached,
        False,
        max_logit_difference=difference,
        cached_blocks=cached_blocks,
    )
    del models
    release()


# ---------------------------------------------------------------------------------------------- peak memory


def return_freed_memory(device):
    """Make the resident set size track the memory in use (Linux with glibc; elsewhere nothing to do). glibc's malloc
    keeps freed blocks to reuse, and raises its mmap threshold (up to 32 MiB) whenever a large block is freed, so
    later tensors would land in memory that is already resident and a peak would go unseen. Fix the threshold at
    128 KiB, so every larger block is mapped when allocated and unmapped when freed, and trim what is free now."""
    if device != "cpu":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 128 * 1024)  # -3 = M_MMAP_THRESHOLD
    libc.malloc_trim(0)


def current_memory_bytes(device):
    if device == "cuda":
        return torch.cuda.memory_allocated()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("peak memory on CPU needs Linux's /proc/self/status; run with --memory off")


def measure_peak(mode, impl, weights_dir, shape, device, dequantize, steps=2, warm_up=True):
    """Peak memory of `steps` training steps in `mode` above what was in use before the model was loaded: the
    model, its activations, gradients and optimizer state. The peak counter is reset after loading, so
    loading's own transient copies do not count. CPU: resident set size (VmHWM); CUDA: max_memory_allocated."""
    if warm_up:  # first use maps library code and sets up thread pools and caches: not the model's memory
        measure_peak(mode, impl, weights_dir, shape, device, dequantize, steps=1, warm_up=False)
    gc.collect()
    return_freed_memory(device)
    baseline = current_memory_bytes(device)
    model = build_ours(mode, weights_dir, device, dequantize) if impl == "ours" else build_hf(mode, weights_dir, device)
    optimizer = make_optimizer(model)
    step = training_step(
        model,
        optimizer,
        random_tokens(shape, shape["batch"], shape["seq"] + 1, device),
        impl == "hf",
        mode in MASKED_MODES,
    )
    reset_peak_memory(device)
    for _ in range(steps):
        step()
    synchronize(device)
    peak = peak_memory_bytes(device) - baseline
    del model, optimizer, step
    release()
    return peak


def memory_worker(argv):
    """`python -m benchmarks.bench --memory-worker MODE IMPL WEIGHTS_DIR SHAPE DEVICE THREADS DEQUANTIZE`: print one peak,
    in a fresh process."""
    mode, impl, weights_dir, shape_name, device, threads, dequantize = argv
    torch.set_num_threads(int(threads))
    if impl == "hf":  # import before the baseline, as ours imported its modules above
        import peft  # noqa: F401

        quiet_transformers()
    gc.freeze()  # the imported modules' objects are never garbage: keep gc.collect from scanning them each time
    print(json.dumps({"peak_bytes": measure_peak(mode, impl, weights_dir, SHAPES[shape_name], device, dequantize)}))


def bench_memory(args, shape, weights_dir, wanted, results):
    """Peak training memory per mode. --memory process (default): every (mode, library) in a fresh Python process,
    since a process never hands all freed memory back and its peaks would pile up. --memory reset: all in this
    process, resetting the peak counter in between (quicker, and close on the CPU, as return_freed_memory says)."""
    for mode in (*TRAIN_MODES, *MASKED_MODES):
        if f"peak_{mode}" not in wanted:
            continue
        peaks = {}
        for impl in ("ours", "hf"):
            if args.memory == "process":
                command = [
                    sys.executable,
                    "-m",
                    "benchmarks.bench",
                    "--memory-worker",
                    mode,
                    impl,
                    weights_dir,
                    args.shape,
                    args.device,
                    str(args.threads),
                    args.dequantize,
                ]
                done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_DIR)
                if done.returncode != 0:
                    raise RuntimeError(f"memory worker for {mode}/{impl} failed:\n{done.stderr[-3000:]}")
                peaks[impl] = json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]
            else:
                peaks[impl] = measure_peak(
                    mode, impl, weights_dir, shape, args.device, args.dequantize, warm_up=False
                )  # warm already
        what = "RSS" if args.device == "cpu" else "allocated"
        record(
            results,
            f"peak_{mode}",
            f"peak training memory ({what}), {MODE_LABELS[mode]}",
            "MiB",
            peaks["ours"] / 2**20,
            peaks["hf"] / 2**20,
            False,
            method=args.memory,
        )


# ---------------------------------------------------------------------------------------------- reporting


def scale(values, factor):
    return [v * factor for v in values]


def format_value(value, unit):
    if unit == "params":
        return f"{value:,.0f}"
    if unit == "s":
        return f"{value:.3f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def verdict(entry, tolerance=0.03):
    """Which side does better on this row; within `tolerance` (relative) it is a tie."""
    if entry["higher_is_better"] is None or not entry["ratio"]:
        return "-"
    ratio = entry["ratio"] if entry["higher_is_better"] else 1 / entry["ratio"]
    return "tie" if abs(ratio - 1) <= tolerance else "ours" if ratio > 1 else "HF"


def machine_description(args):
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    import bitsandbytes
    import peft
    import transformers

    info = dict(
        cpu=cpu,
        logical_cpus=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        device=args.device,
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        peft=peft.__version__,
        bitsandbytes=bitsandbytes.__version__,
        platform=platform.platform(),
    )
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_markdown(path, results, machine, command, shape_name, shape, args):
    gpu = f", GPU {machine['gpu']}" if "gpu" in machine else ""
    lines = [
        f"Measured on {machine['cpu']} ({machine['logical_cpus']} logical CPUs, {machine['torch_threads']} torch threads){gpu}, "
        f"device `{machine['device']}`; Python {machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}, "
        f"peft {machine['peft']}, bitsandbytes {machine['bitsandbytes']}.",
        "",
        f"Shape `{shape_name}`: {shape['n_layer']} layers x {shape['n_embd']} wide, {shape['n_head']} heads, vocabulary {shape['vocab_size']:,}; "
        f"batch {shape['batch']} x {shape['seq']} tokens, fp32, random weights shared by both; median of {args.repeats} alternating "
        f"repeats after {args.warmup} warm-up. Reproduce with:",
        "",
        "```bash",
        command,
        "```",
        "",
        "| row | ours | HF | ours/HF | better |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for entry in results.values():
        ratio = f"{entry['ratio']:.2f}" if entry["ratio"] is not None else "-"
        lines.append(
            f"| {entry['label']} ({entry['unit']}) | {format_value(entry['ours'], entry['unit'])} | "
            f"{format_value(entry['hf'], entry['unit'])} | {ratio} | {verdict(entry)} |"
        )
    merged = results.get("infer_lora_merged", {}).get("merged_over_base")
    if merged:
        lines += [
            "",
            f"LoRA merged / base model forward time (LoRA §4.1: merging adds no latency): ours {merged['ours']:.2f}, HF {merged['hf']:.2f}.",
        ]
    kernel_path = results.get("nf4_dequantize_kernel", {}).get("path")
    lines += [
        "",
        f"QLoRA rows dequantize with --dequantize {args.dequantize}. The NF4 dequantize rows: "
        f"quantize.dequantize_4bit, the definition that runs by default, then the opt-in paths of support/fast_dequantize.py"
        + (f" (kernel: {kernel_path})." if kernel_path else "."),
    ]
    lines += [
        "",
        "HF = transformers `GPT2LMHeadModel` (sdpa attention), + peft LoRA on the fused `c_attn` (q, k and v share one",
        "A of r x d and one B of 3d x r: the same trainable parameter count as ours on q, v), + bitsandbytes `Linear4bit`",
        '(NF4, double quantization, fp32 compute) for QLoRA. "better": within 3% is a tie. Peak memory is measured above',
        "the memory in use before loading the model"
        + (
            ", each in a fresh process."
            if args.memory == "process"
            else ", in one process with the peak counter reset between rows (approximate)."
        ),
        '"Half the positions without a target": the first half of every row\'s targets are -100 for both libraries (as',
        "with `train.py --mask_prompt`); ours applies the output layer only where a target is, HF computes every logit.",
        f"The classification row compares ours with ours: `last_block`, {CLASSIFY_EPOCHS} epochs over {CLASSIFY_MESSAGES} random messages "
        'with the frozen trunk cached (building the cache counts) in the "ours" column, the uncached path in the "HF" one.',
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shape", choices=SHAPES, default="gpt2", help="model shape and work size (default: gpt2, the 124M model)"
    )
    parser.add_argument("--quick", action="store_true", help="--shape small --repeats 2 --memory reset, unless given")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repeats per row and library (default 5; 2 with --quick)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each before timing (default 1)")
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch.set_num_threads for both (default: torch's default)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where both run (default: cuda if available)",
    )
    parser.add_argument(
        "--memory",
        choices=("process", "reset", "off"),
        default=None,
        help="peak memory: a fresh process per measurement (default), one process with resets (--quick), or off",
    )
    parser.add_argument(
        "--dequantize",
        choices=fast_dequantize.PATHS,
        default="kernel",
        help="how the QLoRA rows dequantize (default: kernel, the fastest on a CPU; reference: the definition)",
    )
    parser.add_argument(
        "--only",
        default=",".join(ROW_GROUPS),
        help=f"comma-separated groups ({', '.join(ROW_GROUPS)}) or row ids (default: all)",
    )
    parser.add_argument(
        "--out",
        default=os.path.join(REPO_DIR, "benchmarks", "results.json"),
        help="JSON path; the Markdown table goes beside it with .md (default: benchmarks/results.json)",
    )
    args = parser.parse_args(argv)
    explicit = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
    if args.quick and "--shape" not in explicit:
        args.shape = "small"
    args.repeats = args.repeats if args.repeats is not None else 2 if args.quick else 5
    args.memory = args.memory or ("reset" if args.quick else "process")
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats and --threads must be at least 1, --warmup at least 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    wanted = set()
    for item in filter(None, (s.strip() for s in args.only.split(","))):
        if item in ROW_GROUPS:
            wanted.update(ROW_GROUPS[item])
        elif item in ALL_ROWS:
            wanted.add(item)
        else:
            parser.error(f"--only {item!r}: not a group or row; choose from {', '.join([*ROW_GROUPS, *ALL_ROWS])}")
    if args.memory == "off":
        wanted -= set(PEAK_ROWS)
    args.wanted = wanted
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    command = ("python -m benchmarks.bench " + shlex.join(sys.argv[1:] if argv is None else argv)).rstrip()
    machine = machine_description(args)  # imports transformers, peft and bitsandbytes
    quiet_transformers()
    gc.freeze()  # the imported modules' objects are never garbage: keep gc.collect from scanning them each time
    print(
        f"{command}\n{machine['cpu']}, {args.threads} threads, device {args.device}, torch {machine['torch']}; shape {args.shape}: {shape}"
    )
    results = {}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="nanoqlora-bench-") as weights_dir:
        save_random_gpt2(shape, weights_dir)
        wanted = args.wanted
        if wanted & set(TRAIN_ROWS + PARAM_ROWS + STATE_ROWS):
            print("training: forward + backward + AdamW step")
            bench_training(args, shape, weights_dir, wanted, results)
        if wanted & set(ROW_GROUPS["infer"]):
            print("inference: forward latency, no grad")
            bench_inference(args, shape, weights_dir, wanted, results)
        if "generate" in wanted:
            print("generation")
            bench_generation(args, shape, weights_dir, results)
        if "classify_last_block" in wanted:
            print("classification: frozen-trunk caching")
            bench_classification(args, shape, weights_dir, results)
        if wanted & set(ROW_GROUPS["nf4"]):
            print(f"NF4 on {args.device}")
            bench_nf4(args, weights_dir, wanted, results)
        if wanted & set(PEAK_ROWS):
            print(f"peak memory ({args.memory})")
            bench_memory(args, shape, weights_dir, wanted, results)
    results = {r: results[r] for r in ALL_ROWS if r in results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    report = dict(
        command=command,
        machine=machine,
        shape_name=args.shape,
        shape=shape,
        repeats=args.repeats,
        warmup=args.warmup,
        memory_method=args.memory,
        seconds=round(time.time() - started, 1),
        rows=results,
    )
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    markdown = os.path.splitext(args.out)[0] + ".md"
    write_markdown(markdown, results, machine, command, args.shape, shape, args)
    slower = [e["label"] for e in results.values() if verdict(e) == "HF"]
    print(
        f"wrote {args.out} and {markdown} in {report['seconds']:.0f} s"
        + (f"; HF is better on: {'; '.join(slower)}" if slower else "")
    )
    return report


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-worker":
        memory_worker(sys.argv[2:])
    else:
        main()
