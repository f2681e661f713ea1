"""
What the programs report: the log and its plot after every save, the answers scored before and after fine-tuning,
and summary.json at the end (train.py's report_run, finetune_classifier.py's write_classifier_summary); summary.json
records every setting as the flag that gives it.
"""

import os
from dataclasses import asdict

from support.files import save_figure_atomic, shown_path, write_csv_atomic, write_json_atomic, write_together
from support.instructions import chat_prompt, score_responses
from support.runs import memory_text, peak_memory_bytes, training_state_bytes
from support.sms_data import LABELS, format_confusion


# ---------------------------------------------------------------------------------------------- train.py


def write_train_log(rows, cfg, mode):
    """log.csv (one row per step) and loss.png, after every save."""
    write_csv_atomic(rows, os.path.join(cfg.out_dir, "log.csv"), list(rows[0]))
    plot_losses(rows, os.path.join(cfg.out_dir, "loss.png"), f"{mode} on {cfg.dataset}")


def plot_losses(rows, path, title):
    from matplotlib.figure import Figure  # no pyplot: works headless and leaves a notebook's backend alone

    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    ax.plot([r["iter"] for r in rows], [r["train_loss"] for r in rows], label="train", alpha=0.6)
    evals = [r for r in rows if r["val_loss"] != ""]
    ax.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, path)


