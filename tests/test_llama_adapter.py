"""llama_adapter.py: the paper's equations computed directly, HF peft's adaption prompt on GPT2LMHeadModel, the identity
start, only prompts and gates training, the KV cache, the count for GPT-2 124M, files and switching with other adapters."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, hf_to_ours
from other_methods.llama_adapter import AdaptedAttention, apply_llama_adapter, llama_adapter_parameter_count
from quantize import dequantize_model, quantize_model
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

TINY = GPTConfig(block_size=32, vocab_size=64, n_layer=3, n_head=2, n_embd=16)


def tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY.__dict__, **overrides})).eval()


def tokens(seed=1, batch=2, length=12, vocab=TINY.vocab_size):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def open_gates(model, seed=2, scale=1.0):
    """Random gates (and prompts nudged), so the adaption prompts change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".attn.prompt", ".attn.gate")):
                p.add_(scale * torch.randn(p.shape, generator=g))


def paper_forward(gpt, idx, adapted):
    """The logits of a GPT-2 (no smeared keys, no dropout) with adaption prompts, from the paper's equations (§3.2)
    written out directly: for each query t of an adapted layer, one score vector over [the K prompts; tokens 1..t],
    its two parts softmaxed separately and the prompts' part multiplied by the gate, then times [V_P; V_tokens] and the
    output projection. adapted: {layer: (prompt (K, d), gate (n_head,))}."""
    T = idx.size(1)
    x = gpt.transformer.wte(idx) + gpt.transformer.wpe(torch.arange(T))
    H = gpt.config.n_head
    hs = gpt.config.n_embd // H
    for layer, block in enumerate(gpt.transformer.h):
        attn, a = getattr(block.attn, "base", block.attn), block.ln_1(x)  # the frozen layer under a wrapper

        def project(linear, inputs):
            return (inputs @ linear.weight.T + linear.bias).view(*inputs.shape[:-1], H, hs)

        q, k, v = project(attn.q_proj, a), project(attn.k_proj, a), project(attn.v_proj, a)  # (B, T, H, hs)
        y = torch.zeros_like(q)
        for t in range(T):
            for h in range(H):
                scores = k[:, : t + 1, h] @ q[:, t, h, :, None] / math.sqrt(hs)  # (B, t+1, 1)
                weights, values = scores.softmax(dim=1), v[:, : t + 1, h]
                if layer in adapted:
                    prompt, gate = adapted[layer]
                    k_p, v_p = project(attn.k_proj, prompt)[:, h], project(attn.v_proj, prompt)[:, h]  # no position
                    prompt_weights = gate[h] * (k_p @ q[:, t, h, :, None] / math.sqrt(hs)).softmax(dim=1)
                    weights = torch.cat([prompt_weights, weights], dim=1)
                    values = torch.cat([v_p.expand(q.size(0), -1, -1), values], dim=1)
                y[:, t, h] = (weights * values).sum(dim=1)
        x = x + y.flatten(2) @ attn.o_proj.weight.T + attn.o_proj.bias
        x = x + block.mlp(block.ln_2(x))
    return gpt.lm_head(gpt.transformer.ln_f(x))


def test_equals_the_papers_equations():
    model = apply_llama_adapter(tiny_gpt(), prompt_length=4, start_layer=1)
    open_gates(model)
    adapted = {i: (model.transformer.h[i].attn.prompt, model.transformer.h[i].attn.gate) for i in (1, 2)}
    idx = tokens()
    with torch.no_grad():
        expected, logits, plain = paper_forward(model, idx, adapted), model(idx)[0], paper_forward(model, idx, {})
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert (logits - plain).abs().max() > 1e-2  # the prompts did something


