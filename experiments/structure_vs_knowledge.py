"""
"Fine-tuning is for structure, not knowledge", measured on two axes: the items and the phrasings.

Two kinds of question, each split into items that fine-tuning shows (seen) and items it never shows (unseen):
- RULE kinds (regular plurals, regular past tenses): the answer follows from the word by a rule;
- FACT kinds (capitals, animal classes): the answer is a fact about the world that the prompt does not give away.
The phrasings of every kind are split too (data/make_instructions.py's split: a quarter of the asks and of the frames
held out), so every item is asked twice after fine-tuning: once in a trained phrasing (never one that item itself
was trained in) and once in a held-out phrasing that no training example used. Each response is scored twice:
- format: the response has the trained shape (the reference sentence with its item and answer as wildcards);
- content: the key answer is in the response (answers.contains_answer).
The sentence predicts: format ~100% everywhere; content high for seen facts and for unseen rule items; for
unseen facts, no better than a guess; and, if what was learned is the rule and not the sentence, the same in
held-out phrasings. LoRA and full fine-tuning run side by side on the same data and budget.

    python -m experiments.structure_vs_knowledge                  # LoRA and full, the default base and budget
    python -m experiments.structure_vs_knowledge --modes lora --max_iters 100      # a quick look

Results: experiments/results/structure_vs_knowledge.csv and .png.
"""

import argparse
import json
import os
import random
import re

from data import make_instructions  # its word lists, facts, phrasings and phrasing split are reused here
from support.answers import answer_examples, contains_answer
from support.checkpoints import load_checkpoint_model, load_finetuned
from support.cli import run_script
from support.files import REPO_DIR, save_figure_atomic, write_csv_atomic
from support.tokenizer import get_tokenizer

KINDS = {"plural": "rule", "past_tense": "rule", "capital": "fact", "animal_class": "fact"}
COLUMNS = ["mode", "kind", "family", "items", "phrasings", "examples", "format_accuracy", "content_accuracy", "seconds"]


def shape_pattern(example):
    """The reference output as a regular expression in which the item and the answer may be anything."""
    pattern = re.escape(example["output"])
    for value in sorted({example["answer"], example["item"]}, key=len, reverse=True):
        pattern = pattern.replace(re.escape(value), ".+?")
    return pattern


def build(seed, per_kind, trained_phrasings=2):
    """-> (train examples, {(kind, 'seen'|'unseen' items, 'seen'|'new' phrasings): test examples}). Each seen item is
    trained in `trained_phrasings` trained phrasings; every item is tested once in another trained phrasing and once
    in a held-out one. Unseen items are only tested."""
    gen = make_instructions
    rng = random.Random(seed)
    kinds = gen.kinds(rng, list(KINDS))
    train_examples, tests = [], {}
    for kind, (_, items, answer) in kinds.items():
        trained, held_out = gen.phrasings(kind, seed)
        items = list(dict.fromkeys(items))
        rng.shuffle(items)
        items = items[:per_kind]
        for n, item in enumerate(items):
            part = "seen" if n < len(items) // 2 else "unseen"
            templates = rng.sample(trained, trained_phrasings + 1)
            if part == "seen":
                train_examples += [example(gen, kind, item, answer, t, rng) for t in templates[:-1]]
            tests.setdefault((kind, part, "seen"), []).append(example(gen, kind, item, answer, templates[-1], rng))
            tests.setdefault((kind, part, "new"), []).append(
                example(gen, kind, item, answer, rng.choice(held_out), rng)
            )
    rng.shuffle(train_examples)
    return train_examples, tests


def example(gen, kind, item, answer, template, rng):
    return {**gen.make_example(kind, item, answer, [template], rng), "item": gen.item_key(item)}


def dataset_file(train_examples, held_out, path):
    """An Alpaca-format file whose 85% training part (train.py's split, in file order) is exactly train_examples;
    the validation and test parts (never trained on) are filled with held-out examples."""
    n = len(train_examples)
    while int(0.85 * n) < len(train_examples) or n - len(train_examples) < 2:
        n += 1
    filler = [held_out[i % len(held_out)] for i in range(n - len(train_examples))]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(train_examples + filler, f, indent=1)
    return path


