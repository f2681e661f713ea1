"""GPT.forward's loss, what train.py trains on, runs lm_head only where a target is: its loss and gradients are those of
F.cross_entropy over every position's logits; train.mean_token_loss averages over target tokens."""

import pytest
import torch
import torch.nn.functional as F

import train
from model import GPT, GPTConfig


def full_logits_loss(model, idx, targets, segment_ids=None):
    """The reference: every position's logits, then F.cross_entropy over those with a target."""
    logits = model(idx, segment_ids=segment_ids)[0]
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_loss_only_at_targets_has_the_same_loss_and_gradients(mode, device):
    """Half the positions without a target (a masked prompt and padding): GPT.forward skips them, and its loss and
    every gradient match those of every logit, then F.cross_entropy; scaling the loss afterwards (as gradient
    accumulation does) scales the gradients as before."""
    from lora import apply_lora
    from quantize import quantize_model

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=2, n_head=2, n_embd=32)).to(device)
    if mode == "qlora":
        quantize_model(model)
    if mode != "full":
        apply_lora(model, rank=4, alpha=8, targets="all-linear")
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # B = 0 would give A no gradient
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 257, (3, 20), generator=g)
    targets = torch.randint(0, 257, (3, 20), generator=g)
    targets[:, :10] = -100  # the prompt
    targets[2, 15:] = -100  # padding
    idx, targets = idx.to(device), targets.to(device)
    results = []
    for loss_fn in (lambda: model(idx, targets)[1], lambda: full_logits_loss(model, idx, targets)):
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        (loss * 0.25).backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (ours, our_grads), (reference, reference_grads) = results
    assert abs(ours.item() - reference.item()) <= 1e-5
    assert our_grads.keys() == reference_grads.keys() and len(our_grads) > 0
    bf16 = (
        device == "cuda" and mode == "qlora"
    )  # Linear4bit computes in bf16 on a GPU: gradients agree to its precision
    for name in our_grads:
        tolerance = 2e-2 * reference_grads[name].abs().max().item() if bf16 else 1e-5
        assert (our_grads[name] - reference_grads[name]).abs().max().item() <= tolerance, name
    assert model(idx, targets)[0] is None  # lm_head ran only at the positions with a target
    with torch.no_grad():  # evaluation
        assert abs(model(idx, targets)[1].item() - reference.item()) <= 1e-5


def test_loss_with_no_target_is_nan_like_the_full_logits_loss():
    model = GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=1, n_head=2, n_embd=16))
    idx = torch.randint(0, 257, (2, 8))
    assert (
        model(idx, torch.full((2, 8), -100))[1].isnan()
        and full_logits_loss(model, idx, torch.full((2, 8), -100)).isnan()
    )


def test_packed_rows_give_the_full_logits_loss(device):
    """segment_ids reach the trunk with targets too: packed rows, each example attending to itself only."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=2, n_head=2, n_embd=16, smear_keys=True)).to(device)
    idx, targets = torch.randint(0, 257, (2, 12)).to(device), torch.randint(0, 257, (2, 12)).to(device)
    segments = torch.tensor([[0] * 5 + [1] * 7, [0] * 12], device=device)
    reference = full_logits_loss(model, idx, targets, segments)
    assert abs(model(idx, targets, segment_ids=segments)[1].item() - reference.item()) <= 1e-5
    assert abs(model(idx, targets)[1].item() - reference.item()) > 1e-4  # packing changes the loss: the test sees it


def test_mean_token_loss_is_the_loss_per_target_token_over_batches():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=1, n_head=2, n_embd=16)).train()
    batches = [(torch.randint(0, 257, (2, 8)), torch.randint(0, 257, (2, 8))) for _ in range(3)]
    batches[1][1][:, :5] = -100  # fewer targets in this batch: the mean is over tokens, not batches
    with torch.no_grad():
        total = sum(model.eval()(x, y)[1].item() * (y != -100).sum().item() for x, y in batches)
    count = sum((y != -100).sum().item() for _, y in batches)
    assert train.mean_token_loss(model, batches, "cpu") == pytest.approx(total / count, abs=1e-5)
    assert model.training  # put back in training mode
    with pytest.raises(ValueError, match="no target tokens"):
        train.mean_token_loss(model, [(batches[0][0], torch.full((2, 8), -100))], "cpu")


def test_compiled_loss_equals_the_eager_loss_and_stops_compiling_whatever_the_number_of_targets():
    """train.py --compile compiles the model. The number of positions with a target changes from batch to batch; after
    the first two counts torch.compile must treat it as a dynamic size and compile no more, and the compiled loss and
    gradients are the eager ones. Traced by dynamo and AOT autograd (backend aot_eager): the tracing is where --compile
    breaks; inductor's code generation costs a minute of C++ on a CPU (benchmarks/gpu_check.py runs it on a GPU)."""
    from torch._dynamo.utils import counters

    from lora import apply_lora

    torch.manual_seed(0)
    model = apply_lora(
        GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=1, n_head=2, n_embd=16, smear_keys=True)), rank=2, alpha=4
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    graphs = []
    for masked in (5, 11, 2, 7, 9, 3):  # batches of one shape with six different numbers of targets
        idx, targets = torch.randint(0, 257, (2, 16)), torch.randint(0, 257, (2, 16))
        targets[:, :masked] = -100
        results = []
        for run in (compiled, model):
            model.zero_grad(set_to_none=True)
            loss = run(idx, targets)[1]
            loss.backward()
            results.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
        assert abs(results[0][0] - results[1][0]) <= 1e-6
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(results[0][1], results[1][1]))
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[-1]  # the third to sixth counts compiled nothing new