def test_equals_peft_adaption_prompt_where_peft_agrees_with_the_paper():
    """peft's adaption prompt for GPT-2 (one gate per layer, the top `adapter_layers` layers) adds the prompts' attention
    output after the output projection c_proj, not before it as the paper and peft's own LLaMA version do. With c_proj
    the identity in the adapted layers the two placements coincide, and the logits must agree."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    L, d, H, K, top = 3, 32, 4, 5, 2
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=L, n_head=H, n_embd=d, n_positions=64, vocab_size=100)
    ).eval()
    ours = GPT(GPTConfig(block_size=64, vocab_size=100, n_layer=L, n_head=H, n_embd=d))
    load_weights(ours, hf_to_ours(hf.state_dict(), L))
    apply_llama_adapter(ours.eval(), prompt_length=K, start_layer=L - top)
    config = peft.AdaptionPromptConfig(adapter_len=K, adapter_layers=top, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(copy.deepcopy(hf), config).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i in range(L - top, L):
            wrapped, mine = theirs.base_model.model.transformer.h[i].attn, ours.transformer.h[i].attn
            prompt, gate = torch.randn(K, d, generator=g), torch.randn(1, generator=g)
            wrapped.adaption_prompt.copy_(prompt[None])
            wrapped.adaption_gate.copy_(gate)
            mine.prompt.copy_(prompt)
            mine.gate.copy_(gate.expand(H))
        idx = tokens(vocab=100, length=20)
        as_is = (theirs(input_ids=idx).logits - ours(idx)[0]).abs().max()
        for i in range(L - top, L):
            theirs.base_model.model.transformer.h[i].attn.model.c_proj.weight.copy_(torch.eye(d))
            ours.transformer.h[i].attn.base.o_proj.weight.copy_(torch.eye(d))
        expected, logits = theirs(input_ids=idx).logits, ours(idx)[0]
    assert (logits - expected).abs().max().item() <= 1e-5
    assert as_is > 1e-2  # with GPT-2's own c_proj the placements differ, visibly
    assert (logits - hf(input_ids=idx).logits).abs().max() > 1e-2


@pytest.mark.parametrize("smear_keys", [False, True])
def test_identity_at_start_and_kv_cache_generation(smear_keys):
    model = tiny_gpt(smear_keys=smear_keys)
    idx = tokens()
    with torch.no_grad():
        before = model(idx)[0]
    apply_llama_adapter(model, prompt_length=3)
    with torch.no_grad():
        assert torch.equal(model(idx)[0], before)  # every gate is zero: exactly the base
    assert all(
        torch.equal(ap.gate, torch.zeros(2)) for m in model.modules() for ap in [m] if isinstance(ap, AdaptedAttention)
    )
    open_gates(model)
    cached = model.generate(idx[:, :5], 20, temperature=0)
    recomputed = model.generate(idx[:, :5], 20, temperature=0, use_cache=False)
    assert torch.equal(cached, recomputed)
    disable_adapters(model)
    with torch.no_grad():
        assert torch.equal(model(idx)[0], before)


def test_parameter_count_and_gpt2_124m():
    model = apply_llama_adapter(tiny_gpt(), prompt_length=4, start_layer=1)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == llama_adapter_parameter_count(3, 2, 16, 4, 1) == 2 * 4 * 16 + 2 * 2
    with torch.device("meta"):
        gpt2 = apply_llama_adapter(GPT(GPTConfig()), prompt_length=10, start_layer=2)
    assert sum(p.numel() for p in gpt2.parameters() if p.requires_grad) == 76_920  # 10·10·768 + 10·12
    assert not isinstance(gpt2.transformer.h[1].attn, AdaptedAttention) and isinstance(
        gpt2.transformer.h[2].attn, AdaptedAttention
    )


def test_only_prompts_gates_and_head_move():
    torch.manual_seed(0)
    gpt = GPT(TINY)
    head = torch.nn.Linear(16, 2)
    model = torch.nn.ModuleDict(dict(gpt=gpt, head=head))
    apply_llama_adapter(model, prompt_length=3, trainable=("head",))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        n for n in dict(model.named_parameters()) if n.endswith((".attn.prompt", ".attn.gate")) or n.startswith("head.")
    }
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for step in range(3):  # the prompts get a gradient only once the gates are open (from the second step)
        F.cross_entropy(head(gpt.hidden_states(tokens())[:, -1]), torch.tensor([0, 1])).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert {n for n, p in model.named_parameters() if not torch.equal(p, before[n])} == trainable


def test_bad_arguments():
    model = tiny_gpt()
    for kwargs, match in (
        (dict(prompt_length=0), "prompt_length"),
        (dict(start_layer=3), "start_layer must be"),
        (dict(init_std=float("nan")), "init_std"),
        (dict(trainable=("nope",)), "names no module"),
    ):
        with pytest.raises(ValueError, match=match):
            apply_llama_adapter(model, **kwargs)
    assert not any(isinstance(block.attn, AdaptedAttention) for block in model.transformer.h)
    add_adapter(model, "a", "llama_adapter")
    with pytest.raises(ValueError, match="new, non-empty string.*'a'"):
        add_adapter(model, "a", "llama_adapter")
    with pytest.raises(ValueError, match="has an adapter already"):
        apply_llama_adapter(model)
    assert adapter_names(model) == ["a"]


def test_prompts_go_through_the_layers_own_projections():
    """The prompts' keys and values come from the attention's own k_proj and v_proj modules, whatever they are: on a
    4-bit base (QLoRA's) they are the paper's equations with the dequantized weights."""
    model, idx = quantize_model(tiny_gpt()), tokens()
    add_adapter(model, "prompts", "llama_adapter", prompt_length=4, start_layer=1)
    open_gates(model)
    dense = dequantize_model(copy.deepcopy(model))
    adapted = {i: (dense.transformer.h[i].attn.prompt, dense.transformer.h[i].attn.gate) for i in (1, 2)}
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], paper_forward(dense, idx, adapted), rtol=1e-5, atol=1e-5)


def test_save_load_and_switching_with_other_adapters_on_one_base(tmp_path):
    """LLaMA-Adapter, a Houlsby adapter and LoRA added one after another on one base: each switched on gives its own
    logits, the ones aside stay as they were, the file of one aside reloads it bit for bit on a fresh base, and deleting
    the adapter leaves the plain attention."""
    model = tiny_gpt()
    idx = tokens()
    with torch.no_grad():
        base = model(idx)[0]
    add_adapter(model, "prompts", "llama_adapter", prompt_length=3, start_layer=1)
    open_gates(model)
    prompts = {k: v.detach().clone() for k, v in adapter_tensors(model, "prompts").items()}
    add_adapter(model, "houlsby", "bottleneck", bottleneck=4)  # the projections keep their names under the prompts
    add_adapter(model, "lora", "lora", rank=2, alpha=4, targets="q,v")
    with torch.no_grad():
        for name in ("houlsby", "lora"):  # move the up-projections and B off zero, as training would
            for key, p in adapter_tensors(model, name).items():
                if ".adapter.up." in key or "lora_B" in key:
                    p.normal_(0, 0.1)
        outputs = [base]
        for name in ("prompts", "houlsby", "lora"):
            set_adapter(model, name)
            outputs.append(model(idx)[0])
        disable_adapters(model)
        assert torch.equal(model(idx)[0], base)
    assert all((a - b).abs().max() > 1e-3 for i, a in enumerate(outputs) for b in outputs[i + 1 :])  # four functions
    assert all(torch.equal(v, prompts[k]) for k, v in adapter_tensors(model, "prompts").items())
    set_adapter(model, "lora")
    assert any(p.requires_grad for p in model.parameters())  # LoRA's A and B train: they are LoRA's, not the prompts'
    save_adapter(model, tmp_path / "prompts", "prompts")
    from safetensors.torch import load_file

    assert load_file(tmp_path / "prompts" / "adapter_model.safetensors").keys() == prompts.keys()
    fresh = tiny_gpt()
    load_adapter(fresh, tmp_path / "prompts")
    with torch.no_grad():
        assert torch.equal(fresh(idx)[0], outputs[1])
    assert adapter_names(fresh) == ["prompts"]
    delete_adapter(fresh, "prompts")
    assert not any(isinstance(block.attn, AdaptedAttention) for block in fresh.transformer.h)
    with torch.no_grad():
        assert torch.equal(fresh(idx)[0], base)
