"""
One command that checks the project on a CUDA GPU, in about five minutes, and writes down what it found:

    python -m benchmarks.gpu_check                  # on CUDA (the default wherever torch sees a GPU)
    python -m benchmarks.gpu_check --device cpu     # the same steps made small, on the CPU: CI runs it (< 1 minute)
    python -m benchmarks.gpu_check --only memory    # some of the steps: suite, default, compile, memory, ddp

The steps, each recorded as ok, failed (with its error) or skipped (with the reason):

  suite    the test suite's CUDA part, `python -m pytest -m cuda` (conftest.py's `device` fixture: the references,
           LoRA and QLoRA steps, generation, packing, the loss). On the CPU the CUDA items are only collected and
           counted.
  default  the default job, `python train.py` (LoRA instruction tuning of the tiny base, pretrained first if
           checkpoints/tiny-base is missing), run as train.py runs it: with bf16 autocast on a GPU that computes in
           bf16 natively (Ampere and later). On an older GPU support.runs.autocast_context falls back to fp32 (such
           GPUs report bf16 support only through emulation, which is slower than fp32); the table says which ran.
           On the CPU: a random 2-layer base and 4 steps, the same code path.
  compile  the same job for a few steps with --compile off and on: the same losses, the time per step after the
           first, and what compiling cost.
  memory   the consumer-GPU recipes of docs/design.md on GPT-2's shapes from random HF-format weights (LoRA r=8 on
           q,v and QLoRA r=8 on q,v, 124M and 355M), a batch of 8 x 256 tokens with half the positions masked as a
           prompt is: the memory in use once loaded against the computed weights, and the training peak against the
           computed weights + LoRA gradients + AdamW state (the figure design.md gives; activations come on top).
           On the CPU: the QLoRA recipe on a tiny shape, peak = resident set size (not comparable).
  ddp      2 processes with NCCL (torchrun, a QLoRA run) against 1 process, if the machine has 2 GPUs; else skipped.

It writes one JSON file (benchmarks/gpu_check_<device>.json unless --out) and prints a short table. The exit status is
1 if a step failed.
"""

import argparse
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

from support.files import REPO_DIR, write_json_atomic
from support.runs import autocast_context, peak_memory_bytes, process_status_bytes, reset_peak_memory

STEPS = ("suite", "default", "compile", "memory", "ddp")
MIB = 2**20
# docs/design.md's consumer-GPU recipes: (name, GPT-2 shape (n_layer, n_head, n_embd), 4-bit base?, design.md's figure)
RECIPES = [
    ("GPT-2 124M, LoRA r=8 on q,v", (12, 12, 768), False, "~0.50 GB (fp32 weights) + 3.5 MB"),
    ("GPT-2 124M, QLoRA r=8 on q,v", (12, 12, 768), True, "not in the table (the same computation)"),
    ("GPT-2 355M, LoRA r=8 on q,v", (24, 16, 1024), False, "~1.42 GB + 9.4 MB"),
    ("GPT-2 355M, QLoRA r=8 on q,v", (24, 16, 1024), True, "~0.37 GB + 9.4 MB"),
]
DEVICE_TEST = re.compile(r"def test_\w+\([^)]*\bdevice\b")  # a test that takes conftest.py's device fixture
CPU_RECIPE = ("tiny shape, QLoRA r=8 on q,v (the CPU stand-in)", (2, 2, 64), True, "")


# ---------------------------------------------------------------------------------------------- the machine


def native_bf16(device):
    return device == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def describe_machine(device):
    machine = dict(
        torch=torch.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        cpu=platform.processor() or platform.machine(),
        device=device,
    )
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        machine.update(
            gpu=props.name,
            gpus=torch.cuda.device_count(),
            capability=f"{props.major}.{props.minor}",
            gpu_memory_bytes=props.total_memory,
            cuda=torch.version.cuda,
            native_bf16=native_bf16(device),
        )
    try:
        import bitsandbytes
        import bitsandbytes.cextension

        machine["bitsandbytes"] = f"{bitsandbytes.__version__} ({getattr(bitsandbytes.cextension, 'BNB_BACKEND', '?')})"
    except Exception as e:  # bitsandbytes is a test-only dependency: its absence is noted, not fatal
        machine["bitsandbytes"] = f"not importable: {e}"
    return machine


