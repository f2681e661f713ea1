"""experiments/peft_family.py and experiments/latency.py: every method builds and trains on a tiny model, d90 picks the
smallest d over the threshold, the latency forms compute the same thing where they should."""

import math
import os
from types import SimpleNamespace

import pytest
import torch

from experiments import latency, peft_family
from model import GPT, GPTConfig
from support.tokenizer import get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_d90_is_the_smallest_d_over_90_percent_of_full():
    rows = [dict(method="full", metric="0.9", d="")]
    rows += [
        dict(method=f"did_{d}", metric=str(acc), d=str(d))
        for d, acc in ((10, 0.5), (100, 0.80), (1000, 0.82), (3000, 0.7))
    ]
    rows += [dict(method=f"said_{d}", metric=str(acc), d=str(d)) for d, acc in ((10, 0.6), (100, 0.7))]
    found, threshold = peft_family.d90(rows)
    assert threshold == pytest.approx(0.81) and found == {"did": 1000, "said": None}
    assert peft_family.d90(rows[1:]) == ({}, None)  # no full fine-tuning row, no threshold


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="unknown method 'bitfit'"):
        peft_family.center_of("bitfit")


@torch.no_grad()
def outputs_and_metric(model, batches, task):
    """The model's outputs on the first evaluation batch, and the run's metric computed here independently: test
    accuracy (classify) or the mean loss per target token (instruct)."""
    model.eval()
    if task == "classify":
        correct = total = 0
        for x, lengths, y in batches:
            correct += (model(x, lengths).argmax(-1) == y).sum().item()
            total += y.numel()
        x, lengths, _ = batches[0]
        return model(x, lengths), correct / total
    loss_sum = count = 0
    for x, y in batches:
        logits = model(x)[0]
        loss_sum += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum"
        ).item()
        count += (y != -100).sum().item()
    return model(batches[0][0])[0], loss_sum / count


def sweep_row(lr, val_loss, seed=1, method="lora_all", diverged=0, test=0.5):
    return dict(
        method=method,
        learning_rate=str(lr),
        seed=str(seed),
        val_loss=str(val_loss),
        diverged=str(diverged),
        test_metric=str(test),
        task="classify",
        trainable_params="10",
        test_metric_name="test_accuracy",
        start_error="",
        seconds_per_step="0.1",
        training_state_bytes="100",
        peak_rss_bytes="1000",
    )


def test_the_sweep_tries_three_rates_then_extends_past_an_edge():
    choose = peft_family.chosen_rate
    assert choose([], "lora_all", 1, 5) == (None, 1e-3)  # lora_all's centre is 3e-3: 1e-3, 3e-3, 1e-2 first
    rows = [sweep_row(1e-3, 0.5), sweep_row(3e-3, 0.4)]
    assert choose(rows, "lora_all", 1, 5) == (None, 1e-2)
    rows.append(sweep_row(1e-2, 0.3))  # the best is the largest rate tried: try 3e-2 as well
    assert choose(rows, "lora_all", 1, 5) == (None, 3e-2)
    rows.append(sweep_row(3e-2, math.nan, diverged=1))  # diverged: worst, so 1e-2 is interior now
    assert choose(rows, "lora_all", 1, 5) == (1e-2, None)
    assert choose(rows[:3], "lora_all", 1, 3) == (1e-2, None)  # at max_rates the edge is accepted
    assert choose(rows, "lora_all", 2, 5) == (None, 1e-3)  # another seed's sweep is its own
    low = [sweep_row(1e-3, 0.1), sweep_row(3e-3, 0.4), sweep_row(1e-2, 0.5)]
    assert choose(low, "lora_all", 1, 5) == (None, 3e-4)


def test_the_table_reports_the_seeds_at_the_chosen_rate():
    rows = [
        sweep_row(1e-3, 0.5, test=0.1),
        sweep_row(3e-3, 0.3, test=0.8),
        sweep_row(1e-2, 0.4, test=0.9),
        sweep_row(3e-3, 0.35, seed=2, test=0.7),
        sweep_row(3e-3, 0.32, seed=3, test=0.9),
        sweep_row(1e-2, 0.2, method="ia3"),
        sweep_row(3e-2, 0.1, method="ia3"),
    ]  # ia3's sweep is unfinished
    [summary] = peft_family.table(rows, 5)
    assert summary["method"] == "lora_all" and summary["learning_rate"] == 3e-3 and summary["seeds"] == 3
    assert summary["mean"] == pytest.approx(0.8) and summary["std"] == pytest.approx(0.1)
    assert (summary["min"], summary["max"]) == (0.7, 0.9) and summary["rates_tried"] == "0.001 0.003 0.01"
    assert (
        "| lora_all | 10 | 0.003 (0.001 0.003 0.01) | 0.800 ± 0.100 [0.700, 0.900] | 3 |"
        in peft_family.format_table([summary])
    )


