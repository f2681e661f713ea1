"""
The rank lab: what does LoRA's rank do? (LoRA §7, Table 6, at small scale.)

Runs the same fine-tuning job, same seed and budget, for every rank x target set, and writes one CSV row per run
plus plots: metric vs rank (log x) and metric vs trainable parameters, one line per target set. alpha = 2 x rank
(train.py's and finetune_classifier.py's default), so alpha / r = 2 at every rank.

    python -m experiments.rank_sweep --quick        # the lab: ranks 1, 4, 16, 64 on q,v and on all-linear, 120 steps
                                                    # each, two runs at a time on two cores (499 s of CPU in all:
                                                    # docs/results.md); a table, out/rank_lab/rank_lab_instruct*.png
    python -m experiments.rank_sweep                                   # both tasks, the full grid, tiny base, embedded data
    python -m experiments.rank_sweep --task classify --sms ../shared/data/sms_spam_collection.tsv
    python -m experiments.rank_sweep --ranks 1,8,64 --targets "q,v;all-linear" --instruct_iters 40   # a quick look

(from the repository root). Each run is one run of train.py or finetune_classifier.py, in a child process (as a user
would start it); its outputs (adapter included) stay in --out_dir/runs/<task>_r<rank>_<targets>_s<seed>/ for
experiments.subspace. A rerun skips the runs its CSV already holds, so an interrupted sweep resumes; delete the CSV
(or pick another --out_dir) to measure again.
"""

import argparse
import csv
import os
import time
from concurrent.futures import ThreadPoolExecutor

from support.checkpoints import ensure_tiny_base
from support.cli import HelpFormatter, run_script
from support.files import save_figure_atomic, write_csv_atomic

RANKS = (1, 2, 4, 8, 16, 32, 64)
TARGET_SETS = ("q", "q,v", "q,k,v,o", "all-linear")
# --quick: the grid and budget of the rank lab (notebook 06 trains some of its runs again and compares)
QUICK = dict(
    task="instruct",
    ranks="1,4,16,64",
    targets="q,v;all-linear",
    instruct_iters=120,
    answer_limit=112,
    out_dir="out/rank_lab",
    name="rank_lab",
)
COLUMNS = [
    "task",
    "dataset",
    "rank",
    "targets",
    "seed",
    "trainable_params",
    "adapter_bytes",
    "metric_name",
    "metric",
    "answer_accuracy",
    "seconds",
    "peak_memory_bytes",
    "steps",
    "seconds_per_step",
    "training_state_bytes",
]


def run_name(task, rank, targets, seed):
    return f"{task}_r{rank}_{targets.replace(',', '')}_s{seed}"


def instruct_settings(
    rank,
    targets,
    seed,
    out_dir,
    iters=150,
    answer_limit=500,
    alpha=0.0,
    init_from="tiny",
    dataset="embedded",
    device="auto",
):
    """train.py's settings for one instruction run of the sweep (notebook 06 trains with the same). The lab keeps the
    batches of 16 drawn at random and the compact template it was measured with (experiments/results), not train.py's
    later defaults for the tiny base (8 a batch of about one length, the bare template)."""
    return dict(
        init_from=init_from,
        dataset=dataset,
        out_dir=out_dir,
        lora_rank=rank,
        lora_alpha=alpha,
        lora_targets=targets,
        lora_dropout=0.0,
        max_iters=iters,
        batch_size=16,
        prompt_template="compact",
        group_by_length=False,
        eval_interval=iters,
        num_samples=0,
        answer_limit=answer_limit,
        seed=seed,
        progress=False,
        device=device,
    )


def run_instruct(rank, targets, args, seed, out_dir, **child):
    summary = run_script(
        "train.py",
        instruct_settings(
            rank,
            targets,
            seed,
            out_dir,
            args.instruct_iters,
            args.answer_limit,
            args.alpha,
            args.init_from,
            args.instruct_dataset,
            args.device,
        ),
        **child,
    )
    return summary, "val_loss", summary["val_loss_after"], answers_right(summary)


