"""lora.py: equivalence with HF PEFT, the zero-start property, freezing, merge, adapter files, switching."""

import copy
import json
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import DoRALinear, LoRALinear, apply_lora, lora_param_groups, merge_lora, unmerge_lora
from model import GPT, GPTConfig, count_parameters
from quantize import Linear4bit
from support.adapters import (
    active_adapter,
    adapter_names,
    adapter_size_report,
    add_adapter,
    delete_adapter,
    disable_adapters,
    load_adapter,
    save_adapter,
    set_adapter,
)

TINY = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(TINY).eval()


def tokens(seed=1):
    return torch.randint(0, TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))


def randomize_lora(model, seed=2, scale=0.05):
    """Give every adapter a nonzero B (and perturbed A, DoRA m), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("lora_A", "lora_B", "lora_magnitude")):
                p.add_(scale * torch.randn(p.shape, generator=g))


class Classifier(nn.Module):
    """GPT body plus a new head, the shape of finetune_classifier.py."""

    def __init__(self, gpt, num_classes=2):
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.n_embd, num_classes)

    def forward(self, idx):
        return self.head(self.gpt.hidden_states(idx)[:, -1])


# ---------------------------------------------------------------------------------------------------------
# One layer against HF PEFT


class OneLayer(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("use_rslora,use_dora", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("dropout,training,bias", [(0.0, False, True), (0.25, True, True), (0.25, True, False)])
def test_layer_matches_peft(use_rslora, use_dora, dropout, training, bias, device):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Linear(48, 40, bias=bias).to(device)
    if bias:
        nn.init.normal_(base.bias)
    rank, alpha = 6, 12
    ours = (DoRALinear if use_dora else LoRALinear)(copy.deepcopy(base), rank, alpha, dropout, use_rslora).to(device)
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=["proj"],
        lora_dropout=dropout,
        use_rslora=use_rslora,
        use_dora=use_dora,
    )
    theirs = peft.get_peft_model(OneLayer(copy.deepcopy(base)), config).base_model.model.proj
    assert ours.scaling == theirs.scaling["default"]
    with torch.no_grad():
        A, B = 0.1 * torch.randn(rank, 48, device=device), 0.1 * torch.randn(40, rank, device=device)
        ours.lora_A.weight.copy_(A), theirs.lora_A["default"].weight.copy_(A)
        ours.lora_B.weight.copy_(B), theirs.lora_B["default"].weight.copy_(B)
        if use_dora:  # both start m at the same row norms of W0; then move m off them
            m = theirs.lora_magnitude_vector["default"].weight
            torch.testing.assert_close(ours.lora_magnitude, m, rtol=0, atol=1e-6)
            m.mul_(1 + 0.1 * torch.randn_like(m))
            ours.lora_magnitude.copy_(m)
    ours.train(training), theirs.train(training)
    x = torch.randn(3, 5, 48, device=device)
    torch.manual_seed(1)  # the same dropout mask for both
    y_ours = ours(x)
    torch.manual_seed(1)
    y_theirs = theirs(x)
    assert (y_ours - y_theirs).abs().max().item() <= 1e-6
    assert not torch.allclose(y_ours, base(x), atol=1e-3)  # the adapter did something
    y_ours.square().mean().backward()
    y_theirs.square().mean().backward()
    torch.testing.assert_close(ours.lora_A.weight.grad, theirs.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.lora_B.weight.grad, theirs.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)
    if use_dora:
        torch.testing.assert_close(
            ours.lora_magnitude.grad, theirs.lora_magnitude_vector["default"].weight.grad, rtol=1e-4, atol=1e-6
        )
    assert base.weight.grad is None and ours.base.weight.grad is None  # W0 stays frozen


def test_layer_init_and_formula():
    torch.manual_seed(0)
    base = nn.Linear(20, 30)
    layer = LoRALinear(base, rank=4, alpha=8)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    assert A.shape == (4, 20) and B.shape == (30, 4) and layer.scaling == 2.0
    assert torch.all(B == 0) and A.abs().max() <= 1 / math.sqrt(20)  # kaiming_uniform(a=sqrt(5)) bound
    assert not base.weight.requires_grad and A.requires_grad and B.requires_grad
    with torch.no_grad():
        B.normal_()
    x = torch.randn(7, 20)
    torch.testing.assert_close(layer(x), x @ (base.weight + 2.0 * B @ A).T + base.bias)
    assert LoRALinear(nn.Linear(20, 30), rank=4, alpha=8, use_rslora=True).scaling == 4.0


# ---------------------------------------------------------------------------------------------------------
# A whole model: start, freezing, training


@pytest.mark.parametrize(
    "kwargs", [dict(), dict(use_rslora=True), dict(use_dora=True), dict(targets="all-linear", dropout=0.1)]
)
def test_fresh_lora_leaves_logits_unchanged(kwargs):
    model, idx = tiny_gpt(), tokens()
    before, _ = model(idx)
    apply_lora(model, rank=4, alpha=8, **kwargs)
    after, _ = model(idx)
    assert torch.equal(before, after)


def test_targets_select_layers():
    model = apply_lora(tiny_gpt(), rank=2, targets=("q", "mlp_out"))
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == [f"transformer.h.{i}.{s}" for i in range(2) for s in ("attn.q_proj", "mlp.fc_out")]
    model = apply_lora(tiny_gpt(), rank=2, targets="all-linear")
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 6 * TINY.n_layer
    assert isinstance(model.lm_head, nn.Linear)  # the tied output head is never a target


def test_one_step_changes_only_lora_and_kept_modules(device):
    torch.manual_seed(0)
    model = Classifier(GPT(TINY)).to(device)
    apply_lora(model, rank=4, alpha=8, targets=("q", "v"), trainable=("head",))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(model.named_parameters()) if "lora_" in n or n.startswith("head.")}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    idx, labels = tokens().to(device), torch.tensor([0, 1], device=device)

    def step():
        optimizer.zero_grad()
        F.cross_entropy(model(idx), labels).backward()
        optimizer.step()
        return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}

    changed = step()
    # B = 0 at the start, so A gets no gradient in the first step; B and the head move
    assert changed == {n for n in trainable if "lora_B" in n or n.startswith("head.")}
    changed = step()
    assert changed == trainable


def test_count_parameters_gpt2_124m():
    with torch.device("meta"):  # GPT-2's shapes without allocating its 500 MB
        model = GPT(GPTConfig())
    _, total = count_parameters(model)
    assert total == 124_439_808
    apply_lora(model, rank=8, alpha=16, targets=("q", "v"))
    assert count_parameters(model) == (2 * 12 * 768 * 8 * 2, 124_439_808 + 294_912)
    report = adapter_size_report(model)
    assert report["adapter_bytes"] == 294_912 * 4 and report["model_bytes"] == 124_439_808 * 4


def test_count_parameters_tiny_all_linear():
    model = apply_lora(tiny_gpt(), rank=2, targets="all-linear", use_dora=True)
    d = TINY.n_embd
    per_block = 4 * (2 * d + d * 2 + d) + (2 * d + 4 * d * 2 + 4 * d) + (2 * 4 * d + d * 2 + d)
    assert count_parameters(model)[0] == TINY.n_layer * per_block


def test_lora_param_groups_loraplus():
    torch.manual_seed(0)
    model = apply_lora(Classifier(GPT(TINY)), rank=4, use_dora=True, trainable=("head",))
    groups = {g["name"]: g for g in lora_param_groups(model, lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.1)}
    assert groups["lora_B"]["lr"] == pytest.approx(1.6e-2) and groups["lora_A"]["lr"] == 1e-3
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["lora_B"]["weight_decay"] == 0.1
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert all("lora_B" in by_id[id(p)] for p in groups["lora_B"]["params"])
    assert {by_id[id(p)] for p in groups["other"]["params"]} == {"head.weight"}
    assert "head.bias" in {by_id[id(p)] for p in groups["no_decay"]["params"]}
    assert sum(len(g["params"]) for g in groups.values()) == sum(p.requires_grad for p in model.parameters())
    torch.optim.AdamW(list(groups.values()))  # a valid optimizer argument


# ---------------------------------------------------------------------------------------------------------
# Merge


@pytest.mark.parametrize(
    "kwargs", [dict(), dict(use_rslora=True, targets="all-linear"), dict(use_dora=True, targets=("q", "k", "mlp_in"))]
)
def test_merge_matches_unmerged(kwargs):
    model, idx = apply_lora(tiny_gpt(), rank=4, alpha=8, **kwargs), tokens()
    randomize_lora(model)
    original = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base.weight")}
    unmerged, _ = model(idx)
    merge_lora(model)
    merged, _ = model(idx)
    assert (merged - unmerged).abs().max().item() <= 1e-5
    assert not torch.allclose(
        original["transformer.h.0.attn.q_proj.base.weight"], model.transformer.h[0].attn.q_proj.base.weight
    )
    unmerge_lora(model)
    for n, p in model.named_parameters():
        if n in original:
            torch.testing.assert_close(p, original[n], rtol=0, atol=1e-6)
    assert (model(idx)[0] - unmerged).abs().max().item() <= 1e-5

    plain = merge_lora(model, unload=True)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert set(plain.state_dict()) == set(GPT(TINY).state_dict())
    fresh = GPT(TINY).eval()
    fresh.load_state_dict(plain.state_dict())
    assert (fresh(idx)[0] - unmerged).abs().max().item() <= 1e-5


def test_a_merged_adapter_is_not_switched_away():
    """While merged, the base weights hold W0 + ΔW: putting the adapter aside would leave a changed base behind."""
    model, idx = apply_lora(tiny_gpt(), rank=2), tokens()
    randomize_lora(model)
    adapted = model(idx)[0]
    merge_lora(model)
    for switch in (disable_adapters, lambda m: add_adapter(m, "b", rank=2)):
        with pytest.raises(RuntimeError, match="unmerge_lora"):
            switch(model)
    disable_adapters(unmerge_lora(model))
    set_adapter(model, "default")
    torch.testing.assert_close(model(idx)[0], adapted)


@pytest.mark.parametrize("use_dora", [False, True])
def test_quantized_base_uses_dequantize_and_refuses_merge(use_dora):
    """On a 4-bit base, LoRA computes what it computes on the dequantized weight, and refuses to merge into 4 bits."""
    torch.manual_seed(0)
    quantized = Linear4bit.from_linear(nn.Linear(64, 16))
    layer = DoRALinear if use_dora else LoRALinear
    dense = layer(quantized.to_linear(), 4, 8)  # the same weights, dequantized once
    quant = layer(quantized, 4, 8)
    randomize_lora(dense)
    quant.load_state_dict(
        {k: v for k, v in dense.state_dict().items() if "lora_" in k}, strict=False
    )  # the same adapter
    x = torch.randn(5, 64)
    torch.testing.assert_close(quant(x), dense(x))
    model = nn.Sequential()
    model.add_module("proj", quant)
    with pytest.raises(TypeError, match="merge_lora_into_dequantized"):
        merge_lora(model)
    assert not quant.merged


def test_real_linear4bit():
    import quantize

    model, idx = tiny_gpt(), tokens()
    quantize.quantize_model(model)
    before, _ = model(idx)
    apply_lora(model, rank=4, alpha=8, use_dora=True)
    assert torch.equal(model(idx)[0], before)
    randomize_lora(model)
    assert not torch.allclose(model(idx)[0], before)
    with pytest.raises(TypeError, match="merge_lora_into_dequantized"):
        merge_lora(model)


# ---------------------------------------------------------------------------------------------------------
# Adapter files and switching


@pytest.mark.parametrize("kwargs", [dict(), dict(use_dora=True, use_rslora=True, targets="all-linear", dropout=0.1)])
def test_save_load_round_trip(tmp_path, kwargs):
    torch.manual_seed(0)
    base_state = Classifier(GPT(TINY)).state_dict()
    model = Classifier(GPT(TINY))
    model.load_state_dict(base_state)
    apply_lora(model, rank=4, alpha=8, trainable=("head",), **kwargs)
    randomize_lora(model)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    model.eval()
    idx = tokens()
    expected = model(idx)
    path = save_adapter(model, tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path / "adapter")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]  # no temp files left
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["rank"] == 4 and config["alpha"] == 8 and config["trainable"] == ["head.bias", "head.weight"]
    assert config["use_dora"] == kwargs.get("use_dora", False) and config["adapter_name"] == "default"

    fresh = Classifier(GPT(TINY))
    fresh.load_state_dict(base_state)
    load_adapter(fresh, tmp_path / "adapter")
    fresh.eval()
    assert torch.equal(fresh(idx), expected)
    theirs = fresh.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    from safetensors.torch import load_file

    stored = load_file(path)
    assert all("lora_" in k or k.startswith("head.") for k in stored)  # nothing of the frozen base
    assert os.path.getsize(path) < adapter_size_report(model)["adapter_bytes"] + 16_384  # tensors plus a small header


def test_load_adapter_errors(tmp_path):
    model = apply_lora(tiny_gpt(), rank=4, alpha=8)
    save_adapter(model, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tiny_gpt(), tmp_path / "missing")
    wider = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=48))
    with pytest.raises(ValueError, match="shape|is \\("):
        load_adapter(wider, tmp_path / "a")
    assert not any(isinstance(m, LoRALinear) for m in wider.modules())  # a failed load leaves no half adapter
    deeper = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=3, n_head=2, n_embd=32))
    with pytest.raises(KeyError, match="lacks tensor"):
        load_adapter(deeper, tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text('{"rank": 4}')
    with pytest.raises(ValueError, match="not written by save_adapter"):
        load_adapter(tiny_gpt(), tmp_path / "a")
    save_adapter(model, tmp_path / "a")
    other = apply_lora(tiny_gpt(), rank=2, alpha=8)
    with pytest.raises(ValueError, match="another adapter_name"):
        load_adapter(other, tmp_path / "a")
    load_adapter(other, tmp_path / "a", adapter_name="second")  # fine under a new name
    assert active_adapter(other) == "second" and adapter_names(other) == ["default", "second"]


def test_switching_adapters(tmp_path):
    model, idx = tiny_gpt(), tokens()
    base, _ = model(idx)
    add_adapter(model, "a", rank=4, alpha=8)
    randomize_lora(model, seed=10)
    a_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    add_adapter(model, "b", "lora", rank=2, alpha=4, targets=("k", "mlp_in"))
    randomize_lora(model, seed=11)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".k_proj.lora_" in n or ".fc_in.lora_" in n for n in trainable)  # only b is in the model
    out_b, _ = model(idx)
    set_adapter(model, "a")
    out_a, _ = model(idx)
    assert all(torch.equal(p, a_weights[n]) for n, p in model.named_parameters() if "lora_" in n)  # b left a alone
    assert not any(p.requires_grad for p in model.parameters())  # the adapters aside were frozen when b was added
    assert not torch.allclose(out_a, out_b, atol=1e-4) and not torch.allclose(out_a, base, atol=1e-4)
    assert isinstance(model.transformer.h[0].attn.k_proj, nn.Linear)  # b's layers, not covered by a: their bases
    disable_adapters(model)
    assert torch.equal(model(idx)[0], base) and not any(isinstance(m, LoRALinear) for m in model.modules())
    set_adapter(model, "b")
    assert torch.equal(model(idx)[0], out_b)
    save_adapter(model, tmp_path / "b")  # the active one
    save_adapter(model, tmp_path / "a", adapter_name="a")  # one aside
    with pytest.raises(ValueError, match="no adapter named 'c'.*'a', 'b'"):
        set_adapter(model, "c")
    delete_adapter(model, "b")
    set_adapter(model, "a")
    assert torch.equal(model(idx)[0], out_a)
    delete_adapter(model, "a")
    assert not any(isinstance(m, LoRALinear) for m in model.modules()) and adapter_names(model) == []
    assert torch.equal(model(idx)[0], base)
    load_adapter(model, tmp_path / "b")
    assert torch.equal(model(idx)[0], out_b)
    load_adapter(model, tmp_path / "a")
    assert torch.equal(model(idx)[0], out_a) and adapter_names(model) == ["b", "a"]


# ---------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("rank", [0, -3, 2.5, True])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match="positive integer"):
        apply_lora(tiny_gpt(), rank=rank)


def test_rank_larger_than_layer_allows():
    model = tiny_gpt()
    with pytest.raises(ValueError, match=r"min\(in, out\) = 32"):
        apply_lora(model, rank=33)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing changed


def test_unknown_target_lists_valid_ones():
    with pytest.raises(ValueError, match="'query'.*q, k, v, o, mlp_in, mlp_out and 'all-linear'"):
        apply_lora(tiny_gpt(), targets=("q", "query"))
    with pytest.raises(AttributeError, match="has no attribute `classifier`"):
        apply_lora(tiny_gpt(), trainable=("classifier",))


def test_applying_lora_twice():
    model = apply_lora(tiny_gpt(), rank=2)
    with pytest.raises(ValueError, match="LoRA is applied already"):
        apply_lora(model, rank=2)
    with pytest.raises(ValueError, match="new, non-empty string.*'default'"):
        add_adapter(model, "default", rank=2)
    assert adapter_names(model) == ["default"] and active_adapter(model) == "default"  # the failed add changed nothing


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        apply_lora(tiny_gpt(), alpha=0)
    with pytest.raises(ValueError, match=r"dropout in \[0, 1\): 8.0, 1.0"):
        apply_lora(tiny_gpt(), rank=4, dropout=1.0)
    with pytest.raises(ValueError, match="without '.'"):
        add_adapter(tiny_gpt(), "a.b", rank=2)


# ---------------------------------------------------------------------------------------------------------
# Hostile and careless inputs (issue 17): each test failed before the check it exercises existed


def test_every_target_is_checked_even_next_to_all_linear():
    with pytest.raises(ValueError, match="unknown LoRA target 'zz'"):
        apply_lora(tiny_gpt(), targets=("all-linear", "zz"))


def test_non_finite_hyperparameters_are_refused():
    for alpha in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha must be a positive number"):
            apply_lora(tiny_gpt(), alpha=alpha)
