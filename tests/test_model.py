"""model.py against Hugging Face's GPT2LMHeadModel, plus the KV cache, sampling, loading and its errors. The
comparisons with transformers use weights of std 0.2 (conftest.randomize_weights), where a wrong GELU, a wrong
attention scale or a missing LayerNorm weight is 1e-3 or more away, and the tolerance is 5e-5; the ones that matter on
a GPU run on every device present (the `device` fixture)."""

import copy

import pytest
import torch
from conftest import randomize_weights

import model as model_module
from model import GPT, GPTConfig, KVCache, count_parameters, sample_next_token

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random HF GPT-2 (3 layers, GPT-2's vocabulary, weights of std 0.2) saved as config.json + model.safetensors."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=3, n_head=4, n_embd=64, n_positions=128, vocab_size=50257)
    hf = randomize_weights(transformers.GPT2LMHeadModel(config).eval())
    directory = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(directory, safe_serialization=True)
    return str(directory), hf


def test_logits_and_loss_match_hf(hf_dir, device):
    directory, hf = hf_dir
    hf = copy.deepcopy(hf).to(device)
    ours = GPT.from_pretrained(directory).to(device).eval()
    idx = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        theirs = hf(idx, labels=idx)
        targets = torch.cat([idx[:, 1:], torch.full((2, 1), -100, device=device)], dim=1)  # HF shifts labels internally
        logits, loss = ours(idx)[0], ours(idx, targets)[1]
    assert logits.shape == (2, 40, 50257)
    assert theirs.logits.abs().max().item() > 5  # weights of std 0.2: logits far from zero, where errors show
    assert (logits - theirs.logits).abs().max().item() <= 5e-5
    assert abs(loss.item() - theirs.loss.item()) <= 5e-5


def test_greedy_generation_matches_hf_and_cache_matches_no_cache(hf_dir, device):
    directory, hf = hf_dir
    hf = copy.deepcopy(hf).to(device)
    ours = GPT.from_pretrained(directory).to(device).eval()
    prompt = torch.randint(0, 50257, (2, 7), generator=torch.Generator().manual_seed(2)).to(device)
    cached = ours.generate(prompt, 30, temperature=0)
    uncached = ours.generate(prompt, 30, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    theirs = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False, pad_token_id=0
    )
    assert torch.equal(cached, theirs)
    assert (
        len(set(cached[0, 7:].tolist())) > 3
    )  # a real continuation, not one token repeated (that any model could match)


def randomize_key_smear(model):
    """Smeared keys start at an even mix; random per-head mixes make the tests below see the mixing."""
    for block in model.transformer.h:
        if block.attn.key_smear is not None:
            torch.nn.init.normal_(block.attn.key_smear, std=2.0)


@pytest.mark.parametrize("smear_keys", [False, True])
def test_smeared_keys_mix_each_key_with_its_predecessor(smear_keys, device):
    torch.manual_seed(0)
    model = (
        GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16, smear_keys=smear_keys))
        .to(device)
        .eval()
    )
    randomize_key_smear(model)
    attn, seen = model.transformer.h[0].attn, {}
    attn.register_forward_hook(lambda module, args, out: seen.update(x=args[0]))
    idx = torch.randint(0, 50, (1, 6)).to(device)
    model(idx)
    k = attn.k_proj(seen["x"]).view(1, 6, 2, 8).transpose(1, 2)
    assert (attn.key_smear is not None) == smear_keys
    if smear_keys:
        a = torch.sigmoid(attn.key_smear).view(1, 2, 1, 1)
        expected = torch.cat([a * k[:, :, :1], a * k[:, :, 1:] + (1 - a) * k[:, :, :-1]], dim=2)
        starts = torch.zeros(1, 1, 6, 1, dtype=torch.bool, device=device)
        starts[:, :, 0] = True
        assert torch.allclose(attn.smear(k, starts), expected, atol=1e-6)


@pytest.mark.parametrize("smear_keys", [False, True])
def test_cache_chunked_prefill_equals_full_forward(smear_keys, device):
    torch.manual_seed(0)
    model = (
        GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=16, smear_keys=smear_keys))
        .to(device)
        .eval()
    )
    randomize_weights(model, seed=1)
    randomize_key_smear(model)
    idx = torch.randint(0, 50, (1, 20)).to(device)
    full, _ = model(idx)
    cache = KVCache(2)
    first, _ = model(idx[:, :8], kv_cache=cache)
    second, _ = model(idx[:, 8:15], kv_cache=cache)  # several new tokens after a cached prefix
    third, _ = model(idx[:, 15:16], kv_cache=cache)
    assert torch.allclose(torch.cat([first, second, third], dim=1), full[:, :16], atol=2e-5)