def answers_right(summary, when="after"):
    """The share of the answered test examples whose response holds the key answer, in trained and held-out
    phrasings together (train.py scores the two apart; the lab answers the first --answer_limit, a mix of both),
    after training or (when="before") before it."""
    right = count = 0
    columns = (
        ("examples", f"accuracy_{when}"),
        ("examples_new_phrasings", "accuracy_new_phrasings" + ("_before" if when == "before" else "")),
    )
    for row in summary.get("test_by_kind", []):
        for n, accuracy in columns:
            if row.get(n) and row.get(accuracy) is not None:
                right, count = right + row[n] * row[accuracy], count + row[n]
    return round(right / count, 6) if count else ""


def run_classify(rank, targets, args, seed, out_dir, **child):
    summary = run_script(
        "finetune_classifier.py",
        dict(
            mode="lora",
            init_from=args.init_from,
            dataset=args.sms or "embedded",
            out_dir=out_dir,
            lora_rank=rank,
            lora_alpha=args.alpha,
            lora_targets=targets,
            epochs=args.classify_epochs,
            seed=seed,
            progress=False,
            device=args.device,
        ),
        **child,
    )
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the rank lab: "
        + ", ".join(f"--{k} {v}" for k, v in QUICK.items())
        + ", --jobs 2 on two or more cores (flags given as well win)",
    )
    parser.add_argument("--task", choices=("instruct", "classify", "both"), default="both")
    parser.add_argument(
        "--ranks", default=",".join(map(str, RANKS)), help="comma-separated ranks (default: %(default)s)"
    )
    parser.add_argument(
        "--targets", default=";".join(TARGET_SETS), help="target sets separated by ';' (default: %(default)s)"
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=0,
        help="LoRA alpha for every run (default 0: alpha = 2 x rank, so alpha / r = 2)",
    )
    parser.add_argument(
        "--seeds", default="1337", help="comma-separated seeds; each (rank, targets) runs once per seed"
    )
    parser.add_argument("--init_from", default="tiny", help="the base model (default: %(default)s)")
    parser.add_argument("--instruct_dataset", default="embedded", help="instruction data (default: %(default)s)")
    parser.add_argument(
        "--instruct_iters", type=int, default=150, help="optimizer steps per instruction run (default: %(default)s)"
    )
    parser.add_argument(
        "--answer_limit",
        type=int,
        default=500,
        help="test examples answered per instruction run (default: %(default)s)",
    )
    parser.add_argument("--sms", default="", help="SMS file for the classification runs (default: the embedded sample)")
    parser.add_argument(
        "--classify_epochs", type=int, default=3, help="epochs per classification run (default: %(default)s)"
    )
    parser.add_argument("--out_dir", default="experiments/results", help="CSV and plots go here (default: %(default)s)")
    parser.add_argument(
        "--name", default="rank_sweep", help="the files are NAME_TASK.csv and .png (default: %(default)s)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side, one thread each (default: %(default)s)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if args.quick:  # the lab's settings become the defaults; flags given still win
        parser.set_defaults(
            **QUICK,
            jobs=min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1),
        )
        args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: use 1 or more")
    return args