def chat_display(example):
    """A conversation shown like an Alpaca sample: the user turn before the last assistant turn, and that turn."""
    messages = example["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    users = [m["content"] for m in messages[:last] if m["role"] == "user"]
    return {"instruction": users[-1] if users else "(no user turn)", "output": chat_prompt(messages)[1]}


def answer_report(examples, before, after):
    """Score the test answers before and after training -> (summary fields, per-kind rows, per-example records).
    Alpaca examples are scored against their key answer (accuracy), where they have one, and their output (exact
    match, token F1). Examples tagged "phrasing": "held_out" (data/make_instructions.py: asked in words training never
    used) are scored apart, as test_accuracy_new_phrasings; test_accuracy_before/after are over the rest. A chat
    dataset's conversations were answered at their last assistant turn, and that turn is the reference they are
    scored against (exact match and F1 only: chat data has no key answers); their records keep the "messages"
    (chat_display shows them like an Alpaca sample)."""
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
                    row[f"{metric}{name}_before"], row[f"{metric}{name or '_after'}"] = kinds_before[kind][metric], after_scores[metric]
    columns = list(dict.fromkeys(key for row in rows.values() for key in row))  # every row gets every column
    by_kind = [{key: row.get(key, 0 if key.startswith("examples") else None) for key in columns} for _, row in sorted(rows.items())]
    _, _, rows_before = score_responses(examples, before)
    _, _, rows_after = score_responses(examples, after)
    records = []
    for ex, b, a, rb, ra in zip(examples, before, after, rows_before, rows_after):
        record = {**ex, "before": b, "after": a}
        if "correct" in ra:
            record["correct_before"], record["correct_after"] = rb["correct"], ra["correct"]
        records.append(record)
    return fields, by_kind, records


def print_answer_table(by_kind, fields):
    metric = "accuracy" if "test_accuracy_after" in fields or "test_accuracy_new_phrasings" in fields else "f1"
    new = f"test_{metric}_new_phrasings" in fields
    print(f"\nanswers on the test split ({metric}{': key answer in the response' if metric == 'accuracy' else ' against the reference'}"
          + ("; new phrasings: asked in words training never used" if new else "") + "):")
    print(f"  {'kind':14s} {'n':>4s}  {metric + ' before -> after':>24s}  {'exact before -> after':>22s}"
          + (f"  {'n':>4s}  {'new phrasings before -> after':>30s}" if new else ""))

    def cell(row, key, width):
        return f"{row[key]:{width}.2f}" if row.get(key) is not None else f"{'-':>{width}s}"

    total = {"kind": "all", "examples": sum(r.get("examples") or 0 for r in by_kind),
             "examples_new_phrasings": sum(r.get("examples_new_phrasings") or 0 for r in by_kind)}
    for key, value in fields.items():  # test_accuracy_after -> accuracy_after, ...
        total[key.removeprefix("test_")] = value
    kinds = by_kind if [r["kind"] for r in by_kind] != ["all"] else []  # data without kinds: only the total row
    for row in kinds + [total]:
        line = (f"  {row['kind']:14s} {row.get('examples') or 0:4d}  {cell(row, metric + '_before', 10)} -> {cell(row, metric + '_after', 10)}  "
                f"{cell(row, 'exact_match_before', 9)} -> {cell(row, 'exact_match_after', 9)}")
        if new:
            line += (f"  {row.get('examples_new_phrasings') or 0:4d}  {cell(row, metric + '_new_phrasings_before', 13)} -> "
                     f"{cell(row, metric + '_new_phrasings', 13)}")
        print(line)


def report_run(cfg, model, optimizer, mode, data, template, answered, before, after, rows, device, trainable, total,
               tokens_seen, run_id):
    """The end of a train.py run: the test loss and the answers after training (`after`, measured by train.py),
    scored against those before; printed, and written to summary.json (with samples.json and answers.csv for
    fine-tuning). Returns the summary. Under torchrun rank 0 alone calls it. The files are renamed into place
    together, summary.json with them: a failure leaves none of them."""
    summary = {  # every setting as the flag that gives it: --init_from, --finetune (None when pretraining), --quantize
        "init_from": cfg.init_from, "finetune": None if cfg.pretraining else cfg.finetune, "quantize": cfg.quantize, "dataset": cfg.dataset,
        "lora_rank": cfg.lora_rank if mode in ("lora", "qlora") else None,
        "lora_alpha": cfg.lora_alpha if mode in ("lora", "qlora") else None, "lora_targets": cfg.lora_targets if mode in ("lora", "qlora") else None,
        "trainable_params": trainable, "total_params": total, "train_examples": len(data.train) if not cfg.pretraining else None,
        "val_loss_before": before["val_loss"], "val_loss_after": rows[-1]["val_loss"] if rows else before["val_loss"],
        "steps": cfg.max_iters, "tokens": tokens_seen, "seconds": rows[-1]["seconds"] if rows else 0.0,
        "seconds_per_step": (rows[-1]["seconds"] / len(rows)) if rows else None, "peak_memory_bytes": peak_memory_bytes(device),
        "training_state_bytes": training_state_bytes(model, optimizer), "device": device, "config": asdict(cfg), "run_id": run_id,
    }
    if not cfg.pretraining:
        summary["test_loss_before"], summary["test_loss_after"] = before["test_loss"], after["test_loss"]
    print(f"validation loss: {summary['val_loss_before']:.4f} before -> {summary['val_loss_after']:.4f} after "
          f"{cfg.max_iters} steps in {summary['seconds']:.0f} s; peak memory {memory_text(summary['peak_memory_bytes'])}")
    with write_together():  # samples.json, answers.csv and summary.json: all of them or none
        if not cfg.pretraining:
            summary["prompt_template"] = template
            fields, by_kind, records = answer_report(answered, before["answers"], after["answers"])
            summary.update(fields)
            summary["test_by_kind"] = by_kind
            for record in records[: cfg.num_samples]:
                shown = record if "messages" not in record else chat_display(record)
                print(f"\n### {shown['instruction']}" + (f"\n    input:    {shown['input']}" if shown.get("input") else "")
                      + f"\n    expected: {shown['output']}\n    before:   {record['before']}\n    after:    {record['after']}")
            write_json_atomic(records, os.path.join(cfg.out_dir, "samples.json"))
            if by_kind:
                write_csv_atomic(by_kind, os.path.join(cfg.out_dir, "answers.csv"), list(by_kind[0]))
                print_answer_table(by_kind, fields)
            print(f"\ntest loss: {summary['test_loss_before']:.4f} before -> {summary['test_loss_after']:.4f} after")
        print(f"{mode}: {trainable:,} trainable / {total:,} total parameters; outputs in {shown_path(cfg.out_dir)}")
        write_json_atomic(summary, os.path.join(cfg.out_dir, "summary.json"))
    return summary


# ---------------------------------------------------------------------------------------------- finetune_classifier.py


def write_classifier_log(rows, cfg):
    """log.csv (one row per epoch) and curves.png, after every epoch."""
    write_csv_atomic(rows, os.path.join(cfg.out_dir, "log.csv"), list(rows[0]))
    plot_curves(rows, os.path.join(cfg.out_dir, "curves.png"), f"{cfg.mode} on {cfg.dataset}")


def plot_curves(rows, path, title):
    """Loss and accuracy per epoch, train next to validation (epoch 0: before fine-tuning)."""
    from matplotlib.figure import Figure  # no pyplot: works headless and leaves a notebook's backend alone

    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2)
    for ax, metric, label in ((axes[0], "loss", "cross-entropy"), (axes[1], "accuracy", "accuracy")):
        ax.plot(epochs, [r[f"train_{metric}"] for r in rows], "o-", label="train")
        ax.plot(epochs, [r[f"val_{metric}"] for r in rows], "s--", label="validation")
        ax.set(xlabel="epoch (0 = before fine-tuning)", ylabel=label)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure_atomic(fig, path)