def run(mode, args, train_examples, tests):
    out_dir = os.path.join(args.out_dir, "runs", f"structure_{mode}")
    os.makedirs(out_dir, exist_ok=True)
    held_out = [ex for examples in tests.values() for ex in examples]
    data_path = dataset_file(train_examples, held_out, os.path.join(out_dir, "data.json"))
    summary = run_script(
        "train.py",
        dict(
            init_from=args.init_from,
            dataset=data_path,
            out_dir=out_dir,
            finetune="full" if mode == "full" else "lora",
            max_iters=args.max_iters,
            answer_limit=0,
            num_samples=0,
            seed=args.seed,
            progress=False,
            device=args.device,
        ),
    )
    if mode == "full":
        model, tokenizer_name = load_checkpoint_model(out_dir, summary["device"])
    else:
        model, tokenizer_name = load_finetuned(out_dir, args.init_from, summary["device"])
    tokenizer, rows = get_tokenizer(tokenizer_name), []
    for (kind, items, phrasings), examples in tests.items():
        responses = answer_examples(model, tokenizer, examples, summary["device"], 64, summary["prompt_template"])
        form = sum(bool(re.fullmatch(shape_pattern(ex), r)) for ex, r in zip(examples, responses)) / len(examples)
        content = sum(contains_answer(r, ex["answer"]) for ex, r in zip(examples, responses)) / len(examples)
        rows.append(
            dict(
                mode=mode,
                kind=kind,
                family=KINDS[kind],
                items=items,
                phrasings=phrasings,
                examples=len(examples),
                format_accuracy=round(form, 4),
                content_accuracy=round(content, 4),
                seconds=round(summary["seconds"], 1),
            )
        )
        print(
            f"{mode:5s} {kind:13s} {items:6s} items, {phrasings:4s} phrasings: format {form:.2f}  content {content:.2f}  "
            f"e.g. {responses[0]!r}"
        )
    return rows


def plot(rows, path):
    from matplotlib.figure import Figure

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig = Figure(figsize=(7 * len(modes), 6))
    axes = fig.subplots(1, len(modes), squeeze=False)[0]
    for ax, mode in zip(axes, modes):
        mine = [r for r in rows if r["mode"] == mode]
        labels = [f"{r['kind'].replace('_', ' ')}: {r['items']} items, {r['phrasings']} phrasing" for r in mine]
        x = range(len(mine))
        ax.bar([i - 0.2 for i in x], [r["format_accuracy"] for r in mine], width=0.4, label="format")
        ax.bar([i + 0.2 for i in x], [r["content_accuracy"] for r in mine], width=0.4, label="content")
        ax.set_xticks(list(x), labels, fontsize=7, rotation=90)
        ax.set_ylim(0, 1.2)
        ax.set_title(f"{mode} fine-tuning")
        ax.legend(loc="upper center", ncol=2, fontsize=8)
    fig.suptitle("structure, not knowledge: seen and unseen items of rule and fact kinds, in seen and new phrasings")
    fig.tight_layout()
    save_figure_atomic(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="lora,full", help="comma-separated: lora, full (default: %(default)s)")
    parser.add_argument("--init_from", default="tiny", help="the base model (default: %(default)s)")
    parser.add_argument(
        "--per_kind", type=int, default=80, help="items per kind, half seen, half unseen (default: %(default)s)"
    )
    parser.add_argument(
        "--max_iters", type=int, default=0, help="optimizer steps (default 0: train.py's fine-tuning default)"
    )
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--out_dir", default=os.path.join(REPO_DIR, "experiments", "results"))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    train_examples, tests = build(args.seed, args.per_kind)
    print(
        f"{len(train_examples)} training examples; tested: "
        + ", ".join(f"{'/'.join(k)} {len(v)}" for k, v in tests.items())
    )
    rows = [row for mode in args.modes.split(",") for row in run(mode.strip(), args, train_examples, tests)]
    write_csv_atomic(rows, os.path.join(args.out_dir, "structure_vs_knowledge.csv"), COLUMNS)
    plot(rows, os.path.join(args.out_dir, "structure_vs_knowledge.png"))


if __name__ == "__main__":
    main()