def autocast_in_use(device):
    if device != "cuda":
        return "none (fp32 on the CPU)"
    if native_bf16(device):
        return "bf16"
    return "fp32: this GPU has no native bf16 (autocast_context falls back to fp32)"


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def memory_in_use(device):
    """Bytes in use now: allocated on the GPU, resident on the CPU (Linux; 0 elsewhere)."""
    if device == "cuda":
        return torch.cuda.memory_allocated()
    return process_status_bytes("VmRSS")


def finite_or_text(value):
    """JSON has no NaN or infinity: such a number is written as its text, so a broken run still leaves its file."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite_or_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_text(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- the steps


def step_suite(args, work):
    """The suite's CUDA part in a child process (before this process touches the GPU)."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"]
    if args.device == "cpu":  # collect only, and only the files whose tests take the device fixture (quicker)
        files = sorted(
            os.path.join("tests", name)
            for name in os.listdir(os.path.join(REPO_DIR, "tests"))
            if name.startswith("test_")
            and name.endswith(".py")
            and DEVICE_TEST.search(open(os.path.join(REPO_DIR, "tests", name)).read())
        )
        command = command[:3] + ["--collect-only"] + command[3:-1] + files
    done = subprocess.run(command, cwd=REPO_DIR, capture_output=True, text=True, timeout=args.suite_timeout)
    lines = done.stdout.strip().splitlines()
    summary = lines[-1] if lines else done.stderr.strip()[-300:]
    result = dict(
        command=" ".join(["python", *command[1:]]),
        summary=summary,
        failed_tests=[line.split(" ")[1] for line in lines if line.startswith("FAILED ")][:30],
    )
    if args.device == "cpu":
        items = [line for line in lines if "::" in line]
        result.update(cuda_items=len(items), note="no GPU: the CUDA items are collected and counted, not run")
        if done.returncode != 0 or not items:
            raise RuntimeError(f"collecting the CUDA items failed (exit {done.returncode}): {summary}")
        return result
    if done.returncode != 0:  # 1: tests failed; 5: none collected
        result["status"] = "failed"
        result["output_tail"] = done.stdout[-3000:]
    return result