def write_classifier_summary(cfg, model, optimizer, before, after, splits, truncated, max_length, run):
    """The end of a finetune_classifier.py run: accuracy and loss per split before and after, the confusion matrix,
    time and memory; printed, and written to summary.json. `run`: what the loop measured (device, trainable, total,
    steps, learning_rate, seconds, total_seconds, cached_blocks, cache_seconds, peak, run_id). Returns the summary."""
    lora_mode = cfg.mode in ("lora", "qlora")
    trainable, total, seconds, peak = run["trainable"], run["total"], run["seconds"], run["peak"]
    summary = {
        "mode": cfg.mode, "init_from": cfg.init_from, "dataset": cfg.dataset, "device": run["device"],
        "lora_rank": cfg.lora_rank if lora_mode else None, "lora_alpha": cfg.lora_alpha if lora_mode else None,
        "lora_targets": cfg.lora_targets if lora_mode else None,
        "trainable_params": trainable, "total_params": total, "trainable_fraction": trainable / total,
        "train_examples": len(splits["train"]), "val_examples": len(splits["val"]), "test_examples": len(splits["test"]),
        "truncated_examples": sum(truncated.values()), "max_length": max_length,
        **{f"{name}_accuracy": after[name]["accuracy"] for name in ("train", "val", "test")},
        **{f"{name}_loss": after[name]["loss"] for name in ("train", "val", "test")},
        **{f"{name}_accuracy_before": before[name]["accuracy"] for name in ("train", "val", "test")},
        "confusion_matrix": {"labels": list(LABELS), "rows": "true class", "columns": "predicted class",
                             **{name: after[name]["confusion"] for name in ("train", "val", "test")}},
        "epochs": cfg.epochs, "steps": run["steps"], "learning_rate": run["learning_rate"],
        "seconds": round(seconds, 3), "total_seconds": round(run["total_seconds"], 3),
        "cached_blocks": run["cached_blocks"], "trunk_cache_seconds": round(run["cache_seconds"], 3),
        "peak_memory_bytes": peak, "training_state_bytes": training_state_bytes(model, optimizer), "config": asdict(cfg),
        "run_id": run["run_id"],
    }
    write_json_atomic(summary, os.path.join(cfg.out_dir, "summary.json"))
    print(f"\naccuracy: train {summary['train_accuracy']:.1%}, validation {summary['val_accuracy']:.1%}, test "
          f"{summary['test_accuracy']:.1%} (test before fine-tuning: {summary['test_accuracy_before']:.1%})")
    print(f"test confusion matrix:\n{format_confusion(after['test']['confusion'])}")
    print(f"{cfg.mode}: {trainable:,} trainable / {total:,} total parameters; {seconds:.0f} s of training, "
          f"peak memory {memory_text(peak)}; outputs in {shown_path(cfg.out_dir)}")
    return summary
