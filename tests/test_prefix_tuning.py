"""prefix_tuning.py: equal to HF peft's prefix tuning on GPT2LMHeadModel (direct and reparameterised), the KV-cache
path, freezing, errors, adapter files, baking the MLP away."""

import copy

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, KVCache, hf_to_ours
from other_methods.prefix_tuning import (
    PrefixTuning,
    activations_of_tokens,
    apply_prefix_tuning,
    prefix_of,
    prefix_parameter_count,
)
from support.adapters import (
    adapter_names,
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


@pytest.fixture(scope="module")
def hf_and_ours():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=3, n_head=4, n_embd=32, n_positions=64, vocab_size=100)
    hf = transformers.GPT2LMHeadModel(config).eval()
    ours = GPT(GPTConfig(block_size=64, vocab_size=100, n_layer=3, n_head=4, n_embd=32))
    load_weights(ours, hf_to_ours(hf.state_dict(), 3))
    return hf, ours.eval()


@pytest.mark.parametrize("reparameterize", [False, True])
def test_equals_peft_prefix_tuning(hf_and_ours, reparameterize):
    peft = pytest.importorskip("peft")
    hf, ours = hf_and_ours
    P, hidden = 5, 24
    config = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=reparameterize, encoder_hidden_size=hidden
    )
    theirs = peft.get_peft_model(copy.deepcopy(hf), config).eval()
    encoder = theirs.prompt_encoder["default"]
    ours = apply_prefix_tuning(
        copy.deepcopy(ours), num_virtual_tokens=P, reparameterize=reparameterize, hidden_size=hidden
    )
    with torch.no_grad():  # the same prefix values on both sides
        if reparameterize:
            mlp = prefix_of(ours).reparameterization
            mlp.embedding.copy_(encoder.embedding.weight)
            for i in (0, 2):
                mlp.mlp[i].weight.copy_(encoder.transform[i].weight)
                mlp.mlp[i].bias.copy_(encoder.transform[i].bias)
        else:  # peft's row per virtual token is n_layer x (key, value) x n_embd, layer-major: our (P, L, 2, d)
            prefix_of(ours).prefix.copy_(encoder.embedding.weight.view(P, 3, 2, 32))
    idx = tokens(vocab=100, length=20)
    with torch.no_grad():
        expected = theirs(input_ids=idx).logits
        logits, _ = ours(idx)
        base_logits = hf(input_ids=idx).logits
    assert (logits - expected).abs().max().item() <= 1e-5
    assert (
        logits - base_logits
    ).abs().max().item() > 1e-2  # the prefix changed the output, so equality means something
    # with an attention mask over right padding, as in a padded batch
    mask = torch.ones_like(idx)
    mask[0, 15:] = 0
    with torch.no_grad():
        expected = theirs(input_ids=idx, attention_mask=mask).logits
    assert (logits[0, :15] - expected[0, :15]).abs().max().item() <= 1e-5
    assert (logits[1] - expected[1]).abs().max().item() <= 1e-5


def test_prefix_is_the_keys_and_values_of_virtual_tokens():
    """A prefix set to the model's own activations for some tokens gives what the model gives on those tokens
    followed by the input: the prefix really is a learned KV cache."""
    model = tiny_gpt()
    context, idx = [5, 9, 2, 31], tokens(batch=1, length=6)
    apply_prefix_tuning(model, num_virtual_tokens=4, init_token_ids=context)
    with torch.no_grad():
        logits, _ = model(idx)
        disable_adapters(model)
        full, _ = model(torch.cat([torch.tensor([context]), idx], dim=1))
    torch.testing.assert_close(logits, full[:, 4:], rtol=1e-5, atol=1e-5)


