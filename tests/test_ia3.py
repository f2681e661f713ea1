"""ia3.py: equal to HF peft's (IA)³ on GPT2LMHeadModel, identity start, freezing, merging, errors, adapter files."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GPT, GPTConfig, hf_to_ours
from other_methods.ia3 import IA3Linear, apply_ia3, ia3_parameter_count, merge_ia3
from support.adapters import (
    adapter_names,
    adapter_tensors,
    add_adapter,
    delete_adapter,
    disable_adapters,
    load_adapter,
    save_adapter,
    set_adapter,
)
from support.checkpoints import load_weights

TINY = GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32)


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(TINY).eval()


def tokens(seed=1, batch=2, length=12, vocab=TINY.vocab_size):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_equals_peft_ia3():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    L, d = 3, 32
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=L, n_head=4, n_embd=d, n_positions=64, vocab_size=100)
    ).eval()
    ours = GPT(GPTConfig(block_size=64, vocab_size=100, n_layer=L, n_head=4, n_embd=d))
    load_weights(ours, hf_to_ours(hf.state_dict(), L))
    apply_ia3(ours.eval())
    # peft's default for GPT-2: a vector on the fused c_attn output (q, k, v) and one on mlp.c_proj's input
    theirs = peft.get_peft_model(copy.deepcopy(hf), peft.IA3Config(task_type="CAUSAL_LM")).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for i in range(L):
            l_k, l_v, l_ff = (1 + 0.3 * torch.randn(n, generator=g) for n in (d, d, 4 * d))
            block = theirs.base_model.model.transformer.h[i]
            block.attn.c_attn.ia3_l["default"].copy_(torch.cat([torch.ones(d), l_k, l_v])[:, None])  # q left alone
            block.mlp.c_proj.ia3_l["default"].copy_(l_ff[None, :])
            ours.transformer.h[i].attn.k_proj.ia3_scale.copy_(l_k)
            ours.transformer.h[i].attn.v_proj.ia3_scale.copy_(l_v)
            ours.transformer.h[i].mlp.fc_out.ia3_scale.copy_(l_ff)
    idx = tokens(vocab=100, length=20)
    with torch.no_grad():
        expected, logits, base = theirs(input_ids=idx).logits, ours(idx)[0], hf(input_ids=idx).logits
    assert (logits - expected).abs().max().item() <= 1e-5
    assert (logits - base).abs().max().item() > 1e-2  # the vectors did something


def test_fresh_ia3_leaves_logits_unchanged_and_counts():
    model, idx = tiny_gpt(), tokens()
    before, _ = model(idx)
    apply_ia3(model)
    assert torch.equal(model(idx)[0], before)
    assert (
        sum(p.numel() for p in model.parameters() if p.requires_grad)
        == ia3_parameter_count(2, 32)
        == 2 * (32 + 32 + 128)
    )
    with torch.device("meta"):
        gpt2 = apply_ia3(GPT(GPTConfig()))
    assert sum(p.numel() for p in gpt2.parameters() if p.requires_grad) == 55_296  # 12 x (768 + 768 + 3072)


def test_scale_input_and_output():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    out_layer, in_layer = (
        IA3Linear(copy.deepcopy(base), scale_input=False),
        IA3Linear(copy.deepcopy(base), scale_input=True),
    )
    assert torch.equal(out_layer.ia3_scale, torch.ones(4)) and torch.equal(in_layer.ia3_scale, torch.ones(6))
    with torch.no_grad():
        out_layer.ia3_scale.copy_(torch.arange(4.0))
        in_layer.ia3_scale.copy_(torch.arange(6.0))
    x = torch.randn(3, 6)
    torch.testing.assert_close(out_layer(x), base(x) * torch.arange(4.0))
    torch.testing.assert_close(in_layer(x), base(x * torch.arange(6.0)))


def test_only_vectors_and_head_train():
    torch.manual_seed(0)
    gpt = GPT(TINY)
    head = nn.Linear(32, 2)
    model = nn.ModuleDict(dict(gpt=gpt, head=head))
    apply_ia3(model, trainable=("head",))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(model.named_parameters()) if "ia3_scale" in n or n.startswith("head.")}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    F.cross_entropy(head(gpt.hidden_states(tokens())[:, -1]), torch.tensor([0, 1])).backward()
    optimizer.step()
    assert {n for n, p in model.named_parameters() if not torch.equal(p, before[n])} == trainable


def test_merge_matches_unmerged_and_blocks_switching():
    """Merged, the base weights hold the scaled W: putting the adapter aside would leave a changed base behind, and
    (IA)³ has no unmerge, so switching away is refused."""
    model = tiny_gpt()
    with torch.no_grad():  # GPT starts its biases at zero: give them values, so that scaling them shows
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    apply_ia3(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    idx = tokens()
    expected = model(idx)[0]
    merge_ia3(model)
    torch.testing.assert_close(model(idx)[0], expected, rtol=1e-5, atol=1e-5)
    for switch in (disable_adapters, lambda m: add_adapter(m, "b", "ia3"), lambda m: delete_adapter(m, "default")):
        with pytest.raises(RuntimeError, match="merged into its base weight"):
            switch(model)
    assert adapter_names(model) == ["default"] and all(m.merged for m in model.modules() if isinstance(m, IA3Linear))
    with pytest.raises(ValueError, match="no unmerged"):
        merge_ia3(model)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(targets=("k", "q")), "unknown \\(IA\\)³ target 'q'"),
        (dict(targets=()), "unknown \\(IA\\)³ target '\\(none\\)'; valid targets are k, v, mlp"),
        (dict(trainable=("nope",)), "names no module"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = tiny_gpt()
    with pytest.raises(ValueError, match=match):
        apply_ia3(model, **kwargs)
    assert not any(isinstance(m, IA3Linear) for m in model.modules())


def test_applying_twice_save_load_switch(tmp_path):
    model = add_adapter(tiny_gpt(), "a", "ia3")
    with pytest.raises(ValueError, match="new, non-empty string.*'a'"):
        add_adapter(model, "a", "ia3")
    with pytest.raises(ValueError, match="has an adapter already"):
        apply_ia3(model)
    idx = tokens()

    def perturb():
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "ia3_scale" in n:
                    p.mul_(1 + 0.2 * torch.randn_like(p))
        return model(idx)[0]

    logits_a = perturb()
    vectors_a = {k: v.detach().clone() for k, v in adapter_tensors(model, "a").items()}
    add_adapter(model, "b", "ia3", targets=("mlp",))
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        f"transformer.h.{i}.mlp.fc_out.ia3_scale" for i in range(TINY.n_layer)
    ]  # only b's vectors, in the model
    logits_b = perturb()
    set_adapter(model, "a")
    assert torch.equal(model(idx)[0], logits_a)  # a's vectors came back as they were put aside
    assert all(torch.equal(p, vectors_a[n]) for n, p in model.named_parameters() if n in vectors_a)
    save_adapter(model, tmp_path / "a")
    save_adapter(model, tmp_path / "b", "b")
    fresh = tiny_gpt()
    load_adapter(fresh, tmp_path / "b")
    assert torch.equal(fresh(idx)[0], logits_b)
    load_adapter(fresh, tmp_path / "a")
    assert torch.equal(fresh(idx)[0], logits_a) and sorted(adapter_names(fresh)) == ["a", "b"]
