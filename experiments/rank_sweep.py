"""
The rank lab: what does LoRA's rank do? (LoRA §7, Table 6, at small scale.)

Runs the same fine-tuning job, same seed and budget, for every rank x target set, and writes one CSV row per run
plus two plots per task: metric vs rank (log x) and metric vs trainable parameters, one line per target set.

    python -m experiments.rank_sweep                                   # both tasks, the full grid, tiny base, embedded data
    python -m experiments.rank_sweep --task classify --sms ../shared/data/sms_spam_collection.tsv
    python -m experiments.rank_sweep --ranks 1,8,64 --targets "q,v;all-linear" --instruct_iters 40   # a quick look

(from the repository root). Each run is one run of train.py or finetune_classifier.py, in a child process (as a user
would start it); its outputs (adapter included) stay in --out_dir/runs/<task>_r<rank>_<targets>/ for
experiments.subspace.
"""

import argparse
import csv
import os

from support.common import run_script, save_figure_atomic, write_csv_atomic

RANKS = (1, 2, 4, 8, 16, 32, 64)
TARGET_SETS = ("q", "q,v", "q,k,v,o", "all-linear")
COLUMNS = ["task", "dataset", "rank", "targets", "seed", "trainable_params", "adapter_bytes", "metric_name", "metric",
           "answer_accuracy", "seconds", "peak_memory_bytes"]


def run_name(task, rank, targets, seed):
    return f"{task}_r{rank}_{targets.replace(',', '')}_s{seed}"


def run_instruct(rank, targets, args, seed, out_dir):
    summary = run_script("train.py", dict(
        init_from=args.init_from, dataset=args.instruct_dataset, out_dir=out_dir, lora_rank=rank, lora_alpha=2 * rank if args.alpha == 0 else args.alpha,
        lora_targets=targets, lora_dropout=0.0, max_iters=args.instruct_iters, eval_interval=args.instruct_iters, num_samples=0,
        seed=seed, progress=False, device=args.device))
    return summary, "val_loss", summary["val_loss_after"], summary.get("test_accuracy_after", "")


def run_classify(rank, targets, args, seed, out_dir):
    summary = run_script("finetune_classifier.py", dict(
        mode="lora", init_from=args.init_from, data_path=args.sms, out_dir=out_dir, lora_rank=rank,
        lora_alpha=2 * rank if args.alpha == 0 else args.alpha, lora_targets=targets, epochs=args.classify_epochs,
        seed=seed, progress=False, device=args.device))
    return summary, "test_accuracy", summary["test_accuracy"], summary["test_accuracy"]


def adapter_bytes(out_dir):
    for root, _, files in os.walk(out_dir):
        if "adapter_model.safetensors" in files:
            return os.path.getsize(os.path.join(root, "adapter_model.safetensors"))
    return ""


def plot(rows, task, metric_name, path, column="metric"):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for targets in dict.fromkeys(r["targets"] for r in rows):
        mine = sorted((r for r in rows if r["targets"] == targets), key=lambda r: int(r["rank"]))
        axes[0].plot([int(r["rank"]) for r in mine], [float(r[column]) for r in mine], "o-", label=targets)
        axes[1].plot([int(r["trainable_params"]) for r in mine], [float(r[column]) for r in mine], "o-", label=targets)
    for ax, xlabel in zip(axes, ("LoRA rank r", "trainable parameters")):
        ax.set_xscale("log", base=2 if xlabel.startswith("LoRA") else 10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric_name.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend(title="targets")
    fig.suptitle(f"{task}: {metric_name.replace('_', ' ')} by rank and target set (same seed and budget)")
    fig.tight_layout()
    save_figure_atomic(fig, path)


def read_rows(path):
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(rows, path):
    write_csv_atomic(rows, path, COLUMNS)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("instruct", "classify", "both"), default="both")
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)), help="comma-separated ranks (default: %(default)s)")
    parser.add_argument("--targets", default=";".join(TARGET_SETS), help="target sets separated by ';' (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=0, help="LoRA alpha for every run (default 0: alpha = 2 x rank, so scaling stays 2)")
    parser.add_argument("--seeds", default="1337", help="comma-separated seeds; each (rank, targets) runs once per seed")
    parser.add_argument("--init_from", default="tiny", help="the base model (default: %(default)s)")
    parser.add_argument("--instruct_dataset", default="embedded", help="instruction data (default: %(default)s)")
    parser.add_argument("--instruct_iters", type=int, default=150, help="optimizer steps per instruction run (default: %(default)s)")
    parser.add_argument("--sms", default="", help="SMS file for the classification runs (default: the embedded sample)")
    parser.add_argument("--classify_epochs", type=int, default=3, help="epochs per classification run (default: %(default)s)")
    parser.add_argument("--out_dir", default="experiments/results", help="CSV and plots go here (default: %(default)s)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    target_sets = [t.strip() for t in args.targets.split(";") if t.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    tasks = ("instruct", "classify") if args.task == "both" else (args.task,)
    os.makedirs(args.out_dir, exist_ok=True)

    for task in tasks:
        csv_path = os.path.join(args.out_dir, f"rank_sweep_{task}.csv")
        rows = read_rows(csv_path)  # a rerun skips what is already measured, so an interrupted sweep resumes
        dataset = args.instruct_dataset if task == "instruct" else (args.sms or "embedded")
        for seed in seeds:
            for targets in target_sets:
                for rank in ranks:
                    key = (task, dataset, str(rank), targets, str(seed))
                    if any((r["task"], r["dataset"], r["rank"], r["targets"], r["seed"]) == key for r in rows):
                        continue
                    out_dir = os.path.join(args.out_dir, "runs", run_name(task, rank, targets, seed))
                    print(f"\n=== {task}: rank {rank}, targets {targets}, seed {seed} ===", flush=True)
                    runner = run_instruct if task == "instruct" else run_classify
                    summary, metric_name, metric, accuracy = runner(rank, targets, args, seed, out_dir)
                    rows.append(dict(task=task, dataset=dataset, rank=rank, targets=targets, seed=seed,
                                     trainable_params=summary["trainable_params"], adapter_bytes=adapter_bytes(out_dir),
                                     metric_name=metric_name, metric=metric, answer_accuracy=accuracy, seconds=summary["seconds"],
                                     peak_memory_bytes=summary["peak_memory_bytes"]))
                    write_rows(rows, csv_path)
        # plot one seed: the one the CSV's first run used, so an extra-seed run (for subspace.py) leaves the plot alone
        measured = [r for r in rows if r["dataset"] == dataset and rows and r["seed"] == rows[0]["seed"]]
        if measured:
            plot(measured, task, measured[0]["metric_name"], os.path.join(args.out_dir, f"rank_sweep_{task}.png"))
            if task == "instruct" and all(r.get("answer_accuracy") not in ("", None) for r in measured):
                plot(measured, task, "answer_accuracy", os.path.join(args.out_dir, "rank_sweep_instruct_accuracy.png"), "answer_accuracy")
            print_table(measured)


def print_table(rows):
    ranks = sorted({int(r["rank"]) for r in rows})
    targets = list(dict.fromkeys(r["targets"] for r in rows))
    print(f"\n{rows[0]['task']} ({rows[0]['metric_name']}), rows = targets, columns = rank")
    print("| targets | " + " | ".join(f"r={r}" for r in ranks) + " |")
    print("|---" * (len(ranks) + 1) + "|")
    for t in targets:
        cells = []
        for rank in ranks:
            match = [r for r in rows if r["targets"] == t and int(r["rank"]) == rank]
            cells.append(f"{float(match[0]['metric']):.4f}" if match else "")
        print(f"| {t} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