def main(argv=None):
    args = parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    target_sets = [t.strip() for t in args.targets.split(";") if t.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    tasks = ("instruct", "classify") if args.task == "both" else (args.task,)
    os.makedirs(os.path.join(args.out_dir, "runs"), exist_ok=True)
    t0 = time.time()
    if args.init_from == "tiny":  # pretrained here, once, if missing: not by two runs at once (--jobs 2)
        ensure_tiny_base(args.device)

    for task in tasks:
        csv_path = os.path.join(args.out_dir, f"{args.name}_{task}.csv")
        rows = read_rows(csv_path)  # a rerun skips what is already measured, so an interrupted sweep resumes
        dataset = args.instruct_dataset if task == "instruct" else (args.sms or "embedded")
        todo = [
            (rank, targets, seed)
            for seed in seeds
            for targets in target_sets
            for rank in ranks
            if not any(
                (r["task"], r["dataset"], r["rank"], r["targets"], r["seed"])
                == (task, dataset, str(rank), targets, str(seed))
                for r in rows
            )
        ]
        runner = run_instruct if task == "instruct" else run_classify

        def measure(rank, targets, seed):
            out_dir = os.path.join(args.out_dir, "runs", run_name(task, rank, targets, seed))
            child = {}
            if args.jobs > 1:  # side by side: one thread each, and each run's output in its own log
                child = dict(threads=1, log_path=out_dir + ".log")
                print(
                    f"started {task}: rank {rank}, targets {targets}, seed {seed} (output: {child['log_path']})",
                    flush=True,
                )
            else:
                print(f"\n=== {task}: rank {rank}, targets {targets}, seed {seed} ===", flush=True)
            summary, metric_name, metric, accuracy = runner(rank, targets, args, seed, out_dir, **child)
            row = dict(
                task=task,
                dataset=dataset,
                rank=rank,
                targets=targets,
                seed=seed,
                trainable_params=summary["trainable_params"],
                adapter_bytes=adapter_bytes(out_dir),
                metric_name=metric_name,
                metric=metric,
                answer_accuracy=accuracy,
                seconds=summary["seconds"],
                peak_memory_bytes=summary["peak_memory_bytes"],
                steps=summary["steps"],
                seconds_per_step=summary["seconds"] / max(summary["steps"], 1),
                training_state_bytes=summary.get("training_state_bytes", ""),
            )
            print(
                f"done {task}: rank {rank}, targets {targets}, seed {seed}: {metric_name} {metric:.4f}"
                + (f", answers right {accuracy:.2f}" if task == "instruct" and accuracy != "" else "")
                + f", {row['seconds_per_step']:.3f} s per step ({time.time() - t0:.0f} s since the start)",
                flush=True,
            )
            return row

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # the threads only wait for the child processes
            futures = [pool.submit(measure, *job) for job in todo]
            try:
                for future in futures:
                    rows.append(future.result())
                    write_rows(rows, csv_path)
            except BaseException:  # a failed run (or Ctrl-C) ends the sweep: the runs not started yet never start
                pool.shutdown(cancel_futures=True)
                raise
        # plot one seed: the one the CSV's first run used, so an extra-seed run (for subspace.py) leaves the plot alone
        measured = [r for r in rows if r["dataset"] == dataset and rows and r["seed"] == rows[0]["seed"]]
        if measured:
            plot(measured, task, measured[0]["metric_name"], os.path.join(args.out_dir, f"{args.name}_{task}.png"))
            if task == "instruct" and all(r.get("answer_accuracy") not in ("", None) for r in measured):
                plot(
                    measured,
                    task,
                    "answer_accuracy",
                    os.path.join(args.out_dir, f"{args.name}_{task}_accuracy.png"),
                    "answer_accuracy",
                )
            print_table(measured)
            print_lab_table(measured)
            print(f"\nwrote {csv_path} and the plots beside it; {time.time() - t0:.0f} s in all")


def print_lab_table(rows):
    """One line per run: what it cost (trainable parameters, seconds per step, memory) beside what it bought."""
    instruct = rows[0]["task"] == "instruct"
    print(
        f"\n{'rank':>4s}  {'targets':12s} {'trainable':>10s}  {'val loss' if instruct else 'test acc':>8s}  "
        f"{'answers right' if instruct else '':>13s}  {'s/step':>6s}  {'training state':>14s}  {'peak memory':>11s}"
    )
    order = {t: i for i, t in enumerate(dict.fromkeys(r["targets"] for r in rows))}
    for r in sorted(rows, key=lambda r: (order[r["targets"]], int(r["rank"]))):
        state = (
            f"{int(r['training_state_bytes']) / 2**20:.1f} MiB"
            if r.get("training_state_bytes") not in ("", None)
            else ""
        )
        per_step = f"{float(r['seconds_per_step']):.3f}" if r.get("seconds_per_step") not in ("", None) else ""
        accuracy = (
            f"{float(r['answer_accuracy']):.2f}" if instruct and r.get("answer_accuracy") not in ("", None) else ""
        )
        print(
            f"{int(r['rank']):4d}  {r['targets']:12s} {int(r['trainable_params']):10,d}  {float(r['metric']):8.4f}  "
            f"{accuracy:>13s}  {per_step:>6s}  {state:>14s}  {int(r['peak_memory_bytes']) / 2**20:7.0f} MiB"
        )


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
