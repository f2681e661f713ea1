"""
Measure two training options of train.py on this machine (issue 14), with random weights (speed and memory do not
depend on the values):

    python -m benchmarks.train_features packing          # real (non-padding) tokens per second, with and without --pack
    python -m benchmarks.train_features checkpointing    # activation memory and step time, with and without --grad_checkpointing

packing: the default job's shape (LoRA r=8 on q,v of the tiny base's 4 x 256 byte-level GPT, 512 bytes of context,
batch 8, AdamW), on the embedded set and on ../shared/data/instruction-data.json; unpacked and packed steps alternate
in blocks, real tokens are the positions that hold an example (targets that are not padding).

checkpointing: GPT-2 124M's shape (12 x 768, vocab 50257), batch 4 x 256 tokens, full fine-tuning, LoRA r=8 on q,v
and QLoRA; each setting in a fresh process, one warm-up step, then the peak resident set size during the timed steps
minus the resident size just before them (activations, gradients and temporaries created in the step; on the CPU
there is no allocator to ask, so glibc is told to return freed blocks, see checkpointing()).

Results go to benchmarks/train_features.json. Run with one thread pinned to one core for steady numbers, e.g.
`OMP_NUM_THREADS=1 taskset -c 1 python -m benchmarks.train_features packing`.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "train_features.json")


def save_result(key, value):
    results = json.load(open(RESULTS)) if os.path.exists(RESULTS) else {}
    results[key] = value
    with open(RESULTS, "w") as f:
        json.dump(results, f, indent=2)


# ---------------------------------------------------------------------------------------------- packing


def packing(datasets, steps, rounds):
    from lora import apply_lora
    from model import GPT, GPTConfig
    from support.instructions import InstructionData
    from support.tokenizer import get_tokenizer

    torch.set_num_threads(1)
    out = {}
    for name in datasets:
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=512, vocab_size=257, n_layer=4, n_head=4, n_embd=256))
        apply_lora(model, rank=8, alpha=16, targets=("q", "v"), dropout=0.05)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        # the Alpaca template, as when train_features.json was measured (on the embedded set before its regeneration);
        # train.py now prompts the byte-level base in the shorter 'bare' template by default (--prompt_template)
        data = {
            pack: InstructionData(
                name, get_tokenizer("bytes"), 512, 1337, mask_prompt=False, template="alpaca", pack=pack
            )
            for pack in (False, True)
        }
        totals = {pack: {"seconds": 0.0, "real_tokens": 0, "positions": 0, "steps": 0} for pack in (False, True)}
        step_of = {False: 0, True: 0}
        for pack in (False, True):  # warm-up step each
            run_steps(model, optimizer, data[pack], pack, 0, 1)
        for _ in range(rounds):
            for pack in (False, True):
                seconds, real, positions = run_steps(model, optimizer, data[pack], pack, step_of[pack] + 1, steps)
                step_of[pack] += steps
                t = totals[pack]
                t["seconds"] += seconds
                t["real_tokens"] += real
                t["positions"] += positions
                t["steps"] += steps
        row = {}
        for pack, t in totals.items():
            row["packed" if pack else "padded"] = {
                **t,
                "real_tokens_per_s": t["real_tokens"] / t["seconds"],
                "fill": t["real_tokens"] / t["positions"],
            }
        row["speedup"] = row["packed"]["real_tokens_per_s"] / row["padded"]["real_tokens_per_s"]
        row["examples"] = len(data[False].train)
        row["packed_rows"] = len(data[True].packed)
        out[os.path.basename(name)] = row
        print(
            f"{name}: padded {row['padded']['real_tokens_per_s']:.0f} real tok/s (fill {row['padded']['fill']:.0%}), "
            f"packed {row['packed']['real_tokens_per_s']:.0f} real tok/s (fill {row['packed']['fill']:.0%}): x{row['speedup']:.2f}",
            flush=True,
        )
    return out


def run_steps(model, optimizer, data, pack, first_step, steps):
    seconds, real, positions = 0.0, 0, 0
    for step in range(first_step, first_step + steps):
        x, y, *segments = data.train_batch(step, 0, 8)
        t0 = time.perf_counter()
        loss = model(x, y, segment_ids=segments[0] if segments else None)[1]  # as train.py trains
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - t0
        real += int((y != -100).sum())  # no prompt masking here: every example position has a target
        positions += y.numel()
    return seconds, real, positions


# ---------------------------------------------------------------------------------------------- checkpointing


def rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def checkpointing_one(mode, checkpointing, steps, batch, seq):
    """One setting, in this (fresh) process: prints a JSON line."""
    from lora import apply_lora
    from model import GPT, GPTConfig
    from quantize import quantize_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768))
    if mode == "qlora":
        quantize_model(model)
    if mode != "full":
        apply_lora(model, rank=8, alpha=16, targets=("q", "v"))
    model.gradient_checkpointing = checkpointing
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    idx = torch.randint(0, 50257, (batch, seq), generator=torch.Generator().manual_seed(1))

    def step():
        loss = model(idx, idx)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state exists from here on
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size
    before = rss_bytes("VmRSS")
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - t0) / steps
    print(
        json.dumps(
            {
                "mode": mode,
                "checkpointing": checkpointing,
                "seconds_per_step": seconds,
                "step_peak_bytes": rss_bytes("VmHWM") - before,
            }
        )
    )


def checkpointing(modes, steps, batch, seq):
    out = []
    for mode in modes:
        for on in (False, True):
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.train_features",
                "checkpointing-one",
                mode,
                str(int(on)),
                str(steps),
                str(batch),
                str(seq),
            ]
            # glibc keeps freed blocks below its (self-raising) mmap threshold for reuse, so the resident size would not fall
            # back between steps and a step's peak would hide in memory the warm-up step left behind; a fixed threshold of
            # 128 KiB returns every activation-sized block to the system when freed
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
            result = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, cwd=ROOT)
            row = json.loads(result.stdout.strip().splitlines()[-1])
            out.append(row)
            print(
                f"{mode:5} checkpointing={on!s:5} {row['seconds_per_step']:.2f} s/step, step peak {row['step_peak_bytes'] / 2**20:.0f} MiB",
                flush=True,
            )
    return {"batch": batch, "seq": seq, "steps": steps, "rows": out}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "checkpointing-one":
        mode, on, steps, batch, seq = sys.argv[2:7]
        checkpointing_one(mode, bool(int(on)), int(steps), int(batch), int(seq))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["packing", "checkpointing"])
    parser.add_argument(
        "--steps", type=int, default=5, help="steps per block (packing) or timed steps per setting (checkpointing)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="packing: alternating blocks of steps per mode")
    parser.add_argument(
        "--datasets",
        default="embedded," + os.path.join(os.path.dirname(ROOT), "shared", "data", "instruction-data.json"),
    )
    parser.add_argument("--modes", default="full,lora,qlora")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    if args.what == "packing":
        save_result("packing", packing(args.datasets.split(","), args.steps, args.rounds))
    else:
        save_result("checkpointing", checkpointing(args.modes.split(","), args.steps, args.batch, args.seq))
