"""
The parameter-efficient family side by side: same base, same split, same budget, one row per method.

    head, last_block, full                      the baselines of finetune_classifier.py
    lora_qv, lora_all                           LoRA r=8, alpha=16 on q,v and on all six projections (lora.py)
    houlsby, pfeiffer                           bottleneck adapters (adapters.py)
    prefix                                      prefix tuning, direct (prefix_tuning.py)
    ia3                                         (IA)³ on keys, values, MLP activations (ia3.py)
    did_<d>, said_<d>                           training in a d-dimensional random subspace (intrinsic.py)

Tasks: `classify` (spam/ham on the balanced SMS split of finetune_classifier.py; metric: test accuracy) and
`instruct` (the instruction set of train.py; metric: validation loss after --instruct_steps steps; `head` has no
meaning there and is skipped). Every method sees the same batches in the same order, one AdamW (weight decay 0)
with its own peak learning rate (METHODS), linear warmup and cosine decay. Sequences are cut to block_size minus
the prefix length for every method, so the prefix run reads the same data as the others.

    python -m experiments.peft_family --init_from checkpoints/small-base --sms ../shared/data/sms_spam_collection.tsv
    python -m experiments.peft_family --task classify --methods did_100,said_100     # a few rows; reruns skip done ones
    python -m experiments.peft_family --plot_only                                     # redraw from the CSVs
    python -m experiments.peft_family --methods head,full,ia3 --time_steps 20         # seconds per step, methods taking turns

Writes --out_dir/peft_family_<task>.csv (one row per method; an existing row is kept, so a sweep resumes),
peft_family_<task>.png (metric vs trainable parameters) and intrinsic_d90.png (the d sweep with its d90).
Peak memory is the process's peak resident set size on CPU, so run one method per process for a clean figure
(the loop in experiments/results/README.md does).
"""

import argparse
import copy
import csv
import os
import time

import torch
import torch.nn.functional as F

import lora
from other_methods.adapters import apply_adapters
from support.checkpoints import load_base_model
from finetune_classifier import GPTClassifier
from support.sms_data import balance_classes, encode_messages, evaluate_classifier, load_messages, make_batches, split_messages
from support.common import peak_memory_bytes, reset_peak_memory, save_figure_atomic, training_state_bytes, write_csv_atomic
from other_methods.ia3 import apply_ia3
from support.instructions import InstructionData
from other_methods.intrinsic import IntrinsicDimension
from support.loss import mean_token_loss
from support.optim import lr_at_step
from other_methods.prefix_tuning import apply_prefix_tuning

BASELINES = {  # method -> peak learning rate (intrinsic: see INTRINSIC_LR)
    "head": 1e-2, "last_block": 1e-3, "full": 3e-4, "lora_qv": 2e-3, "lora_all": 2e-3,
    "houlsby": 2e-3, "pfeiffer": 2e-3, "prefix": 1e-2, "ia3": 1e-2,
}
INTRINSIC_LR = 1e-2
D_SWEEP = (10, 30, 100, 300, 1000, 3000, 10000)
COLUMNS = ["task", "method", "d", "trainable_params", "metric_name", "metric", "seconds_per_step", "steps", "learning_rate",
           "training_state_bytes", "peak_rss_bytes", "seed"]


def learning_rate_of(method):
    if method.startswith(("did_", "said_")):
        return INTRINSIC_LR
    if method not in BASELINES:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(BASELINES)}, did_<d> or said_<d>")
    return BASELINES[method]


def build(method, gpt, task, args):
    """A fresh copy of the base with `method` applied: (callable model, number of trainable numbers)."""
    torch.manual_seed(args.seed)  # the same head (and adapter initialisation) for every run
    body = copy.deepcopy(gpt)
    model = GPTClassifier(body) if task == "classify" else body
    keep = ("head",) if task == "classify" else ()
    if method in ("head", "last_block", "full"):
        model.requires_grad_(method == "full")
        if method == "last_block":
            body.transformer.h[-1].requires_grad_(True)
            body.transformer.ln_f.requires_grad_(True)
        for name in keep:
            getattr(model, name).requires_grad_(True)
    elif method.startswith("lora_"):
        lora.apply_lora(model, rank=8, alpha=16, targets=("q", "v") if method == "lora_qv" else "all-linear", trainable=keep)
    elif method in ("houlsby", "pfeiffer"):
        apply_adapters(model, bottleneck=args.bottleneck, placement=method, trainable=keep)
    elif method == "prefix":
        apply_prefix_tuning(model, num_virtual_tokens=args.prefix_tokens, trainable=keep)
    elif method == "ia3":
        apply_ia3(model, trainable=keep)
    elif method.startswith(("did_", "said_")):
        kind, d = method.split("_")
        model = IntrinsicDimension(model, int(d), said=kind == "said", seed=args.seed)
    else:
        raise ValueError(f"unknown method {method!r}")
    return model, sum(p.numel() for p in model.parameters() if p.requires_grad)