def test_generation_with_and_without_cache_agree():
    model = apply_prefix_tuning(tiny_gpt(), num_virtual_tokens=3)
    idx = tokens(batch=1, length=5)
    cached = model.generate(idx, 8, temperature=0)
    uncached = model.generate(idx, 8, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    with (
        torch.no_grad()
    ):  # and the prefix is in the cache's first step: the first new token's logits are the prefixed ones
        expected = model(idx)[0][:, -1]
    cache_logits = model.lm_head(model.hidden_states(idx, kv_cache=KVCache(TINY.n_layer))[:, -1])
    torch.testing.assert_close(cache_logits, expected)


def test_parameter_count_and_only_prefix_trains():
    torch.manual_seed(0)
    model = apply_prefix_tuning(tiny_gpt(), num_virtual_tokens=4)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert list(trainable) == ["transformer.wpe.prefix.prefix"]
    assert trainable["transformer.wpe.prefix.prefix"].numel() == prefix_parameter_count(4, 2, 32) == 4 * 2 * 2 * 32
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    idx = tokens()
    model(idx, idx)[1].backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"transformer.wpe.prefix.prefix"}
    model2 = apply_prefix_tuning(tiny_gpt(), num_virtual_tokens=4, reparameterize=True, hidden_size=16)
    n = sum(p.numel() for p in model2.parameters() if p.requires_grad)
    assert n == prefix_parameter_count(4, 2, 32, reparameterize=True, hidden_size=16) == 4 * 32 + 33 * 16 + 17 * 128


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_virtual_tokens=0), "num_virtual_tokens must be a positive integer"),
        (dict(num_virtual_tokens=-2), "num_virtual_tokens must be a positive integer"),
        (dict(num_virtual_tokens=32), "leave no room"),
        (dict(reparameterize=True, hidden_size=0), "hidden_size"),
        (dict(num_virtual_tokens=3, init_token_ids=[1, 2]), "one per token"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = tiny_gpt()
    with pytest.raises(ValueError, match=match):
        apply_prefix_tuning(model, **kwargs)
    assert prefix_of(model) is None and not adapter_names(model)


def test_applying_twice_and_context_length():
    model = apply_prefix_tuning(tiny_gpt(), num_virtual_tokens=4)
    with pytest.raises(ValueError, match="has an adapter already"):
        apply_prefix_tuning(model, num_virtual_tokens=4)
    with pytest.raises(ValueError, match="new, non-empty string.*'default'"):
        add_adapter(model, "default", "prefix", num_virtual_tokens=4)
    with pytest.raises(ValueError, match="longer than block_size"):  # 4 virtual + 30 real > 32 positions
        model(tokens(length=30))


def test_save_load_bit_exact_and_switching(tmp_path):
    model, idx = add_adapter(tiny_gpt(), "a", "prefix", num_virtual_tokens=4), tokens()
    prefix_a = prefix_of(model)
    logits_a = model(idx)[0]
    add_adapter(model, "b", "prefix", num_virtual_tokens=2, reparameterize=True, hidden_size=8)
    assert prefix_of(model) is not prefix_a and not prefix_a.prefix.requires_grad  # a is aside, and frozen
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        n for n, _ in model.named_parameters() if n.startswith("transformer.wpe.prefix.reparameterization.")
    }
    with torch.no_grad():  # b trains: a's prefix must not follow
        for p in prefix_of(model).parameters():
            p.add_(0.1 * torch.randn_like(p))
    logits_b = model(idx)[0]
    set_adapter(model, "a")
    assert prefix_of(model) is prefix_a and torch.equal(model(idx)[0], logits_a)
    assert not torch.equal(logits_a, logits_b)
    save_adapter(model, tmp_path / "a", "a")
    save_adapter(model, tmp_path / "b", "b")
    fresh = tiny_gpt()
    load_adapter(fresh, tmp_path / "b")
    assert torch.equal(fresh(idx)[0], logits_b)
    load_adapter(fresh, tmp_path / "a")
    assert torch.equal(fresh(idx)[0], logits_a)
    assert adapter_names(fresh) == ["b", "a"]
    delete_adapter(fresh, "a")
    delete_adapter(fresh, "b")
    assert prefix_of(fresh) is None and torch.equal(fresh(idx)[0], tiny_gpt()(idx)[0])  # back to the plain model


def test_bake_prefix_keeps_the_output(tmp_path):
    model = apply_prefix_tuning(tiny_gpt(), num_virtual_tokens=3, reparameterize=True, hidden_size=8)
    idx = tokens()
    with torch.no_grad():
        before = model(idx)[0]
        prefix_of(model).bake_prefix()
        after = model(idx)[0]
    assert torch.equal(before, after)
    assert isinstance(prefix_of(model), PrefixTuning) and prefix_of(model).reparameterization is None
    assert [n for n, _ in model.named_parameters() if n.startswith("transformer.wpe.prefix.")] == [
        "transformer.wpe.prefix.prefix"
    ]
    with pytest.raises(ValueError, match="no reparameterisation"):
        prefix_of(model).bake_prefix()
    save_adapter(model, tmp_path)  # only the baked prefix is kept, and it rebuilds as a direct one
    fresh = load_adapter(tiny_gpt(), tmp_path)
    assert prefix_of(fresh).reparameterization is None and torch.equal(fresh(idx)[0], before)


def test_activations_of_tokens_shape_and_values():
    model = tiny_gpt()
    kv = activations_of_tokens(model, [1, 2, 3])
    assert kv.shape == (3, TINY.n_layer, 2, TINY.n_embd)
    k0 = model.transformer.h[0].attn.k_proj(
        model.transformer.h[0].ln_1(
            model.transformer.wte(torch.tensor([1, 2, 3])) + model.transformer.wpe(torch.arange(3))
        )
    )
    torch.testing.assert_close(kv[:, 0, 0], k0, rtol=1e-5, atol=1e-6)
    assert F.mse_loss(kv[:, 1, 1], kv[:, 0, 1]) > 0
