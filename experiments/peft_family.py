"""
The parameter-efficient family side by side: same base, same split, same budget, each method at the learning rate a
sweep on validation chose for it, then several seeds at that rate.

    head, last_block, full                      the baselines of finetune_classifier.py
    lora_qv, lora_all                           LoRA r=8, alpha=16 on q,v and on all six projections (lora.py)
    houlsby, pfeiffer                           bottleneck adapters (adapters.py)
    prefix                                      prefix tuning, direct (prefix_tuning.py)
    ia3                                         (IA)³ on keys, values, MLP activations (ia3.py)
    llama_adapter                               LLaMA-Adapter: K prompts per layer, their own softmax, zero gates
    qlora, qlora_pissa, qlora_loftq             LoRA r=8 on all six projections of a 4-bit NF4 base, started at B = 0,
                                                with PiSSA or with LoftQ (qlora_init.py)
    did_<d>, said_<d>                           training in a d-dimensional random subspace (intrinsic.py)

Tasks: `classify` (spam/ham on the balanced SMS split of finetune_classifier.py, 70/10/20; test accuracy) and
`instruct` (train.py's instruction set and template, loss on the responses; the greedy answers to the test
instructions scored as train.py scores them; `head` has no meaning there and is skipped). Every run sees the same
batches in the same order for a given seed, one AdamW (no weight decay) with linear warmup and cosine decay.
Sequences are cut to block_size minus the prefix length for every method, so the prefix run reads the same data.

The protocol (`--sweep`): each method trains at the three rates around its entry in CENTER (half-decade steps of
LADDER) with the first seed; while the lowest validation loss sits at an edge of the rates tried, the next rate beyond
it is tried too (up to --max_rates). The rate with the lowest validation loss is the method's; the other seeds then
train at it. The table reports the test metric's mean and spread over the seeds at the chosen rate.

    python -m experiments.peft_family --task classify --sweep --init_from checkpoints/small-base --sms PATH
    python -m experiments.peft_family --task instruct --sweep --methods lora_all,llama_adapter --init_from ...
    python -m experiments.peft_family --table_only                    # the table and plots again, from the CSVs
    python -m experiments.peft_family --methods head,full,ia3 --time_steps 20   # seconds per step, methods taking turns

Writes --out_dir/peft_family_<task>_runs.csv (one row per method, rate and seed; a rerun skips what is there, so an
interrupted sweep resumes), peft_family_<task>.csv (the table: one row per method) and peft_family_<task>.png.
Peak memory is the process's peak resident set size on the CPU (reset before each run); training_state_bytes
(weights, gradients and AdamW state) is the figure that does not depend on the process.
"""

import argparse
import copy
import csv
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

import lora
from finetune_classifier import GPTClassifier
from other_methods.adapters import apply_adapters
from other_methods.ia3 import apply_ia3
from other_methods.intrinsic import IntrinsicDimension
from other_methods.llama_adapter import apply_llama_adapter
from other_methods.prefix_tuning import apply_prefix_tuning
from other_methods.qlora_init import apply_qlora, start_error
from support.answers import answer_examples, score_responses
from support.checkpoints import load_base_model
from support.files import save_figure_atomic, write_csv_atomic
from support.instructions import InstructionData
from support.optim import lr_at_step
from support.runs import peak_memory_bytes, reset_peak_memory, training_state_bytes
from support.sms_data import (
    balance_classes,
    encode_messages,
    evaluate_classifier,
    load_messages,
    make_batches,
    split_messages,
)
from train import mean_token_loss

LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)  # learning rates, half a decade apart
CENTER = {  # method -> the middle of the three rates its sweep starts with
    "head": 1e-2,
    "last_block": 1e-3,
    "full": 1e-3,
    "lora_qv": 3e-3,
    "lora_all": 3e-3,
    "houlsby": 3e-3,
    "pfeiffer": 3e-3,
    "prefix": 1e-2,
    "ia3": 1e-2,
    "llama_adapter": 1e-2,
    "qlora": 3e-3,
    "qlora_pissa": 3e-3,
    "qlora_loftq": 3e-3,
}
INTRINSIC_CENTER = 1e-1
HEADLINE = (
    "full",
    "lora_qv",
    "lora_all",
    "houlsby",
    "prefix",
    "ia3",
    "llama_adapter",
    "qlora",
    "qlora_pissa",
    "qlora_loftq",
)
QLORA_STARTS = {"qlora": "zeros", "qlora_pissa": "pissa", "qlora_loftq": "loftq"}
RUN_COLUMNS = [
    "task",
    "method",
    "d",
    "learning_rate",
    "seed",
    "trainable_params",
    "val_loss",
    "val_accuracy",
    "test_metric_name",
    "test_metric",
    "test_exact_match",
    "start_error",
    "diverged",
    "seconds_per_step",
    "steps",
    "training_state_bytes",
    "peak_rss_bytes",
]
TABLE_COLUMNS = [
    "task",
    "method",
    "trainable_params",
    "rates_tried",
    "learning_rate",
    "seeds",
    "test_metric_name",
    "mean",
    "std",
    "min",
    "max",
    "val_loss_mean",
    "start_error",
    "seconds_per_step",
    "training_state_bytes",
    "peak_rss_bytes",
]


def center_of(method):
    if method.startswith(("did_", "said_")):
        return INTRINSIC_CENTER
    if method not in CENTER:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(CENTER)}, did_<d> or said_<d>")
    return CENTER[method]


def build(method, gpt, task, args, seed):
    """A fresh copy of the base with `method` applied: (callable model, trainable numbers, the start error or '')."""
    torch.manual_seed(seed)  # the head, the adapter's random start, the prefix's tokens: all follow the seed
    body = copy.deepcopy(gpt)
    model = GPTClassifier(body) if task == "classify" else body
    keep = ("head",) if task == "classify" else ()
    error = ""
    if method in ("head", "last_block", "full"):
        model.requires_grad_(method == "full")
        if method == "last_block":
            body.transformer.h[-1].requires_grad_(True)
            body.transformer.ln_f.requires_grad_(True)
        for name in keep:
            getattr(model, name).requires_grad_(True)
    elif method.startswith("lora_"):
        lora.apply_lora(
            model, rank=8, alpha=16, targets=("q", "v") if method == "lora_qv" else "all-linear", trainable=keep
        )
    elif method in ("houlsby", "pfeiffer"):
        apply_adapters(model, bottleneck=args.bottleneck, placement=method, trainable=keep)
    elif method == "prefix":
        apply_prefix_tuning(model, num_virtual_tokens=args.prefix_tokens, trainable=keep)
    elif method == "ia3":
        apply_ia3(model, trainable=keep)
    elif method == "llama_adapter":
        apply_llama_adapter(model, prompt_length=args.prefix_tokens, start_layer=0, trainable=keep)
    elif method in QLORA_STARTS:
        model, dense = apply_qlora(
            model,
            rank=8,
            alpha=16,
            targets="all-linear",
            init=QLORA_STARTS[method],
            iterations=args.loftq_iterations,
            trainable=keep,
        )
        layers = lora.lora_layers(model)  # the error at step 0, relative to the dense weights' norm
        error = math.sqrt(sum(start_error(dense[n], layer) ** 2 for n, layer in layers))
        error = round(error / math.sqrt(sum(w.square().sum().item() for w in dense.values())), 6)
    elif method.startswith(("did_", "said_")):
        kind, d = method.split("_")
        model = IntrinsicDimension(model, int(d), said=kind == "said", seed=seed)
    else:
        raise ValueError(f"unknown method {method!r}")
    return model, sum(p.numel() for p in model.parameters() if p.requires_grad), error


def classification_data(args, tokenizer, max_length):
    train_set, val_set, test_set = split_messages(balance_classes(load_messages(args.sms or "embedded")))
    if args.max_train:
        train_set = train_set[: args.max_train]
    return {
        name: encode_messages(subset, tokenizer, max_length)[0]
        for name, subset in (("train", train_set), ("val", val_set), ("test", test_set))
    }


def instruction_data(args, tokenizer, max_length, seed):
    """train.py's data for the byte-level base as the family was measured: the compact template (train.py's default
    for it until the bare one), the loss on the responses only."""
    return InstructionData(args.instruct_dataset, tokenizer, max_length - 1, seed, mask_prompt=True, template="compact")


