"""What the programs report: log.csv and its plot after every save, the answers scored before and after
fine-tuning, and summary.json at the end, which records every setting as the flag that gives it."""

import os
from dataclasses import asdict

from model import count_parameters
from support import files, runs
from support.answers import contains_answer, score_responses
from support.instructions import chat_prompt
from support.sms_data import LABELS, format_confusion


def write_log(rows, out_dir, title, plot_name, x, x_label, metrics):
    """log.csv (one row per step or epoch) and a plot of each (metric, label), train next to validation."""
    from matplotlib.figure import Figure  # no pyplot: works headless and leaves a notebook's backend alone

    files.write_csv_atomic(rows, os.path.join(out_dir, "log.csv"), list(rows[0]))
    fig = Figure(figsize=(1 + 4.5 * len(metrics), 3.8))
    for ax, (metric, label) in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics):
        for split, style, name in (("train", "-", "train"), ("val", "o-", "validation")):
            shown = [r for r in rows if r[f"{split}_{metric}"] != ""]  # validation: only where the run evaluated
            ax.plot([r[x] for r in shown], [r[f"{split}_{metric}"] for r in shown], style, label=name)
        ax.set(xlabel=x_label, ylabel=label or metric)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    files.save_figure_atomic(fig, os.path.join(out_dir, plot_name))


PLOTS = {  # the program -> (its plot, the x column and label, each (metric, label) plotted)
    "train": ("loss.png", "iter", "step", [("loss", "cross-entropy (nats per token)")]),
    "classifier": (
        "curves.png",
        "epoch",
        "epoch (0 = before fine-tuning)",
        [("loss", "cross-entropy"), ("accuracy", "")],
    ),
}


def write_train_log(rows, cfg, mode):
    write_log(rows, cfg.out_dir, f"{mode} on {cfg.dataset}", *PLOTS["train"])


def write_classifier_log(rows, cfg):
    write_log(rows, cfg.out_dir, f"{cfg.mode} on {cfg.dataset}", *PLOTS["classifier"])


def lora_settings(cfg, mode, model):
    """The LoRA flags of a run, None for a run without LoRA; alpha as the layers were built (0: apply_lora's default)."""
    lora = mode in ("lora", "qlora")
    alpha = next((m.settings["alpha"] for m in model.modules() if getattr(m, "method", None) == "lora"), None)
    return {
        "lora_rank": cfg.lora_rank if lora else None,
        "lora_alpha": alpha,
        "lora_targets": cfg.lora_targets if lora else None,
    }


