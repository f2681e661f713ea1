"""classifier.py: the loader reads the real format, the head reads the last real token, and each mode trains exactly
what it claims."""
import os
import zipfile
from collections import Counter

import pytest
import torch

import classifier
from conftest import shared_data
from model import GPT, GPTConfig, count_parameters
from quantize import Linear4bit


def tiny_gpt(seed=0, block_size=128):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=257, n_layer=2, n_head=2, n_embd=32))


def write(tmp_path, text, name="sms.tsv"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return str(path)


# ---------------------------------------------------------------------------------------------- the loader


def test_reads_the_collection_format_header_tabs_in_text_and_unicode(tmp_path):
    text = ("Label\tSMS\r\n"
            "ham\tOk lar... Joking wif u oni...\r\n"
            "spam\tWINNER!! £900 prize\tcall 09061701461 now\r\n"  # a tab inside the message stays in it
            "ham\tZoë says 👋 &lt;#&gt; see you at the café\r\n"
            "\n")
    messages = classifier.read_sms_file(write(tmp_path, text))
    assert messages == [
        classifier.Message("Ok lar... Joking wif u oni...", 0),
        classifier.Message("WINNER!! £900 prize\tcall 09061701461 now", 1),
        classifier.Message("Zoë says 👋 &lt;#&gt; see you at the café", 0),
    ]


def test_reads_the_uci_file_which_has_no_header(tmp_path):
    messages = classifier.read_sms_file(write(tmp_path, "ham\tGo until jurong point\nspam\tFree entry in 2 a wkly comp"))
    assert [m.label for m in messages] == [0, 1] and messages[0].text == "Go until jurong point"


@pytest.mark.parametrize("content, problem", [
    ("", "holds no messages"),
    ("Label\tSMS\n\n", "holds no messages"),
    ("ham\tfine\nSpam\tWIN NOW\n", "line 2 .* label 'Spam'.*'ham' or 'spam'"),
    ("ham\tfine\nneutral\tok\n", "line 2 .* label 'neutral'"),
    ("ham fine, no tab here\n", "line 1 .* no tab"),
    ("ham\tfine\nspam\t   \n", "line 2 .* empty message"),
    (b"ham\tfine\nspam\tcaf\xe9 prize\n", "line 2 .* not valid UTF-8"),
])
def test_bad_files_are_clear_errors(tmp_path, content, problem):
    with pytest.raises(ValueError, match=problem):
        classifier.read_sms_file(write(tmp_path, content))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data_path"):
        classifier.read_sms_file(str(tmp_path / "nope.tsv"))


def test_real_collection_balanced_and_split_like_the_published_run():
    messages = classifier.read_sms_file(shared_data("sms_spam_collection.tsv"))
    assert len(messages) == 5574
    assert sum(m.label == 0 for m in messages) == 4827 and sum(m.label == 1 for m in messages) == 747
    assert max(len(m.text.encode("utf-8")) for m in messages) > 512  # some are longer than the tiny base's block
    balanced = classifier.balance_classes(messages)
    assert sum(m.label == 0 for m in balanced) == sum(m.label == 1 for m in balanced) == 747
    ham = Counter(m for m in messages if m.label == 0)
    assert not Counter(m for m in balanced if m.label == 0) - ham  # a sample of the ham, no message drawn twice
    spam = [m for m in messages if m.label == 1]
    assert [m for m in balanced if m.label == 1] == spam  # every spam message is kept, in order
    train, val, test = classifier.split_messages(balanced)
    assert (len(train), len(val), len(test)) == (1045, 149, 300)  # the book's 70/10/20 of 1,494
    assert sorted(train + val + test) == sorted(balanced)
    assert classifier.split_messages(classifier.balance_classes(messages)) == (train, val, test)  # fixed seed: the same split every time


def test_embedded_sample_loads_balanced():
    messages = classifier.load_messages()
    assert len(messages) == 600 and sum(m.label for m in messages) == 300
    train, val, test = classifier.split_messages(classifier.balance_classes(messages))
    assert (len(train), len(val), len(test)) == (420, 60, 120)


def test_balancing_undersamples_the_larger_class_and_needs_both():
    messages = [classifier.Message(f"ham {i}", 0) for i in range(30)] + [classifier.Message(f"spam {i}", 1) for i in range(10)]
    balanced = classifier.balance_classes(messages, seed=1)
    assert sum(m.label == 0 for m in balanced) == 10 and sum(m.label == 1 for m in balanced) == 10
    assert balanced != classifier.balance_classes(messages, seed=2)  # the seed picks which ham stay
    with pytest.raises(ValueError, match="0 spam.*both classes"):
        classifier.balance_classes(messages[:30])


def test_uci_download_is_extracted_from_the_zip(tmp_path, monkeypatch):
    payload = "ham\tI'm gonna be home soon\nspam\tURGENT! You have won a 1 week FREE membership\n"

    def fake_download(url, path):  # stands in for the network: writes the zip UCI serves
        assert url == classifier.UCI_URL
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("readme", "SMS Spam Collection v.1")
            archive.writestr("SMSSpamCollection", payload)
        return path

    monkeypatch.setattr(classifier, "download_file", fake_download)
    path = classifier.download_sms_collection(str(tmp_path / "downloads"))
    assert os.path.basename(path) == "SMSSpamCollection"
    assert [m.label for m in classifier.read_sms_file(path)] == [0, 1]


def test_failed_or_broken_downloads_are_clear_errors(tmp_path, monkeypatch):
    import urllib.error

    def offline(url, path):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(classifier, "download_file", offline)
    with pytest.raises(ConnectionError, match="--data_path"):
        classifier.download_sms_collection(str(tmp_path / "a"))

    def not_a_zip(url, path):
        open(path, "w").write("<html>maintenance</html>")
        return path

    monkeypatch.setattr(classifier, "download_file", not_a_zip)
    with pytest.raises(ValueError, match="not a valid zip"):
        classifier.download_sms_collection(str(tmp_path / "b"))


def test_encoding_truncates_keeping_the_start_and_counts():
    from tokenizer import get_tokenizer

    rows, truncated = classifier.encode_messages([classifier.Message("abcdef", 1), classifier.Message("ab", 0)], get_tokenizer("bytes"), 4)
    assert rows == [(list(b"abcd"), 1), (list(b"ab"), 0)] and truncated == 1


# ---------------------------------------------------------------------------------------------- the model


def test_head_reads_the_last_real_token_whatever_the_padding():
    model = classifier.GPTClassifier(tiny_gpt()).eval()
    messages = [list(b"see u at 6"), list(b"WIN a \xc2\xa31000 prize, call now!"), list(b"ok")]
    alone = torch.cat([model(torch.tensor([ids])) for ids in messages])  # no padding at all
    rows = [(ids, 0) for ids in messages]
    x, lengths, _ = classifier.collate_messages(rows, pad_id=256)
    with torch.no_grad():
        batched = model(x, lengths)
        extra = torch.cat([x, torch.randint(0, 257, (x.size(0), 17))], dim=1)  # more padding, and not even pad ids
        padded_more = model(extra, lengths)
        naive = model(extra)  # reading the final position instead: what padding would break
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded_more, alone, atol=1e-5, rtol=1e-5)
    assert torch.equal(padded_more.argmax(-1), alone.argmax(-1))
    assert not torch.allclose(naive, alone, atol=1e-3)
    with pytest.raises(ValueError, match="lengths"):
        model(x, torch.tensor([0, 1, 2]))