def tiny_setup():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=400, vocab_size=257, n_layer=1, n_head=2, n_embd=16))
    args = SimpleNamespace(
        seed=1,
        bottleneck=4,
        prefix_tokens=3,
        sms="",
        max_train=8,
        epochs=1,
        batch_size=4,
        instruct_dataset="embedded",
        instruct_steps=2,
        max_new_tokens=4,
        loftq_iterations=2,
    )
    return gpt, args


@pytest.mark.parametrize("task", ["classify", "instruct"])
def test_every_method_trains_and_counts(task, monkeypatch):
    gpt, args = tiny_setup()
    if task == "instruct":  # answering all 224 test instructions is the slow part: answer the first 3
        real = peft_family.instruction_data

        def few_test_examples(*a):
            data = real(*a)
            data.test_examples = data.test_examples[:3]
            return data

        monkeypatch.setattr(peft_family, "instruction_data", few_test_examples)
    lora_all = 4 * 8 * (16 + 16) + 2 * 8 * (16 + 64)  # r = 8 on q, k, v, o (16 -> 16) and the MLP (16 <-> 64)
    expected = {
        "lora_qv": 2 * (8 * 16 + 16 * 8),
        "pfeiffer": 2 * 4 * 16 + 16 + 4,
        "prefix": 3 * 2 * 16,
        "ia3": 6 * 16,
        "llama_adapter": 3 * 16 + 2,
        "qlora_loftq": lora_all,
        "did_50": 50,
    }
    head = 16 * 2 + 2 if task == "classify" else 0
    evaluated = []  # (model, batches) of each run's evaluation: the trained model itself
    for name in ("evaluate_classifier", "mean_token_loss"):
        measure = getattr(peft_family, name)
        monkeypatch.setattr(
            peft_family,
            name,
            lambda model, batches, device, measure=measure: (
                evaluated.append((model, batches)) or measure(model, batches, device)
            ),
        )
    for method, count in expected.items():
        row = peft_family.run(method, task, gpt, get_tokenizer("bytes"), args, 1e-3, 1)
        assert row["trainable_params"] == count + (head if not method.startswith("did") else 0)
        assert row["steps"] == 2 and not row["diverged"] and math.isfinite(row["val_loss"])
        assert 0 <= row["test_metric"] <= 1
        assert (row["start_error"] != "") == method.startswith("qlora")
        trained, batches = evaluated[-1]  # classify: the test split; instruct: the validation batches
        trained_outputs, metric = outputs_and_metric(trained, batches, task)
        reported = row["test_metric"] if task == "classify" else row["val_loss"]
        assert reported == pytest.approx(metric, abs=1e-5), method  # the row reports the trained model's metric
        fresh_outputs, _ = outputs_and_metric(peft_family.build(method, gpt, task, args, 1)[0], batches, task)
        assert (trained_outputs - fresh_outputs).abs().max() > 1e-6, method  # and the two steps moved it
    assert all(p.grad is None for p in gpt.parameters())  # each run trains a copy: the shared base is untouched


def test_a_diverged_run_is_recorded_not_scored():
    gpt, args = tiny_setup()
    row = peft_family.run("full", "classify", gpt, get_tokenizer("bytes"), args, math.inf, 1)
    assert row["diverged"] == 1 and math.isnan(row["val_loss"]) and peft_family.score(row) == math.inf


def test_the_qlora_rows_record_a_smaller_start_error_for_pissa_and_loftq():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=1, n_head=2, n_embd=64))
    _, args = tiny_setup()
    errors = {m: peft_family.build(m, gpt, "instruct", args, 1)[2] for m in ("qlora", "qlora_pissa", "qlora_loftq")}
    assert 0 < errors["qlora_pissa"] < errors["qlora"] and 0 < errors["qlora_loftq"] < errors["qlora"] < 0.2


def test_latency_forms_and_measurement():
    config = GPTConfig(block_size=64, vocab_size=50, n_layer=1, n_head=2, n_embd=16)
    forms = latency.build_forms(config, bottleneck=4, prefix_tokens=3)
    assert list(forms) == list(latency.FORMS)
    idx = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        merged, unmerged, base = forms["lora_merged"](idx)[0], forms["lora_unmerged"](idx)[0], forms["base"](idx)[0]
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)  # merging changes the cost, not the function
    assert not torch.allclose(merged, base, atol=1e-4)  # and the adapter is not a zero one
    times = latency.measure(forms, batch=1, tokens=10, rounds=2, vocab=50)
    assert all(len(t) == 2 and min(t) > 0 for t in times.values())


def test_time_steps_gives_one_positive_median_per_method():
    gpt, args = tiny_setup()
    medians = peft_family.time_steps(
        ["full", "llama_adapter", "did_20"], "classify", gpt, get_tokenizer("bytes"), args, rounds=3
    )
    assert list(medians) == ["full", "llama_adapter", "did_20"] and all(t > 0 for t in medians.values())