def chat_display(example):
    """A conversation shown like an Alpaca sample: the user turn before the last assistant turn, and that turn."""
    messages = example["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    users = [m["content"] for m in messages[:last] if m["role"] == "user"]
    return {"instruction": users[-1] if users else "(no user turn)", "output": chat_prompt(messages)[1]}


def answer_report(examples, before, after):
    """The test answers scored before and after -> (summary fields, per-kind rows, per-example records); examples
    tagged "phrasing": "held_out" (asked in words training never used) are scored apart, as *_new_phrasings."""
    groups = {}
    for name, held_out in (("", False), ("_new_phrasings", True)):
        chosen = [i for i, ex in enumerate(examples) if (ex.get("phrasing") == "held_out") == held_out]
        if chosen:
            part = [examples[i] for i in chosen]
            groups[name] = tuple(score_responses(part, [responses[i] for i in chosen]) for responses in (before, after))
    fields, rows = {}, {}
    for name, ((overall_before, kinds_before, _), (overall_after, kinds_after, _)) in groups.items():
        for metric in ("accuracy", "exact_match", "f1"):
            if metric in overall_after:
                fields[f"test_{metric}{name}_before"] = overall_before[metric]
                fields[f"test_{metric}{name or '_after'}"] = overall_after[metric]
        for kind, after_scores in kinds_after.items():
            row = rows.setdefault(kind, {"kind": kind})
            row[f"examples{name}"] = after_scores["examples"]
            for metric in ("accuracy", "exact_match", "f1"):
                if metric in after_scores:
                    row[f"{metric}{name}_before"] = kinds_before[kind][metric]
                    row[f"{metric}{name or '_after'}"] = after_scores[metric]
    columns = list(dict.fromkeys(key for row in rows.values() for key in row))  # every row gets every column
    missing = {key: 0 if key.startswith("examples") else None for key in columns}
    by_kind = [missing | row for _, row in sorted(rows.items())]
    records = [{**ex, "before": b, "after": a} for ex, b, a in zip(examples, before, after)]
    for record in records:
        if record.get("answer"):  # scored as score_responses does
            record["correct_before"] = contains_answer(record["before"], record["answer"])
            record["correct_after"] = contains_answer(record["after"], record["answer"])
    return fields, by_kind, records


def print_answer_table(by_kind, fields):
    metric = "accuracy" if "test_accuracy_after" in fields or "test_accuracy_new_phrasings" in fields else "f1"
    new = f"test_{metric}_new_phrasings" in fields
    what = ": key answer in the response" if metric == "accuracy" else " against the reference"
    print(
        f"\nanswers on the test split ({metric}{what}"
        + ("; new phrasings: asked in words training never used):" if new else "):")
    )
    header = f"  {'kind':14s} {'n':>4s}  {metric + ' before -> after':>24s}  {'exact before -> after':>22s}"
    print(header + (f"  {'n':>4s}  {'new phrasings before -> after':>30s}" if new else ""))

    def cell(row, key, width):
        return f"{row[key]:{width}.2f}" if row.get(key) is not None else f"{'-':>{width}s}"

    total = {"kind": "all", **{k: sum(r.get(k) or 0 for r in by_kind) for k in ("examples", "examples_new_phrasings")}}
    for key, value in fields.items():  # test_accuracy_after -> accuracy_after, ...
        total[key.removeprefix("test_")] = value
    kinds = by_kind if [r["kind"] for r in by_kind] != ["all"] else []  # data without kinds: only the total row
    for row in kinds + [total]:
        line = f"  {row['kind']:14s} {row.get('examples') or 0:4d}  {cell(row, metric + '_before', 10)} -> "
        line += f"{cell(row, metric + '_after', 10)}  {cell(row, 'exact_match_before', 9)} -> "
        line += cell(row, "exact_match_after", 9)
        if new:
            line += (
                f"  {row.get('examples_new_phrasings') or 0:4d}  {cell(row, metric + '_new_phrasings_before', 13)} -> "
            )
            line += cell(row, metric + "_new_phrasings", 13)
        print(line)


def report_run(cfg, model, optimizer, mode, data, template, answered, before, after, rows, device, run_id):
    """The end of a train.py run (rank 0): the test loss and the answers after training scored against those before,
    printed and written to summary.json (with samples.json and answers.csv), all renamed into place together."""
    trainable, total = count_parameters(model)
    # every setting as the flag that gives it: --init_from, --finetune (None when pretraining), --quantize
    summary = {
        "init_from": cfg.init_from,
        "finetune": None if cfg.pretraining else cfg.finetune,
        "quantize": cfg.quantize,
    }
    summary |= {
        "dataset": cfg.dataset,
        **lora_settings(cfg, mode, model),
        "trainable_params": trainable,
        "total_params": total,
    }
    summary["train_examples"] = len(data.train) if not cfg.pretraining else None
    summary |= {"val_loss_before": before["val_loss"], "val_loss_after": (rows[-1] if rows else before)["val_loss"]}
    tokens_seen, seconds = (rows[-1]["tokens"], rows[-1]["seconds"]) if rows else (0, 0.0)
    summary |= {"steps": cfg.max_iters, "tokens": tokens_seen, "seconds": seconds}
    summary["seconds_per_step"] = rows[-1]["seconds"] / len(rows) if rows else None
    summary |= {"peak_memory_bytes": runs.peak_memory_bytes(device), "device": device, "run_id": run_id}
    summary |= {"training_state_bytes": runs.training_state_bytes(model, optimizer), "config": asdict(cfg)}
    if not cfg.pretraining:
        summary["test_loss_before"], summary["test_loss_after"] = before["test_loss"], after["test_loss"]
    peak = runs.memory_text(summary["peak_memory_bytes"])
    print(
        f"validation loss: {summary['val_loss_before']:.4f} before -> {summary['val_loss_after']:.4f} after "
        f"{cfg.max_iters} steps in {summary['seconds']:.0f} s; peak memory {peak}"
    )
    with files.write_together():  # samples.json, answers.csv and summary.json: all of them or none
        if not cfg.pretraining:
            summary["prompt_template"] = template
            fields, by_kind, records = answer_report(answered, before["answers"], after["answers"])
            summary.update(fields)
            summary["test_by_kind"] = by_kind
            for record in records[: cfg.num_samples]:
                shown = record if "messages" not in record else chat_display(record)
                given = f"\n    input:    {shown['input']}" if shown.get("input") else ""
                print(f"\n### {shown['instruction']}{given}\n    expected: {shown['output']}")
                print(f"    before:   {record['before']}\n    after:    {record['after']}")
            files.write_json_atomic(records, os.path.join(cfg.out_dir, "samples.json"))
            if by_kind:
                files.write_csv_atomic(by_kind, os.path.join(cfg.out_dir, "answers.csv"), list(by_kind[0]))
                print_answer_table(by_kind, fields)
            print(f"\ntest loss: {summary['test_loss_before']:.4f} before -> {summary['test_loss_after']:.4f} after")
        print(
            f"{mode}: {trainable:,} trainable / {total:,} total parameters; outputs in {files.shown_path(cfg.out_dir)}"
        )
        files.write_json_atomic(summary, os.path.join(cfg.out_dir, "summary.json"))
    return summary


def write_classifier_summary(cfg, model, optimizer, before, after, splits, truncated, max_length, run):
    """The end of a finetune_classifier.py run: accuracy and loss per split before and after, the confusion matrix,
    time and memory (`run`: what the loop measured), printed and written to summary.json."""
    trainable, total, seconds, peak = run["trainable"], run["total"], run["seconds"], run["peak"]
    summary = {"mode": cfg.mode, "init_from": cfg.init_from, "dataset": cfg.dataset, "device": run["device"]}
    summary |= {**lora_settings(cfg, cfg.mode, model), "trainable_params": trainable, "total_params": total}
    summary |= {
        "trainable_fraction": trainable / total,
        **{f"{n}_examples": len(splits[n]) for n in ("train", "val", "test")},
    }
    summary |= {"truncated_examples": sum(truncated.values()), "max_length": max_length}
    for n in ("train", "val", "test"):
        summary |= {f"{n}_accuracy": after[n]["accuracy"], f"{n}_loss": after[n]["loss"]}
    summary |= {f"{n}_accuracy_before": before[n]["accuracy"] for n in ("train", "val", "test")}
    confusion = {"labels": list(LABELS), "rows": "true class", "columns": "predicted class"}
    summary["confusion_matrix"] = confusion | {n: after[n]["confusion"] for n in ("train", "val", "test")}
    summary |= {"epochs": cfg.epochs, "steps": run["steps"], "learning_rate": run["learning_rate"]}
    summary |= {"seconds": round(seconds, 3), "total_seconds": round(run["total_seconds"], 3)}
    summary |= {"cached_blocks": run["cached_blocks"], "trunk_cache_seconds": round(run["cache_seconds"], 3)}
    summary |= {"peak_memory_bytes": peak, "training_state_bytes": runs.training_state_bytes(model, optimizer)}
    summary |= {"config": asdict(cfg), "run_id": run["run_id"]}
    files.write_json_atomic(summary, os.path.join(cfg.out_dir, "summary.json"))
    print(
        f"\naccuracy: train {summary['train_accuracy']:.1%}, validation {summary['val_accuracy']:.1%}, test "
        f"{summary['test_accuracy']:.1%} (test before fine-tuning: {summary['test_accuracy_before']:.1%})"
    )
    print(f"test confusion matrix:\n{format_confusion(after['test']['confusion'])}")
    print(
        f"{cfg.mode}: {trainable:,} trainable / {total:,} total parameters; {seconds:.0f} s of training, "
        f"peak memory {runs.memory_text(peak)}; outputs in {files.shown_path(cfg.out_dir)}"
    )
    return summary