def expected_trainable(name, mode, n_layer):
    if mode == "full" or name.startswith("head."):
        return True
    if mode == "head":
        return False
    if mode == "last_block":
        return name.startswith(f"gpt.transformer.h.{n_layer - 1}.") or name.startswith("gpt.transformer.ln_f.")
    return ".lora_A." in name or ".lora_B." in name  # lora and qlora


@pytest.mark.parametrize("mode", classifier.MODES)
def test_each_mode_trains_exactly_what_it_claims(mode):
    model = classifier.build_classifier(tiny_gpt(), mode, lora_rank=4, lora_alpha=8, lora_targets=("q", "v", "mlp_in"))
    n_layer = model.gpt.config.n_layer
    claimed = {n for n, p in model.named_parameters() if expected_trainable(n, mode, n_layer)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == claimed
    if mode == "qlora":
        assert isinstance(model.gpt.transformer.h[0].attn.q_proj.base, Linear4bit)  # the base is 4-bit
        assert isinstance(model.gpt.transformer.h[0].attn.k_proj, Linear4bit)  # not a target: 4-bit, no LoRA
        assert isinstance(model.head, torch.nn.Linear)  # the head is not quantized
    before = {n: t.clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    x, lengths, y = classifier.collate_messages([(list(b"free prize now"), 1), (list(b"home by 6"), 0)], pad_id=256)
    model.train()
    for _ in range(2):  # two steps: LoRA's A gets no gradient until B has moved away from 0
        torch.nn.functional.cross_entropy(model(x, lengths), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, t in [*model.named_parameters(), *model.named_buffers()] if not torch.equal(t, before[n])}
    assert changed == claimed


def test_parameter_counts_on_the_tiny_base_config():
    """The numbers quoted in the notebook: 4 layers, 256 wide, 4 heads, block 512, byte vocabulary."""
    config = GPTConfig(block_size=512, vocab_size=257, n_layer=4, n_head=4, n_embd=256)
    block = 2 * 512 + 4 * (256 * 256 + 256) + (256 * 1024 + 1024) + (1024 * 256 + 256)
    total = 257 * 256 + 512 * 256 + 4 * block + 512 + (256 * 2 + 2)
    expected = {"head": 514, "last_block": block + 512 + 514, "lora": 4 * 16 * (6 * 256 + 4 * 256 + 2 * 1024) + 514, "full": total}
    for mode, trainable in expected.items():
        torch.manual_seed(0)
        counts = count_parameters(classifier.build_classifier(GPT(config), mode, lora_rank=16, lora_targets=("all-linear",)))
        assert counts == (trainable, total + (trainable - 514 if mode == "lora" else 0)), mode
    assert (expected["last_block"], expected["lora"], total) == (790_786, 295_426, 3_356_930)


@pytest.mark.parametrize("mode", classifier.MODES)
def test_frozen_blocks_are_the_ones_below_everything_that_trains(mode):
    model = classifier.build_classifier(tiny_gpt(), mode, lora_rank=4, lora_alpha=8)
    assert model.frozen_blocks() == {"head": 2, "last_block": 1}.get(mode, 0)
    dropout = classifier.build_classifier(GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=2, n_head=2, n_embd=32, dropout=0.1)), mode)
    assert dropout.frozen_blocks() == 0  # random outputs cannot be computed once


