"""support/loss.py: LossAtTargets, what train.py trains through, computes GPT.forward's loss and gradients while
skipping the positions without a target and chunking the output layer; mean_token_loss averages over target tokens."""
import pytest
import torch

from model import GPT, GPTConfig
from support import loss as L


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
@pytest.mark.parametrize("chunk_elements", [L.LOSS_CHUNK_ELEMENTS, 3 * 257])  # one chunk; chunks of 3 rows
def test_loss_only_at_targets_has_the_same_loss_and_gradients(mode, chunk_elements, monkeypatch, device):
    """Half the positions without a target (a masked prompt and padding): LossAtTargets skips them and runs the output
    layer in chunks, and its loss and every gradient match GPT.forward's (every logit, then F.cross_entropy); scaling
    the loss afterwards (as gradient accumulation does) scales the gradients as before."""
    from lora import apply_lora
    from quantize import quantize_model

    monkeypatch.setattr(L, "LOSS_CHUNK_ELEMENTS", chunk_elements)
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
    for loss_fn in (lambda: L.LossAtTargets(model)(idx, targets), lambda: model(idx, targets)[1]):
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        (loss * 0.25).backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (ours, our_grads), (reference, reference_grads) = results
    assert abs(ours.item() - reference.item()) <= 1e-5
    assert our_grads.keys() == reference_grads.keys() and len(our_grads) > 0
    bf16 = device == "cuda" and mode == "qlora"  # Linear4bit computes in bf16 on a GPU: gradients agree to its precision
    for name in our_grads:
        tolerance = 2e-2 * reference_grads[name].abs().max().item() if bf16 else 1e-5
        assert (our_grads[name] - reference_grads[name]).abs().max().item() <= tolerance, name
    with torch.no_grad():  # evaluation takes the gradient-free path
        assert abs(L.LossAtTargets(model)(idx, targets).item() - reference.item()) <= 1e-5


def test_loss_with_no_target_is_nan_like_the_models():
    model = GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=1, n_head=2, n_embd=16))
    idx = torch.randint(0, 257, (2, 8))
    assert L.LossAtTargets(model)(idx, torch.full((2, 8), -100)).isnan() and model(idx, torch.full((2, 8), -100))[1].isnan()


def test_packed_rows_give_the_models_loss(device):
    """segment_ids pass through to the model: packed rows, each example attending to itself only."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=2, n_head=2, n_embd=16, smear_keys=True)).to(device)
    idx, targets = torch.randint(0, 257, (2, 12)).to(device), torch.randint(0, 257, (2, 12)).to(device)
    segments = torch.tensor([[0] * 5 + [1] * 7, [0] * 12], device=device)
    reference = model(idx, targets, segment_ids=segments)[1]
    assert abs(L.LossAtTargets(model)(idx, targets, segments).item() - reference.item()) <= 1e-5
    assert abs(model(idx, targets)[1].item() - reference.item()) > 1e-4  # packing changes the loss: the test sees it


def test_mean_token_loss_is_the_loss_per_target_token_over_batches():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=1, n_head=2, n_embd=16)).train()
    batches = [(torch.randint(0, 257, (2, 8)), torch.randint(0, 257, (2, 8))) for _ in range(3)]
    batches[1][1][:, :5] = -100  # fewer targets in this batch: the mean is over tokens, not batches
    with torch.no_grad():
        total = sum(model.eval()(x, y)[1].item() * (y != -100).sum().item() for x, y in batches)
    count = sum((y != -100).sum().item() for _, y in batches)
    assert L.mean_token_loss(model, batches, "cpu") == pytest.approx(total / count, abs=1e-5)
    assert model.training  # put back in training mode
    with pytest.raises(ValueError, match="no target tokens"):
        L.mean_token_loss(model, [(batches[0][0], torch.full((2, 8), -100))], "cpu")


def test_compiled_loss_equals_the_eager_loss_and_compiles_once_whatever_the_number_of_targets():
    """train.py --compile compiles LossAtTargets. The number of positions with a target changes from batch to batch;
    torch.compile must not compile again for each (the loss at the targets runs eagerly, cross_entropy_at_targets),
    and the compiled loss and gradients are the eager ones. Traced by dynamo and AOT autograd (backend aot_eager): the
    tracing is where --compile breaks; inductor's code generation costs a minute of C++ on a CPU (benchmarks/gpu_check.py
    runs it on a GPU)."""
    from torch._dynamo.utils import counters

    from lora import apply_lora

    torch.manual_seed(0)
    model = apply_lora(GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=1, n_head=2, n_embd=16, smear_keys=True)), rank=2, alpha=4)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(L.LossAtTargets(model), backend="aot_eager")
    for masked in (5, 11, 2):  # 3 batches of one shape with 3 different numbers of targets
        idx, targets = torch.randint(0, 257, (2, 16)), torch.randint(0, 257, (2, 16))
        targets[:, :masked] = -100
        results = []
        for loss_model in (compiled, L.LossAtTargets(model)):
            model.zero_grad(set_to_none=True)
            loss = loss_model(idx, targets)
            loss.backward()
            results.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
        assert abs(results[0][0] - results[1][0]) <= 1e-6
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(results[0][1], results[1][1]))
    assert counters["stats"]["unique_graphs"] == 1  # one graph, the trunk, compiled once
