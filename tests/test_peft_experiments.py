"""experiments/peft_family.py and experiments/latency.py: every method builds and trains on a tiny model, d90 picks the
smallest d over the threshold, the latency forms compute the same thing where they should."""
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
    rows += [dict(method=f"did_{d}", metric=str(acc), d=str(d)) for d, acc in ((10, 0.5), (100, 0.80), (1000, 0.82), (3000, 0.7))]
    rows += [dict(method=f"said_{d}", metric=str(acc), d=str(d)) for d, acc in ((10, 0.6), (100, 0.7))]
    found, threshold = peft_family.d90(rows)
    assert threshold == pytest.approx(0.81) and found == {"did": 1000, "said": None}
    assert peft_family.d90(rows[1:]) == ({}, None)  # no full fine-tuning row, no threshold


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="unknown method 'bitfit'"):
        peft_family.learning_rate_of("bitfit")


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
        loss_sum += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum").item()
        count += (y != -100).sum().item()
    return model(batches[0][0])[0], loss_sum / count


@pytest.mark.parametrize("task", ["classify", "instruct"])
def test_every_method_trains_and_counts(task, monkeypatch):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=400, vocab_size=257, n_layer=1, n_head=2, n_embd=16))
    args = SimpleNamespace(seed=1, bottleneck=4, prefix_tokens=3, sms="", max_train=8, epochs=1, batch_size=4,
                           instruct_dataset="embedded", instruct_steps=2)
    expected = {"lora_qv": 2 * (8 * 16 + 16 * 8), "pfeiffer": 2 * 4 * 16 + 16 + 4, "prefix": 3 * 2 * 16, "ia3": 6 * 16, "did_50": 50}
    head = 16 * 2 + 2 if task == "classify" else 0
    evaluated = []  # (model, batches) of each run's evaluation: the trained model itself
    for name in ("evaluate_classifier", "mean_token_loss"):
        real = getattr(peft_family, name)
        monkeypatch.setattr(peft_family, name, lambda model, batches, device, real=real: evaluated.append((model, batches)) or real(model, batches, device))
    for method, count in expected.items():
        row = peft_family.run(method, task, gpt, get_tokenizer("bytes"), args)
        assert row["trainable_params"] == count + (head if not method.startswith("did") else 0)
        assert row["steps"] == 2
        trained, batches = evaluated[-1]
        trained_outputs, metric = outputs_and_metric(trained, batches, task)
        assert row["metric"] == pytest.approx(metric, abs=1e-5), method  # the row reports the trained model's metric
        fresh_outputs, _ = outputs_and_metric(peft_family.build(method, gpt, task, args)[0], batches, task)
        assert (trained_outputs - fresh_outputs).abs().max() > 1e-6, method  # and the two steps moved it
    assert all(p.grad is None for p in gpt.parameters())  # each run trains a copy: the shared base is untouched


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
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=400, vocab_size=257, n_layer=1, n_head=2, n_embd=16))
    args = SimpleNamespace(seed=1, bottleneck=4, prefix_tokens=3, sms="", max_train=8, epochs=1, batch_size=4,
                           instruct_dataset="embedded", instruct_steps=2)
    medians = peft_family.time_steps(["full", "ia3", "did_20"], "classify", gpt, get_tokenizer("bytes"), args, rounds=3)
    assert list(medians) == ["full", "ia3", "did_20"] and all(t > 0 for t in medians.values())