@pytest.mark.parametrize("mode", ["head", "last_block"])
def test_cached_trunk_gives_the_same_logits_and_gradients(mode):
    """Training on cache_trunk's activations (and running the last block at the last position only) computes what
    the whole model computes on the token ids: the same logits, loss and gradients, whatever the padding."""
    model = classifier.build_classifier(tiny_gpt(), mode)
    model.gpt.transformer.h[-1].mlp.fc_out.weight.data.normal_(std=0.1)  # make the last block matter
    messages = [list(b"see u at 6"), list(b"WIN a \xc2\xa31000 prize, call now!"), list(b"ok"), list(b"free entry in 2 a wkly comp")]
    rows = [(ids, i % 2) for i, ids in enumerate(messages)]
    n = model.frozen_blocks()
    cached = classifier.cache_trunk(model, rows, n, batch_size=3, pad_id=256, device="cpu")
    assert [tuple(a.shape) for a, _ in cached] == [(len(ids), 32) for ids in messages] and [y for _, y in cached] == [0, 1, 0, 1]
    results = []
    model.train()
    for x, lengths, y, from_block in (classifier.collate_messages(rows, 256) + (0,), classifier.collate_activations(cached) + (n,)):
        model.zero_grad(set_to_none=True)
        logits = model(x, lengths, from_block=from_block)
        torch.nn.functional.cross_entropy(logits, y).backward()
        results.append((logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}))
    (plain, plain_grads), (fast, fast_grads) = results
    assert (plain - fast).abs().max().item() <= 1e-5
    assert plain_grads.keys() == fast_grads.keys() and len(plain_grads) > 1
    for name in plain_grads:
        assert (plain_grads[name] - fast_grads[name]).abs().max().item() <= 1e-5, name