def random_base(directory, seed=0):
    """A random byte-level GPT saved in train.py's checkpoint format: the CPU stand-in for the tiny base."""
    from model import GPT, GPTConfig

    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=256, vocab_size=257, n_layer=1, n_head=2, n_embd=32, smear_keys=True))
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "ckpt.pt")
    torch.save(
        {
            "model_config": vars(model.config).copy(),
            "tokenizer": "bytes",
            "model": {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"},
        },
        path,
    )
    return path


def job_config(args, work, out_name, **overrides):
    """train.py's default job (TrainConfig's defaults) on args.device; on the CPU made small on a random base."""
    from train import TrainConfig, resolve_defaults

    settings = dict(out_dir=os.path.join(work, out_name), device=args.device, progress=False)
    if args.device == "cpu":
        settings.update(
            init_from=random_base(os.path.join(work, "base")),
            max_iters=4,
            batch_size=8,
            eval_batches=2,
            answer_limit=8,
            num_samples=0,
            max_new_tokens=8,
        )
    settings.update(overrides)
    return resolve_defaults(TrainConfig(**settings))


def step_default(args, work):
    import train

    pretrained_first = args.device == "cuda" and not os.path.isfile(
        os.path.join(REPO_DIR, "checkpoints", "tiny-base", "ckpt.pt")
    )
    cfg = job_config(args, work, "default")
    started = time.time()
    summary = train.train(cfg)
    seconds = time.time() - started
    keys = (
        "init_from",
        "max_iters",
        "batch_size",
        "lora_rank",
        "val_loss_before",
        "val_loss_after",
        "test_accuracy_before",
        "test_accuracy_after",
        "test_exact_match_after",
        "seconds",
        "peak_memory_bytes",
    )
    result = {key: summary.get(key) for key in keys}
    result.update(
        max_iters=cfg.max_iters,
        autocast=autocast_in_use(args.device),
        wall_seconds=round(seconds, 1),
        steps_per_second=round(cfg.max_iters / summary["seconds"], 2),
        pretrained_tiny_base_first=pretrained_first,
    )
    return result


def step_compile(args, work):
    """The same short job twice, --compile off and on, from the same seed: the losses must agree (to bf16's precision
    on a GPU that uses it), and the time per step after the first one says what compiling buys."""
    import csv

    import train

    steps = 100 if args.device == "cuda" else 3
    backend = "inductor" if args.device == "cuda" else "aot_eager"
    real_compile, runs = torch.compile, {}
    # On the CPU, inductor would spend a minute generating and compiling C++ for a check of a few seconds: there the
    # model is traced by dynamo and AOT autograd (where a graph break or an unsupported op would show), and runs eagerly.
    torch.compile = lambda model, **kwargs: real_compile(model, backend=backend, **kwargs)
    try:
        for compiled in (False, True):
            cfg = job_config(
                args,
                work,
                f"compile-{'on' if compiled else 'off'}",
                compile=compiled,
                max_iters=steps,
                eval_interval=steps,
                answer_limit=8,
                num_samples=0,
                max_new_tokens=8,
                eval_batches=2,
            )
            summary = train.train(cfg)
            with open(os.path.join(cfg.out_dir, "log.csv")) as f:
                rows = list(csv.DictReader(f))
            times = [float(r["seconds"]) for r in rows]
            runs[compiled] = dict(
                losses=[float(r["train_loss"]) for r in rows],
                step_seconds=[times[0]] + [b - a for a, b in zip(times, times[1:])],
                total_seconds=times[-1],
                val_loss_after=summary["val_loss_after"],
            )
    finally:
        torch.compile = real_compile
    eager, compiled = runs[False], runs[True]
    # the first 20 steps: later, rounding differences (bf16 rounds differently in fused kernels) compound as training goes
    difference = max(abs(a - b) / max(abs(a), 1e-6) for a, b in list(zip(eager["losses"], compiled["losses"]))[:20])
    tolerance = 2e-2 if native_bf16(args.device) else 1e-4
    # instruction batches are padded to their longest example, so shapes vary: torch.compile compiles again for the
    # second shape it meets (then with dynamic shapes); the median of the later half of the steps leaves those out
    median_ms = {
        name: round(1000 * statistics.median(run["step_seconds"][max(2, steps // 2) :]), 2)
        for name, run in (("eager", eager), ("compiled", compiled))
    }
    result = dict(
        steps=steps,
        backend=backend,
        max_relative_loss_difference=difference,
        tolerance=tolerance,
        eager_ms_per_step=median_ms["eager"],
        compiled_ms_per_step=median_ms["compiled"],
        compile_seconds=round(compiled["total_seconds"] - eager["total_seconds"], 1),
        val_loss_after=dict(eager=eager["val_loss_after"], compiled=compiled["val_loss_after"]),
    )
    if not difference <= tolerance:
        result.update(status="failed", error=f"--compile changed the losses by up to {difference:.2e} (relative)")
    return result


def write_random_hf_weights(shape, directory, seed=0):
    """Random weights of GPT-2's shape (GPT-2's vocabulary and context), written as an HF GPT-2 directory."""
    from model import GPT, GPTConfig
    from support.hf_format import save_hf_checkpoint

    if os.path.isfile(os.path.join(directory, "model.safetensors")):  # the LoRA and QLoRA recipes share one shape
        return directory
    n_layer, n_head, n_embd = shape
    torch.manual_seed(seed)
    vocab, block = (
        (50257, 1024) if n_embd >= 256 else (257, 256)
    )  # the byte-level vocabulary: a config names a tokenizer this code has
    save_hf_checkpoint(
        GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab, block_size=block)), directory
    )
    return directory


def measure_recipe(recipe, device, work, batch=8, seq=256, steps=5):
    """Load random HF-format weights as train.py does (support.checkpoints.load_base_model), quantize for QLoRA, LoRA
    r=8 on q,v, AdamW as train.py builds it; then a few steps of its loss (GPT.forward) under autocast_context on one batch."""
    from lora import apply_lora
    from quantize import memory_report, quantize_model
    from support.checkpoints import load_base_model
    from support.optim import clip_gradients, make_optimizer

    name, shape, quantized, figure = recipe
    directory = write_random_hf_weights(shape, os.path.join(work, "weights-" + "x".join(map(str, shape))))
    synchronize(device)
    if device == "cuda":
        torch.cuda.empty_cache()
    before_load = memory_in_use(device)
    reset_peak_memory(device)
    model, _ = load_base_model(directory, device)
    if quantized:
        quantize_model(model)
    apply_lora(model, rank=8, alpha=16, targets="q,v")
    optimizer = make_optimizer(model, 3e-4, 0.1, (0.9, 0.95))
    lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights = next(r for r in memory_report(model) if r["component"] == "total")["bytes_after"]
    state = lora_params * 4 * 3  # fp32 gradients, AdamW's two moments
    synchronize(device)
    loaded = memory_in_use(device) - before_load if device == "cuda" else None  # (a CPU's RSS keeps freed memory)
    load_peak = peak_memory_bytes(device) - before_load
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    y = torch.randint(0, vocab, (batch, seq), generator=g)
    y[:, : seq // 2] = -100  # a masked prompt: half the positions have no target
    y = y.to(device)
    model.train()
    reset_peak_memory(device)
    times, losses = [], []
    for _ in range(steps):
        synchronize(device)
        started = time.time()
        with autocast_context(device):
            loss = model(x, y)[1]
        loss.backward()
        clip_gradients(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.time() - started)
        losses.append(loss.item())
    peak = peak_memory_bytes(device) - before_load
    result = dict(
        recipe=name,
        design_md=figure,
        batch=f"{batch} x {seq} tokens, half masked",
        lora_params=lora_params,
        computed_weights_bytes=weights,
        computed_weights_and_state_bytes=weights + state,
        measured_loaded_bytes=loaded,
        measured_load_peak_bytes=load_peak,
        measured_training_peak_bytes=peak,
        activations_and_workspace_bytes=peak - weights - state if device == "cuda" else None,
        ms_per_step=round(1000 * statistics.median(times[1:] or times), 1),
        losses=losses,
    )
    del model, optimizer, loss
    if device == "cuda":
        torch.cuda.empty_cache()
    # what is on the GPU once loaded should be what memory_report computes: no fp32 copy of a quantized weight left
    if loaded is not None and loaded > 1.05 * weights + 8 * MIB:
        result.update(
            status="failed", error=f"{loaded / MIB:.0f} MiB in use after loading, {weights / MIB:.0f} MiB computed"
        )
    if not all(math.isfinite(v) for v in losses):
        result.update(status="failed", error=f"non-finite losses {losses}")
    return result


def step_memory(args, work):
    recipes = RECIPES if args.device == "cuda" else [CPU_RECIPE]
    results = [measure_recipe(recipe, args.device, work) for recipe in recipes]
    failed = [r for r in results if r.get("status") == "failed"]
    out = dict(
        recipes=results,
        peak="torch.cuda.max_memory_allocated"
        if args.device == "cuda"
        else "resident set size above the start (includes the allocator's slack; not comparable with the figures)",
    )
    if failed:
        out.update(status="failed", error="; ".join(f"{r['recipe']}: {r['error']}" for r in failed))
    return out


def step_ddp(args, work):
    """2 NCCL processes against 1: a QLoRA run on a random base, the same losses step by step."""
    if args.device != "cuda":
        return dict(
            status="skipped", reason="--device cpu: NCCL needs GPUs (2 Gloo processes on the CPU: tests/test_ddp.py)"
        )
    if torch.cuda.device_count() < 2:
        return dict(status="skipped", reason=f"this machine has {torch.cuda.device_count()} GPU; 2 are needed")
    import csv

    import train
    from support.cli import config_flags
    from train import TrainConfig, resolve_defaults

    base = random_base(os.path.join(work, "ddp-base"))
    settings = dict(
        init_from=base,
        dataset="embedded",
        quantize="nf4",
        lora_rank=4,
        lora_targets="q,v,mlp_in",
        batch_size=4,
        grad_accum=4,
        max_iters=6,
        eval_interval=3,
        eval_batches=2,
        answer_limit=4,
        num_samples=0,
        max_new_tokens=4,
        device="cuda",
        progress=False,
    )
    train.train(resolve_defaults(TrainConfig(**settings, out_dir=os.path.join(work, "ddp-1"))))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "train.py",
        *config_flags({**settings, "out_dir": os.path.join(work, "ddp-2")}),
    ]
    done = subprocess.run(command, cwd=REPO_DIR, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        return dict(status="failed", error=f"torchrun exited {done.returncode}", output_tail=done.stderr[-3000:])
    logs = []
    for name in ("ddp-1", "ddp-2"):
        with open(os.path.join(work, name, "log.csv")) as f:
            logs.append([float(r["train_loss"]) for r in csv.DictReader(f)])
    difference = max(abs(a - b) / abs(a) for a, b in zip(*logs))
    result = dict(losses_1_process=logs[0], losses_2_processes=logs[1], max_relative_difference=difference)
    if len(logs[0]) != len(logs[1]) or difference > 2e-2:
        result.update(status="failed", error=f"the 2-process losses differ by up to {difference:.2e} (relative)")
    return result


# ---------------------------------------------------------------------------------------------- the report


def brief(name, step):
    """One line of the table for a step."""
    if step["status"] == "skipped":
        return step.get("reason", "")
    if "traceback" in step:  # the step raised before it measured anything: its error is all there is to show
        return step["error"]
    if "error" in step and name != "memory":
        return step["error"][:150]
    if name == "suite":
        return (
            f"{step['cuda_items']} CUDA items collected (not run: no GPU)" if "cuda_items" in step else step["summary"]
        )
    if name == "default":
        accuracy = ""
        if step.get("test_accuracy_after") is not None:
            accuracy = f"; test answers {step['test_accuracy_before']:.2f} -> {step['test_accuracy_after']:.2f}"
        return (
            f"{step['max_iters']} steps at {step['steps_per_second']} steps/s; val loss {step['val_loss_before']:.3f} -> "
            f"{step['val_loss_after']:.3f}{accuracy}; autocast {step['autocast']}; peak {step['peak_memory_bytes'] / MIB:.0f} MiB"
        )
    if name == "compile":
        return (
            f"{step['steps']} steps ({step['backend']}): median {step['eager_ms_per_step']} ms/step eager, "
            f"{step['compiled_ms_per_step']} compiled (compiling cost {step['compile_seconds']} s); losses agree to "
            f"{step['max_relative_loss_difference']:.1e}"
        )
    if name == "memory":
        lines = []
        for r in step["recipes"]:
            loaded = (
                f"loaded {r['measured_loaded_bytes'] / MIB:.1f} MiB, " if r["measured_loaded_bytes"] is not None else ""
            )
            lines.append(
                f"{r['recipe']}: computed {r['computed_weights_bytes'] / MIB:.1f} MiB weights + "
                f"{(r['computed_weights_and_state_bytes'] - r['computed_weights_bytes']) / MIB:.2f} MiB state; "
                f"measured {loaded}training peak {r['measured_training_peak_bytes'] / MIB:.0f} MiB; {r['ms_per_step']} ms/step"
                + (f" [{r['error']}]" if "error" in r else "")
            )
        return "\n".join(lines)
    if name == "ddp":
        return f"2 NCCL processes vs 1: losses agree to {step['max_relative_difference']:.1e}"
    return ""


def print_table(results):
    print(
        f"\ngpu_check on {results['machine'].get('gpu', results['device'])} (torch {results['machine']['torch']}): "
        f"{results['seconds']:.0f} s"
    )
    print(f"{'step':<9}{'status':<9}{'seconds':>8}  result")
    for name, step in results["steps"].items():
        lines = brief(name, step).splitlines() or [""]
        print(f"{name:<9}{step['status']:<9}{step['seconds']:>8.1f}  {lines[0]}")
        for line in lines[1:]:
            print(f"{'':<26}  {line}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--device", choices=("auto", "cuda", "cpu"), default="auto", help="cuda where a GPU is seen (default)"
    )
    parser.add_argument(
        "--only", default=",".join(STEPS), help=f"comma-separated steps of {', '.join(STEPS)} (default: all)"
    )
    parser.add_argument("--out", default="", help="the results file (default: benchmarks/gpu_check_<device>.json)")
    parser.add_argument("--suite_timeout", type=int, default=300, help="seconds the suite step may take")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this PyTorch sees no CUDA GPU; use --device cpu")
    args.steps = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown:
        parser.error(f"--only: unknown step {', '.join(unknown)}; use {', '.join(STEPS)}")
    args.out = args.out or os.path.join(REPO_DIR, "benchmarks", f"gpu_check_{args.device}.json")
    return args


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    results = dict(
        command="python -m benchmarks.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv),
        device=args.device,
        machine=describe_machine(args.device),
        steps={},
    )
    functions = dict(suite=step_suite, default=step_default, compile=step_compile, memory=step_memory, ddp=step_ddp)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as work:
        for name in args.steps:
            print(f"== {name}", flush=True)
            step_started = time.time()
            try:
                step = functions[name](args, work)
                step.setdefault("status", "ok")
            except Exception as e:  # a step that breaks is recorded, and the others still run
                step = dict(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
            step["seconds"] = round(time.time() - step_started, 1)
            results["steps"][name] = step
            print(f"== {name}: {step['status']}" + (f": {step['error']}" if "error" in step else ""), flush=True)
    results["seconds"] = round(time.time() - started, 1)
    write_json_atomic(finite_or_text(results), args.out)
    print_table(results)
    print(f"wrote {os.path.relpath(args.out)}")
    return 1 if any(step["status"] == "failed" for step in results["steps"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
