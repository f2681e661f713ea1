"""adapters.py: Houlsby/Pfeiffer bottleneck adapters, their parameter count, the identity start, freezing, errors,
adapter files, and several named adapters (one per task) on one frozen base."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GPT, GPTConfig
from other_methods.adapters import AdapterLayerNorm, AdapterLinear, apply_adapters, bottleneck_parameter_count
from quantize import Linear4bit
from support.adapters import (
    active_adapter,
    adapter_names,
    adapter_tensors,
    add_adapter,
    delete_adapter,
    disable_adapters,
    load_adapter,
    save_adapter,
    set_adapter,
)

TINY = GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32)


class Classifier(nn.Module):
    """GPT body plus a new head, the shape of finetune_classifier.py."""

    def __init__(self, gpt, num_classes=2):
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.n_embd, num_classes)

    def forward(self, idx):
        return self.head(self.gpt.hidden_states(idx)[:, -1])


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(TINY).eval()


def tokens(seed=1, batch=2, length=12):
    return torch.randint(0, TINY.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def perturb(model, seed=3, scale=0.1):
    """Move every adapter parameter off its initial value, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def test_one_adapter_has_2md_plus_d_plus_m_parameters():
    for d, m in ((32, 4), (768, 64), (128, 16)):
        layer = AdapterLinear(nn.Linear(d, d), m, "gelu", 1e-2)
        assert (
            sum(p.numel() for p in layer.adapter.parameters()) == bottleneck_parameter_count(d, m) == 2 * m * d + d + m
        )


@pytest.mark.parametrize(
    "placement,adapters_per_block,norms", [("houlsby", 2, 2 * TINY.n_layer + 1), ("pfeiffer", 1, 0)]
)
def test_placement_and_trainable_count(placement, adapters_per_block, norms):
    model = apply_adapters(tiny_gpt(), bottleneck=4, placement=placement)
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, AdapterLinear))
    suffixes = ("attn.o_proj", "mlp.fc_out") if placement == "houlsby" else ("mlp.fc_out",)
    assert wrapped == sorted(f"transformer.h.{i}.{s}" for i in range(TINY.n_layer) for s in suffixes)
    assert sum(isinstance(m, AdapterLayerNorm) for m in model.modules()) == norms  # ln_1, ln_2 per block and ln_f
    d = TINY.n_embd
    expected = TINY.n_layer * adapters_per_block * (2 * 4 * d + d + 4) + norms * 2 * d
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_fresh_adapter_leaves_logits_unchanged(placement):
    model, idx = tiny_gpt(), tokens()
    before, _ = model(idx)
    apply_adapters(model, bottleneck=8, placement=placement)
    after, _ = model(idx)
    assert torch.equal(before, after)
    perturb(model)  # and a trained one does change them, so the test above could fail
    assert not torch.allclose(model(idx)[0], before, atol=1e-3)


def test_adapter_formula():
    torch.manual_seed(0)
    base = nn.Linear(16, 16)
    layer = AdapterLinear(base, 3, "relu", 1e-2)
    ad = layer.adapter
    with torch.no_grad():
        ad.up.weight.normal_()
    x = torch.randn(5, 16)
    h = base(x)
    torch.testing.assert_close(
        layer(x), h + F.linear(F.relu(F.linear(h, ad.down.weight, ad.down.bias)), ad.up.weight, ad.up.bias)
    )