def classification_data(args, tokenizer, max_length):
    train_set, val_set, test_set = split_messages(balance_classes(load_messages(args.sms or "embedded")))
    if args.max_train:
        train_set = train_set[: args.max_train]
    return {name: encode_messages(subset, tokenizer, max_length)[0] for name, subset in (("train", train_set), ("test", test_set))}


def training_loss(model, batch, task):
    """Cross-entropy of one batch: of the class logits (classify), or of every next token (instruct)."""
    if task == "classify":
        x, lengths, y = batch
        return F.cross_entropy(model(x, lengths), y)
    x, y = batch
    logits, _ = model(x)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-100)


def run(method, task, gpt, tokenizer, args):
    max_length = gpt.config.block_size - args.prefix_tokens
    model, trainable = build(method, gpt, task, args)
    lr = learning_rate_of(method)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    pad = tokenizer.eot_token
    if task == "classify":
        data = classification_data(args, tokenizer, max_length)
        batches = [b for epoch in range(args.epochs)
                   for b in make_batches(data["train"], args.batch_size, pad, torch.Generator().manual_seed(args.seed + epoch))]
    else:
        data = InstructionData(args.instruct_dataset, tokenizer, max_length - 1, args.seed, mask_prompt=False)
        batches = [data.train_batch(step, 0, args.batch_size) for step in range(args.instruct_steps)]
    warmup_iters = max(1, len(batches) // 20)

    reset_peak_memory("cpu")
    model.train()
    t0 = time.time()
    for step, batch in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = lr_at_step(step, lr, warmup_iters, len(batches), min_lr_ratio=0.1)
        training_loss(model, batch, task).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.time() - t0
    peak = peak_memory_bytes("cpu")
    if task == "classify":
        metric_name, metric = "test_accuracy", evaluate_classifier(model, make_batches(data["test"], 32, pad), "cpu")["accuracy"]
    else:
        metric_name, metric = "val_loss", mean_token_loss(model, data.val_batches(args.batch_size), "cpu")
    d = method.split("_")[1] if method.startswith(("did_", "said_")) else ""
    return dict(task=task, method=method, d=d, trainable_params=trainable, metric_name=metric_name, metric=round(metric, 5),
                seconds_per_step=round(seconds / len(batches), 4), steps=len(batches), learning_rate=lr,
                training_state_bytes=training_state_bytes(model, optimizer), peak_rss_bytes=peak, seed=args.seed)


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
        data = InstructionData(args.instruct_dataset, tokenizer, max_length - 1, args.seed, mask_prompt=False)
        batch = data.train_batch(0, 0, args.batch_size)
    runs = {}
    for method in methods:
        model, _ = build(method, gpt, task, args)
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
        for m in methods[r % len(methods):] + methods[: r % len(methods)]:
            t0 = time.perf_counter()
            step(m)
            times[m].append(time.perf_counter() - t0)
    return {m: sorted(t)[len(t) // 2] for m, t in times.items()}


def read_rows(path):
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def d90(rows):
    """{kind: smallest d whose accuracy reaches 90% of full fine-tuning's, or None} and that threshold."""
    full = [float(r["metric"]) for r in rows if r["method"] == "full"]
    if not full:
        return {}, None
    threshold = 0.9 * full[0]
    found = {}
    for kind in ("did", "said"):
        reached = sorted(int(r["d"]) for r in rows if r["method"].startswith(kind + "_") and float(r["metric"]) >= threshold)
        found[kind] = reached[0] if reached else None
    return found, threshold


def plot(rows, task, path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    for r in rows:
        x, y = int(r["trainable_params"]), float(r["metric"])
        marker = "x" if r["method"].startswith(("did_", "said_")) else "o"
        ax.scatter([x], [y], marker=marker)
        ax.annotate(r["method"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters", ylabel=rows[0]["metric_name"].replace("_", " "),
           title=f"{task}: the parameter-efficient family, same base, split and budget")
    ax.grid(alpha=0.3)
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


def print_table(rows):
    print("| task | method | trainable | metric | s/step | state MiB | peak RSS MiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['task']} | {r['method']} | {int(r['trainable_params']):,} | {float(r['metric']):.4f} | {float(r['seconds_per_step']):.3f} | "
              f"{int(r['training_state_bytes']) / 2**20:.1f} | {int(r['peak_rss_bytes']) / 2**20:.0f} |")


def main(argv=None):
    global INTRINSIC_LR
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("classify", "instruct", "both"), default="both")
    parser.add_argument("--methods", default="", help="comma-separated methods (default: every baseline, then did/said at D_SWEEP)")
    parser.add_argument("--init_from", default="tiny", help="base model (default: %(default)s)")
    parser.add_argument("--sms", default="", help="SMS file (default: the embedded sample)")
    parser.add_argument("--max_train", type=int, default=0, help="use only the first N training messages (0 = all)")
    parser.add_argument("--epochs", type=int, default=2, help="classification epochs (default: %(default)s)")
    parser.add_argument("--instruct_dataset", default="embedded")
    parser.add_argument("--instruct_steps", type=int, default=60, help="instruction steps (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--bottleneck", type=int, default=16, help="adapter size m (Houlsby's 64 on 768 wide, scaled to 128; default: %(default)s)")
    parser.add_argument("--prefix_tokens", type=int, default=10, help="virtual tokens of the prefix (default: %(default)s)")
    parser.add_argument("--intrinsic_lr", type=float, default=INTRINSIC_LR, help="peak learning rate of theta_d (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--out_dir", default="experiments/results")
    parser.add_argument("--plot_only", action="store_true")
    parser.add_argument("--time_steps", type=int, default=0, help="instead of training: median time of one step per method over N rotating rounds")
    args = parser.parse_args(argv)
    INTRINSIC_LR = args.intrinsic_lr
    tasks = ("classify", "instruct") if args.task == "both" else (args.task,)
    os.makedirs(args.out_dir, exist_ok=True)
    if not args.plot_only:
        from support.tokenizer import get_tokenizer

        gpt, tokenizer_name = load_base_model(args.init_from, "cpu")
        tokenizer = get_tokenizer(tokenizer_name)
    if args.time_steps:
        for task in tasks:
            methods = [m for m in args.methods.split(",") if m and not (task == "instruct" and m == "head")]
            medians = time_steps(methods, task, gpt, tokenizer, args, args.time_steps)
            rows = [dict(task=task, method=m, median_step_seconds=round(t, 4), ratio_to_full=round(t / medians["full"], 3) if "full" in medians else "")
                    for m, t in medians.items()]
            write_csv_atomic(rows, os.path.join(args.out_dir, f"peft_family_{task}_step_times.csv"), list(rows[0]))
            for r in rows:
                print(r)
        return
    for task in tasks:
        path = os.path.join(args.out_dir, f"peft_family_{task}.csv")
        rows = read_rows(path)
        methods = [m for m in args.methods.split(",") if m] or [*BASELINES, *(f"{k}_{d}" for k in ("did", "said") for d in D_SWEEP)]
        for method in methods if not args.plot_only else []:
            if task == "instruct" and method == "head":
                continue  # a language model's head is its (tied) embedding: there is no new head to train
            if any(r["method"] == method for r in rows):
                continue
            print(f"=== {task}: {method}", flush=True)
            row = run(method, task, gpt, tokenizer, args)
            print(row, flush=True)
            rows.append(row)
            write_csv_atomic(rows, path, COLUMNS)
        if rows:
            plot(rows, task, os.path.join(args.out_dir, f"peft_family_{task}.png"))
            print_table(rows)
            if task == "classify":
                plot_d90(rows, os.path.join(args.out_dir, "intrinsic_d90.png"))
                print("d90:", d90(rows))


if __name__ == "__main__":
    main()