@pytest.mark.parametrize("smear_keys", [False, True])
def test_cached_generation_past_block_size_equals_uncached(smear_keys, device):
    torch.manual_seed(0)
    model = (
        GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16, smear_keys=smear_keys))
        .to(device)
        .eval()
    )
    randomize_weights(model, seed=1)
    randomize_key_smear(model)
    prompt = torch.randint(0, 50, (1, 10)).to(device)
    assert torch.equal(
        model.generate(prompt, 20, temperature=0), model.generate(prompt, 20, temperature=0, use_cache=False)
    )
    # greedy decoding of a random model soon repeats one token; sampling (the same random numbers for both) does not
    sampled = [
        model.generate(prompt, 20, use_cache=cache, generator=torch.Generator(device).manual_seed(3))
        for cache in (True, False)
    ]
    assert torch.equal(sampled[0], sampled[1]) and len(set(sampled[0][0, 10:].tolist())) > 5


def test_generation_stops_at_eos():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=20, n_layer=1, n_head=2, n_embd=16)).eval()
    prompt = torch.zeros((1, 3), dtype=torch.long)
    greedy = model.generate(prompt, 10, temperature=0)
    eos = greedy[0, 5].item()  # whatever the model emits third becomes the stop token
    stopped = model.generate(prompt, 10, temperature=0, eos_token_id=eos)
    first_eos = (greedy[0, 3:] == eos).nonzero()[0].item() + 3
    assert stopped.size(1) == first_eos + 1 and stopped[0, -1].item() == eos


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [
        (1.0, None, None),
        (0.7, None, None),
        (1.6, None, None),
        (1.0, 20, None),
        (0.8, None, 0.9),
        (1.3, 50, 0.5),
        (1.0, None, 0.05),
    ],
)
def test_sampling_distribution_matches_hf_warpers(temperature, top_k, top_p, monkeypatch):
    """The distribution sample_next_token draws from equals the one transformers' temperature, top-k and top-p warpers
    (applied in generate's order) leave, token by token, on logits spread like a language model's."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = 3 * torch.randn(4, 300, generator=torch.Generator().manual_seed(0))
    drawn_from = []
    monkeypatch.setattr(
        torch,
        "multinomial",
        lambda probs, num_samples, generator=None: drawn_from.append(probs) or probs.argmax(-1, keepdim=True),
    )
    sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(None, scores)
    expected = scores.softmax(-1)
    assert (drawn_from[0] - expected).abs().max().item() <= 1e-6
    kept = (expected > 0).sum(-1)
    if top_k is None and top_p is None:
        assert bool((kept == 300).all())
    elif top_p is not None:
        assert bool((kept < (top_k or 300)).all()) and bool((kept >= 1).all())  # the nucleus cut something


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    assert sample_next_token(logits, temperature=0).item() == 1
    g = torch.Generator().manual_seed(0)
    drawn = {sample_next_token(logits, top_k=2, generator=g).item() for _ in range(200)}
    assert drawn == {1, 3}
    # probabilities ~ [.03, .64, .09, .23, .01]: top_p=0.8 keeps tokens 1 and 3 (0.64 < 0.8 <= 0.87)
    drawn = {sample_next_token(logits, top_p=0.8, generator=g).item() for _ in range(200)}
    assert drawn == {1, 3}
    assert {sample_next_token(logits, top_p=0.01, generator=g).item() for _ in range(50)} == {1}


def test_too_long_sequence_is_a_clear_error():
    model = GPT(GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="longer than block_size=8"):
        model(torch.zeros((1, 9), dtype=torch.long))


def test_weight_tying_and_parameter_count():
    model = GPT(GPTConfig())  # GPT-2 124M
    assert model.lm_head.weight is model.transformer.wte.weight
    assert count_parameters(model) == (124_439_808, 124_439_808)  # the tied lm_head counted once, as wte


@pytest.mark.parametrize("smear_keys", [False, True])
def test_packed_rows_compute_each_example_as_if_alone(smear_keys, device):
    """segment_ids: restarting positions and a block-diagonal causal mask give each packed example its own logits
    (with smeared keys, an example's first key is not mixed with the previous example's last)."""
    torch.manual_seed(0)
    model = (
        GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=2, n_head=2, n_embd=16, smear_keys=smear_keys))
        .to(device)
        .eval()
    )
    randomize_weights(model, seed=1)
    randomize_key_smear(model)
    a, b = torch.randint(0, 257, (1, 7)).to(device), torch.randint(0, 257, (1, 5)).to(device)
    packed = torch.cat(
        [a, b, torch.zeros(1, 3, dtype=torch.long, device=device)], dim=1
    )  # two examples, then 3 padding positions
    segments = torch.tensor([[0] * 7 + [1] * 5 + [2] * 3], device=device)
    with torch.no_grad():
        logits = model(packed, segment_ids=segments)[0]
        assert (logits[:, :7] - model(a)[0]).abs().max().item() <= 2e-5
        assert (logits[:, 7:12] - model(b)[0]).abs().max().item() <= 2e-5
        assert (model(packed)[0][:, 7:12] - model(b)[0]).abs().max().item() > 1e-2  # without segments b would see a
    positions, mask = model_module.segment_positions_and_mask(segments)
    assert positions.tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 0, 1, 2]]
    assert mask.shape == (1, 1, 15, 15) and mask[0, 0, 8, 6].item() is False and mask[0, 0, 8, 7].item() is True


@pytest.mark.parametrize("smear_keys", [False, True])
def test_left_padded_prompts_generate_as_if_alone(smear_keys, device):
    """Prompts of different lengths in one batch (support.answers.answer_examples): the filler before a short
    prompt is a segment of its own, so the prompt's positions start at 0 and nothing attends to the filler, in the
    prefill, in each cached step, and after the window slides past block_size."""
    torch.manual_seed(0)
    model = (
        GPT(GPTConfig(block_size=24, vocab_size=50, n_layer=2, n_head=2, n_embd=16, smear_keys=smear_keys))
        .to(device)
        .eval()
    )
    randomize_weights(model, seed=1)
    randomize_key_smear(model)
    prompts = [torch.randint(0, 50, (n,)).to(device) for n in (3, 9, 6)]
    padding = torch.tensor([6, 0, 3], device=device)
    rows = torch.stack([torch.cat([torch.full((int(pad),), 7, device=device), p]) for p, pad in zip(prompts, padding)])
    segment_ids = (torch.arange(9, device=device) >= padding[:, None]).long()
    with torch.no_grad():
        cache = KVCache(2)
        prefill = model.hidden_states(rows, kv_cache=cache, segment_ids=segment_ids)
        step = torch.randint(0, 50, (3, 1)).to(device)
        cached = model.hidden_states(
            step, kv_cache=cache, segment_ids=torch.cat([segment_ids, torch.ones_like(step)], 1)
        )
        for p, pad, new, hidden, following in zip(prompts, padding, step, prefill, cached):
            alone = model.hidden_states(torch.cat([p, new])[None])[0]
            assert (hidden[pad:] - alone[:-1]).abs().max().item() <= 2e-5
            assert (following[0] - alone[-1]).abs().max().item() <= 2e-5
    out = model.generate(rows, 20, temperature=0, left_padding=padding)  # 9 + 20 > 24: the longest row's window slides
    for p, row in zip(prompts, out):
        assert torch.equal(row[9:], model.generate(p[None], 20, temperature=0)[0, len(p) :])
    with pytest.raises(
        ValueError, match=r"segment_ids has shape \(3, 9\); it names every position, the 10 cached ones too: \(3, 11\)"
    ):
        model.hidden_states(step, kv_cache=cache, segment_ids=segment_ids)


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_gradient_checkpointing_gives_the_same_gradients(mode, device):
    from lora import apply_lora
    from quantize import quantize_model

    def gradients(checkpointing):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=3, n_head=2, n_embd=32, dropout=0.1)).to(device)
        if mode == "qlora":
            quantize_model(model)
        if mode != "full":
            apply_lora(model, rank=4, alpha=8, targets="all-linear", dropout=0.1)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.1)  # B = 0 would give A no gradient
        model.gradient_checkpointing = checkpointing
        idx = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(1)).to(device)
        torch.manual_seed(2)  # same dropout masks in both runs (checkpointing replays them in the recomputation)
        model(idx, idx)[1].backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], rtol=0, atol=1e-6), name