def test_one_step_changes_only_adapters_norms_and_head():
    torch.manual_seed(0)
    model = Classifier(GPT(TINY))
    apply_adapters(model, bottleneck=4, trainable=("head",))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # the adapters' bottlenecks, the head, and each LayerNorm's own copy of its gain and bias (not its frozen .base)
    assert trainable == {
        n
        for n in dict(model.named_parameters())
        if ".adapter." in n
        or n.startswith("head.")
        or (".ln_" in n and n.endswith((".weight", ".bias")) and ".base." not in n)
    }
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    idx, labels = tokens(), torch.tensor([0, 1])

    def step():
        optimizer.zero_grad()
        F.cross_entropy(model(idx), labels).backward()
        optimizer.step()
        return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}

    changed = step()
    assert changed <= trainable and any(".up." in n for n in changed) and "head.weight" in changed
    assert not any(".down." in n for n in changed)  # up = 0 at the start, so down gets no gradient in step 1
    assert step() == trainable


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bottleneck=0), "bottleneck must be a positive integer"),
        (dict(bottleneck=-3), "bottleneck must be a positive integer"),
        (dict(bottleneck=2.5), "bottleneck must be a positive integer"),
        (dict(placement="parallel"), "placement must be one of houlsby, pfeiffer \\(got 'parallel'\\)"),
        (dict(activation="tanh"), "activation one of gelu, relu \\(got 'tanh'\\)"),
        (dict(init_std=0.0), "init_std positive \\(got 0.0\\)"),
        (dict(trainable=("heed",)), "names no module"),
        (dict(name="a.b"), "without '.'"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = tiny_gpt()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        add_adapter(model, kwargs.pop("name", "a"), "bottleneck", **kwargs)
    assert not any(isinstance(m, (AdapterLinear, AdapterLayerNorm)) for m in model.modules())  # nothing half-applied
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and adapter_names(model) == []


def test_applying_twice_is_an_error():
    model = apply_adapters(tiny_gpt(), bottleneck=4)
    with pytest.raises(ValueError, match="has an adapter already"):
        apply_adapters(model, bottleneck=4)
    with pytest.raises(ValueError, match="new, non-empty string.*'default'"):
        add_adapter(model, "default", "bottleneck", bottleneck=4)
    perturb(model)
    idx = tokens()
    adapted = model(idx)[0]
    with pytest.raises(ValueError, match="bottleneck must be a positive integer"):  # after "default" was put aside
        add_adapter(model, "b", "bottleneck", bottleneck=0)
    assert adapter_names(model) == ["default"] and active_adapter(model) == "default"  # the failed adds changed nothing
    assert torch.equal(model(idx)[0], adapted)  # "default" is back in the model
    quantized = tiny_gpt()  # a 4-bit layer has no dense weight for a bottleneck to follow
    quantized.transformer.h[1].mlp.fc_out = Linear4bit.from_linear(quantized.transformer.h[1].mlp.fc_out)
    with pytest.raises(ValueError, match="transformer.h.1.mlp.fc_out is not one"):
        apply_adapters(quantized, bottleneck=4, placement="pfeiffer")
    assert not any(isinstance(m, AdapterLinear) for m in quantized.modules())  # checked before any layer changed


def test_save_load_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = add_adapter(Classifier(GPT(TINY)), "spam", "bottleneck", bottleneck=4, trainable=("head",))
    perturb(model)
    idx = tokens()
    expected = model(idx)
    save_adapter(model, tmp_path)
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "adapter_model.safetensors")
    assert "head.weight" in stored and not any(
        k.endswith("base.weight") or k.startswith("gpt.transformer.wte") for k in stored
    )
    torch.manual_seed(0)
    fresh = Classifier(GPT(TINY))  # the same base and head initialisation; the file supplies the rest
    with torch.no_grad():
        fresh.head.weight.zero_()  # so the head must come from the file
    load_adapter(fresh, tmp_path)
    assert adapter_names(fresh) == ["spam"]
    assert torch.equal(fresh(idx), expected)
    for (n, p), (n2, p2) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert n == n2 and torch.equal(p, p2)


def test_load_rejects_another_shape(tmp_path):
    model = apply_adapters(tiny_gpt(), bottleneck=4)
    save_adapter(model, tmp_path)
    other = apply_adapters(tiny_gpt(), bottleneck=8)
    with pytest.raises(ValueError, match="load it under another adapter_name"):
        load_adapter(other, tmp_path)
    with pytest.raises(FileNotFoundError):
        load_adapter(other, tmp_path / "missing")