def training_loss(model, batch, task):
    """Cross-entropy of one batch: of the class logits (classify), or of every target token (instruct)."""
    if task == "classify":
        x, lengths, y = batch
        return F.cross_entropy(model(x, lengths), y)
    x, y = batch
    logits, _ = model(x)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-100)


def run(method, task, gpt, tokenizer, args, learning_rate, seed):
    """Train one method once; returns its row of the runs CSV."""
    max_length = gpt.config.block_size - args.prefix_tokens
    model, trainable, error = build(method, gpt, task, args, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.999), weight_decay=0.0)
    pad = tokenizer.eot_token
    if task == "classify":
        data = classification_data(args, tokenizer, max_length)
        batches = [
            b
            for epoch in range(args.epochs)
            for b in make_batches(data["train"], args.batch_size, pad, torch.Generator().manual_seed(seed + epoch))
        ]
    else:
        data = instruction_data(args, tokenizer, max_length, seed)
        batches = [data.train_batch(step, 0, args.batch_size) for step in range(args.instruct_steps)]
    warmup_iters = max(1, len(batches) // 20)

    reset_peak_memory("cpu")
    model.train()
    diverged, steps_done = False, 0
    t0 = time.time()
    for step, batch in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = lr_at_step(step, learning_rate, warmup_iters, len(batches), min_lr_ratio=0.1)
        loss = training_loss(model, batch, task)
        if not torch.isfinite(loss):
            diverged = True  # recorded, and ranked last in the sweep
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps_done += 1
    seconds = time.time() - t0
    peak = peak_memory_bytes("cpu")
    row = dict(
        task=task,
        method=method,
        d=method.split("_")[1] if method.startswith(("did_", "said_")) else "",
        learning_rate=learning_rate,
        seed=seed,
        trainable_params=trainable,
        start_error=error,
        diverged=int(diverged),
        seconds_per_step=round(seconds / max(steps_done, 1), 4),
        steps=len(batches),
        training_state_bytes=training_state_bytes(model, optimizer),
        peak_rss_bytes=peak,
        val_loss=float("nan"),
        val_accuracy="",
        test_metric=float("nan"),
        test_exact_match="",
    )
    if diverged:
        row["test_metric_name"] = "test_accuracy" if task == "classify" else "test_answer_accuracy"
        return row
    if task == "classify":
        val = evaluate_classifier(model, make_batches(data["val"], 32, pad), "cpu")
        test = evaluate_classifier(model, make_batches(data["test"], 32, pad), "cpu")
        row.update(
            val_loss=round(val["loss"], 5),
            val_accuracy=round(val["accuracy"], 5),
            test_metric_name="test_accuracy",
            test_metric=round(test["accuracy"], 5),
        )
    else:
        row["val_loss"] = round(mean_token_loss(model, data.val_batches(args.batch_size), "cpu"), 5)
        responses = answer_examples(
            answering_model(model), tokenizer, data.test_examples, "cpu", args.max_new_tokens, "compact"
        )
        overall = score_responses(data.test_examples, responses)[0]
        row.update(
            test_metric_name="test_answer_accuracy",
            test_metric=round(overall["accuracy"], 5),
            test_exact_match=round(overall["exact_match"], 5),
        )
    return row


def answering_model(model):
    """A model.GPT that generates: the model itself, or for a subspace run a copy of the base holding θ0 + P θ_d."""
    if not isinstance(model, IntrinsicDimension):
        return model
    gpt = copy.deepcopy(model.model)
    with torch.no_grad():
        for name, weight in model.weights().items():
            gpt.get_parameter(name).copy_(weight)
    return gpt


# ---------------------------------------------------------------------------------------------- the protocol


def ladder_index(rate):
    return min(range(len(LADDER)), key=lambda i: abs(math.log(LADDER[i] / rate)))


def score(row):
    """What the sweep minimises: the validation loss (a diverged run counts as infinitely bad)."""
    value = float(row["val_loss"])
    return math.inf if int(row["diverged"]) or not math.isfinite(value) else value


def chosen_rate(rows, method, seed, max_rates):
    """(the rate with the lowest validation loss among `method`'s runs with `seed`, the next rate to try or None).
    Three rates around the method's centre first; then one more beyond the best while the best is at an edge."""
    centre = ladder_index(center_of(method))
    wanted = [LADDER[i] for i in (centre - 1, centre, centre + 1)]
    tried = {float(r["learning_rate"]): r for r in rows if r["method"] == method and int(r["seed"]) == seed}
    missing = [lr for lr in wanted if not any(math.isclose(lr, t) for t in tried)]
    if missing:
        return None, missing[0]
    rates = sorted(tried)
    best = min(rates, key=lambda lr: score(tried[lr]))
    if len(rates) < max_rates and best in (rates[0], rates[-1]):
        i = ladder_index(best) + (-1 if best == rates[0] else 1)
        if 0 <= i < len(LADDER):
            return None, LADDER[i]
    return best, None


def sweep(method, task, gpt, tokenizer, args, rows, path):
    """Run what is missing of `method`'s protocol, appending each finished run to `rows` and the CSV."""
    seeds = [args.seed + i for i in range(args.seeds)]

    def record(lr, seed):
        print(f"=== {task}: {method}, learning rate {lr:g}, seed {seed}", flush=True)
        row = run(method, task, gpt, tokenizer, args, lr, seed)
        print(
            {k: row[k] for k in ("val_loss", "val_accuracy", "test_metric", "start_error", "seconds_per_step")},
            flush=True,
        )
        rows.append(row)
        write_csv_atomic(rows, path, RUN_COLUMNS)

    while True:
        best, next_rate = chosen_rate(rows, method, seeds[0], args.max_rates)
        if next_rate is None:
            break
        record(next_rate, seeds[0])
    for seed in seeds[1:]:
        if not any(
            r["method"] == method and int(r["seed"]) == seed and math.isclose(float(r["learning_rate"]), best)
            for r in rows
        ):
            record(best, seed)


def table(rows, max_rates):
    """One row per method: the chosen rate, the test metric over the seeds at that rate, and the costs."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        first_seed = min(int(r["seed"]) for r in mine)
        best, _ = chosen_rate(rows, method, first_seed, max_rates)
        if best is None:
            continue  # the sweep is not finished
        at_best = [r for r in mine if math.isclose(float(r["learning_rate"]), best)]
        metric = [float(r["test_metric"]) for r in at_best]
        first = at_best[0]
        out.append(
            dict(
                task=first["task"],
                method=method,
                trainable_params=first["trainable_params"],
                rates_tried=" ".join(
                    f"{float(r['learning_rate']):g}"
                    for r in sorted(mine, key=lambda r: float(r["learning_rate"]))
                    if int(r["seed"]) == first_seed
                ),
                learning_rate=best,
                seeds=len(at_best),
                test_metric_name=first["test_metric_name"],
                mean=round(statistics.mean(metric), 5),
                std=round(statistics.stdev(metric), 5) if len(metric) > 1 else "",
                min=min(metric),
                max=max(metric),
                val_loss_mean=round(statistics.mean(score(r) for r in at_best), 5),
                start_error=first["start_error"],
                seconds_per_step=round(statistics.median(float(r["seconds_per_step"]) for r in at_best), 4),
                training_state_bytes=first["training_state_bytes"],
                peak_rss_bytes=max(int(r["peak_rss_bytes"]) for r in at_best),
            )
        )
    return out


def time_steps(methods, task, gpt, tokenizer, args, rounds):
    """Median seconds of one training step (forward, backward, AdamW) per method on one fixed batch, the methods
    taking turns in an order that rotates each round: on a shared machine this compares methods fairly where the
    seconds_per_step of separate runs (measured minutes apart) cannot."""
    max_length = gpt.config.block_size - args.prefix_tokens
    pad = tokenizer.eot_token
    if task == "classify":
        rows = classification_data(args, tokenizer, max_length)["train"]
        batch = make_batches(rows, args.batch_size, pad, torch.Generator().manual_seed(args.seed))[0]
    else:
        batch = instruction_data(args, tokenizer, max_length, args.seed).train_batch(0, 0, args.batch_size)
    runs = {}
    for method in methods:
        model, _, _ = build(method, gpt, task, args, args.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        runs[method] = (model.train(), params, torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0))

    def step(method):
        model, params, optimizer = runs[method]
        training_loss(model, batch, task).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = {m: [] for m in methods}
    for m in methods:
        step(m)  # warm-up: AdamW creates its state on the first step
    for r in range(rounds):
        for m in methods[r % len(methods) :] + methods[: r % len(methods)]:
            t0 = time.perf_counter()
            step(m)
            times[m].append(time.perf_counter() - t0)
    return {m: sorted(t)[len(t) // 2] for m, t in times.items()}


# ---------------------------------------------------------------------------------------------- reading and drawing


def read_rows(path):
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


ONE_RATE_CSV = "peft_family_classify_one_rate.csv"  # the earlier comparison (one rate per method), with the d sweep


def d90(rows):
    """{kind: smallest d whose accuracy reaches 90% of full fine-tuning's, or None} and that threshold, from rows of
    ONE_RATE_CSV (its `metric` column is the test accuracy)."""
    full = [float(r["metric"]) for r in rows if r["method"] == "full"]
    if not full:
        return {}, None
    threshold = 0.9 * full[0]
    found = {}
    for kind in ("did", "said"):
        reached = sorted(
            int(r["d"]) for r in rows if r["method"].startswith(kind + "_") and float(r["metric"]) >= threshold
        )
        found[kind] = reached[0] if reached else None
    return found, threshold


def plot(summary, runs, task, path):
    """Left: the test metric against trainable parameters, mean and min-max over the seeds. Right: each method's
    validation loss against the learning rate (first seed), the sweep that chose it."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.8))
    left, right = fig.subplots(1, 2)
    for r in summary:
        x, y = int(r["trainable_params"]), float(r["mean"])
        left.errorbar([x], [y], yerr=[[y - float(r["min"])], [float(r["max"]) - y]], fmt="o", capsize=3)
        left.annotate(r["method"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    left.set_xscale("log")
    left.set(
        xlabel="trainable parameters",
        ylabel=summary[0]["test_metric_name"].replace("_", " "),
        title=f"{task}: each method at its swept rate, mean and range over seeds",
    )
    left.grid(alpha=0.3)
    for r in summary:
        first_seed = min(int(x["seed"]) for x in runs if x["method"] == r["method"])
        mine = sorted(
            (x for x in runs if x["method"] == r["method"] and int(x["seed"]) == first_seed),
            key=lambda x: float(x["learning_rate"]),
        )
        right.plot(
            [float(x["learning_rate"]) for x in mine], [min(score(x), 10.0) for x in mine], "o-", label=r["method"]
        )
    right.set_xscale("log")
    right.set(xlabel="peak learning rate", ylabel="validation loss", title="the sweep (first seed)")
    right.grid(alpha=0.3)
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure_atomic(fig, path)


def plot_d90(rows, path):
    from matplotlib.figure import Figure

    found, threshold = d90(rows)
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for kind, style in (("did", "o-"), ("said", "s--")):
        mine = sorted((r for r in rows if r["method"].startswith(kind + "_")), key=lambda r: int(r["d"]))
        if mine:
            label = f"{kind.upper()} (d90 = {found.get(kind) or 'not reached'})"
            ax.plot([int(r["d"]) for r in mine], [float(r["metric"]) for r in mine], style, label=label)
    if threshold is not None:
        ax.axhline(threshold / 0.9, color="k", lw=0.8, label="full fine-tuning")
        ax.axhline(threshold, color="r", ls=":", label="90% of full fine-tuning")
    ax.set_xscale("log")
    ax.set(xlabel="subspace dimension d", ylabel="test accuracy", title="SMS spam: training in a random subspace")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, path)


def format_table(summary):
    lines = [
        "| method | trainable | rate (of those tried) | test metric, mean ± std [min, max] | seeds | start error | s/step "
        "| state MiB | peak RSS MiB |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in summary:
        std = f" ± {float(r['std']):.3f}" if r["std"] != "" else ""
        lines.append(
            f"| {r['method']} | {int(r['trainable_params']):,} | {float(r['learning_rate']):g} ({r['rates_tried']}) | "
            f"{float(r['mean']):.3f}{std} [{float(r['min']):.3f}, {float(r['max']):.3f}] | {r['seeds']} | "
            f"{r['start_error']} | {float(r['seconds_per_step']):.3f} | {int(r['training_state_bytes']) / 2**20:.1f} | "
            f"{int(r['peak_rss_bytes']) / 2**20:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("classify", "instruct", "both"), default="both")
    parser.add_argument("--methods", default="", help="comma-separated methods (default: the headline ones, HEADLINE)")
    parser.add_argument("--sweep", action="store_true", help="run the protocol (three or more rates, then the seeds)")
    parser.add_argument(
        "--seeds", type=int, default=3, help="seeds at the chosen rate, the sweep's included (default: %(default)s)"
    )
    parser.add_argument("--max_rates", type=int, default=5, help="most rates tried per method (default: %(default)s)")
    parser.add_argument("--init_from", default="tiny", help="base model (default: %(default)s)")
    parser.add_argument("--sms", default="", help="SMS file (default: the embedded sample)")
    parser.add_argument("--max_train", type=int, default=0, help="use only the first N training messages (0 = all)")
    parser.add_argument("--epochs", type=int, default=1, help="classification epochs (default: %(default)s)")
    parser.add_argument("--instruct_dataset", default="embedded")
    parser.add_argument("--instruct_steps", type=int, default=200, help="instruction steps (default: %(default)s)")
    parser.add_argument("--max_new_tokens", type=int, default=48, help="tokens per test answer (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument(
        "--bottleneck",
        type=int,
        default=16,
        help="adapter size m (Houlsby's 64 on 768 wide, scaled to 128; default: %(default)s)",
    )
    parser.add_argument(
        "--prefix_tokens",
        type=int,
        default=10,
        help="virtual tokens of the prefix, prompts of LLaMA-Adapter (default: %(default)s)",
    )
    parser.add_argument("--loftq_iterations", type=int, default=5, help="LoftQ's alternations (default: %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=1337, help="the first seed; the others follow it (default: %(default)s)"
    )
    parser.add_argument("--out_dir", default="experiments/results")
    parser.add_argument("--table_only", action="store_true", help="only the table and plots, from the runs CSV")
    parser.add_argument(
        "--time_steps",
        type=int,
        default=0,
        help="instead of training: median time of one step per method over N rotating rounds",
    )
    parser.add_argument("--d90", action="store_true", help=f"only redraw intrinsic_d90.png from {ONE_RATE_CSV}")
    args = parser.parse_args(argv)
    if args.d90:
        rows = read_rows(os.path.join(args.out_dir, ONE_RATE_CSV))
        if not rows:
            raise SystemExit(f"error: {os.path.join(args.out_dir, ONE_RATE_CSV)} is missing or empty; nothing to draw")
        plot_d90(rows, os.path.join(args.out_dir, "intrinsic_d90.png"))
        print("d90:", d90(rows))
        return
    tasks = ("classify", "instruct") if args.task == "both" else (args.task,)
    methods = [m for m in args.methods.split(",") if m] or list(HEADLINE)
    for method in methods:
        center_of(method)  # an unknown name fails before anything runs
    os.makedirs(args.out_dir, exist_ok=True)
    if not args.table_only:
        from support.tokenizer import get_tokenizer

        gpt, tokenizer_name = load_base_model(args.init_from, "cpu")
        tokenizer = get_tokenizer(tokenizer_name)
    for task in tasks:
        mine = [m for m in methods if not (task == "instruct" and m == "head")]
        if args.time_steps:
            medians = time_steps(mine, task, gpt, tokenizer, args, args.time_steps)
            rows = [
                dict(
                    task=task,
                    method=m,
                    median_step_seconds=round(t, 4),
                    ratio_to_full=round(t / medians["full"], 3) if "full" in medians else "",
                )
                for m, t in medians.items()
            ]
            write_csv_atomic(rows, os.path.join(args.out_dir, f"peft_family_{task}_step_times.csv"), list(rows[0]))
            for r in rows:
                print(r)
            continue
        path = os.path.join(args.out_dir, f"peft_family_{task}_runs.csv")
        rows = read_rows(path)
        if args.sweep:
            for method in mine:
                sweep(method, task, gpt, tokenizer, args, rows, path)
        summary = table(rows, args.max_rates)
        if summary:
            write_csv_atomic(summary, os.path.join(args.out_dir, f"peft_family_{task}.csv"), TABLE_COLUMNS)
            plot(summary, rows, task, os.path.join(args.out_dir, f"peft_family_{task}.png"))
            print(format_table(summary))


if __name__ == "__main__":
    main()