def test_two_tasks_on_one_frozen_base():
    """AdapterHub's workflow: a spam adapter (with its head) and a language-modelling adapter trained one after the
    other on one base; switching picks either, the adapter aside is untouched by training the other, and the base's
    own weights never move."""
    torch.manual_seed(0)
    gpt = GPT(TINY)
    base_state = {k: v.clone() for k, v in gpt.state_dict().items()}
    classifier = Classifier(gpt)
    idx, labels = tokens(batch=4), torch.tensor([0, 1, 1, 0])
    targets = tokens(seed=5, batch=4)

    def train(model, loss_fn, steps=5):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
        for _ in range(steps):
            optimizer.zero_grad()
            loss_fn().backward()
            optimizer.step()

    add_adapter(classifier, "spam", "bottleneck", bottleneck=4, trainable=("head",))
    train(classifier, lambda: F.cross_entropy(classifier(idx), labels))
    spam_logits = classifier(idx).detach()
    spam_tensors = {k: v.detach().clone() for k, v in adapter_tensors(classifier, "spam").items()}

    add_adapter(classifier, "instruct", "bottleneck", bottleneck=4, placement="pfeiffer")
    assert not any(isinstance(m, AdapterLayerNorm) for m in classifier.modules())  # spam's layers are aside
    trainable = {n for n, p in classifier.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp.fc_out.adapter." in n for n in trainable)  # spam's head is frozen too
    train(classifier, lambda: gpt(idx, targets)[1])
    instruct_logits = gpt(idx)[0].detach()
    assert all(torch.equal(v, spam_tensors[k]) for k, v in adapter_tensors(classifier, "spam").items())

    assert adapter_names(classifier) == ["spam", "instruct"]
    set_adapter(classifier, "spam")
    assert torch.equal(classifier(idx), spam_logits)  # training the second task did not touch the first
    in_model = {n: p for n, p in classifier.named_parameters() if n in spam_tensors}
    assert in_model.keys() == spam_tensors.keys() and all(torch.equal(p, spam_tensors[n]) for n, p in in_model.items())
    set_adapter(classifier, "instruct")
    assert torch.equal(gpt(idx)[0], instruct_logits)
    disable_adapters(classifier)
    plain = GPT(TINY)
    plain.load_state_dict(base_state)
    assert torch.equal(gpt(idx)[0], plain(idx)[0])  # the frozen base is untouched
    delete_adapter(classifier, "spam")
    delete_adapter(classifier, "instruct")
    assert not any(isinstance(m, (AdapterLinear, AdapterLayerNorm)) for m in gpt.modules())
    assert all(torch.equal(v, base_state[k]) for k, v in gpt.state_dict().items())
    with pytest.raises(ValueError, match="no adapter named 'spam'"):
        set_adapter(classifier, "spam")


def test_switching_through_a_submodule_is_refused():
    """The adapters are named on the model they were added to: switching them through a part of it (the classifier's
    .gpt) swaps layers that model's names do not follow, which it then says instead of running the wrong adapter."""
    classifier = Classifier(tiny_gpt())
    add_adapter(classifier, "spam", "bottleneck", bottleneck=4)
    add_adapter(classifier.gpt, "instruct", "bottleneck", bottleneck=4, placement="pfeiffer")
    with pytest.raises(RuntimeError, match="switch through one model for all"):
        set_adapter(classifier, "spam")


# ---------------------------------------------------------------------------------------------------------
# issue 26: adapters.load_adapter (bottleneck, prefix, (IA)3) checks what it reads as lora.load_adapter does


def saved(tmp_path, method="bottleneck"):
    from other_methods.ia3 import apply_ia3
    from other_methods.prefix_tuning import apply_prefix_tuning

    apply = {
        "bottleneck": lambda m: apply_adapters(m, bottleneck=4),
        "prefix": lambda m: apply_prefix_tuning(m, num_virtual_tokens=3),
        "ia3": apply_ia3,
    }[method]
    model = apply(tiny_gpt())
    perturb(model)
    save_adapter(model, tmp_path / method)
    return tmp_path / method


@pytest.mark.parametrize("method", ["bottleneck", "prefix", "ia3"])
@pytest.mark.parametrize(
    "damage, message",
    [
        ("nan", "holds NaN or infinite values"),
        ("int32", "is torch.int32, but adapter weights are floating point"),
        ("other weights", "is not the file adapter_config.json beside it was saved with"),
        ("truncated", "is not the file adapter_config.json beside it was saved with"),
    ],
)
def test_load_refuses_damaged_weights(tmp_path, method, damage, message):
    import hashlib
    import json

    from safetensors.torch import load_file, save

    directory = saved(tmp_path, method)
    weights = directory / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    if damage == "truncated":
        data = weights.read_bytes()[: weights.stat().st_size // 2]
    else:
        tensors[name] = {
            "nan": torch.full_like(tensors[name], float("nan")),
            "int32": tensors[name].round().to(torch.int32),
            "other weights": tensors[name] + 1,
        }[damage]
        data = save(tensors)
    weights.write_bytes(data)
    if damage in ("nan", "int32"):  # written with a matching checksum, as a diverged or foreign save would be
        config = json.loads((directory / "adapter_config.json").read_text())
        (directory / "adapter_config.json").write_text(
            json.dumps({**config, "weights_sha256": hashlib.sha256(data).hexdigest()})
        )
    with pytest.raises(ValueError, match=message):
        load_adapter(tiny_gpt(), directory)


def test_load_refuses_a_config_it_cannot_build(tmp_path):
    import json

    directory = saved(tmp_path)
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "surprise": 1}))
    with pytest.raises(ValueError, match="has setting 'surprise', which bottleneck adapters do not take"):
        load_adapter(tiny_gpt(), directory)
    (directory / "adapter_config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k != "weights_sha256"})
    )
    with pytest.raises(ValueError, match="lacks 'weights_sha256'"):
        load_adapter(tiny_gpt(), directory)
    (directory / "adapter_config.json").write_text(json.dumps({**config, "init_std": "0.01"}))
    with pytest.raises(ValueError, match="'init_std' is \"0.01\", but must be a number"):
        load_adapter(tiny_gpt(), directory)
    (directory / "adapter_config.json").write_text(json.dumps({**config, "bottleneck": 0}))  # of the right kind
    with pytest.raises(ValueError, match="its settings do not build a bottleneck adapter"):
        load_adapter(tiny_gpt(), directory)
