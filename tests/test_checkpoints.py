"""support/checkpoints.py: an interrupted pretraining of the tiny base is finished by train.py in a child process (with
the settings it was started with), and a finished one is loaded as it is; GPT-2 downloads (offline, from file URLs)
and HF folders are checked before anything loads; a wrong tensor is named."""

import csv
import os

import pytest
import torch

import train
from model import GPT, GPTConfig
from support import checkpoints
from support.files import UserError
from train import TrainConfig, resolve_defaults


def test_an_interrupted_tiny_base_is_finished_by_train_py_then_loaded(tmp_path, monkeypatch, crash_after_checkpoint):
    base_dir = tmp_path / "tiny-base"
    settings = dict(
        init_from="scratch",
        dataset="stdlib",
        out_dir=str(base_dir),
        n_layer=1,
        n_head=2,
        n_embd=16,
        block_size=32,
        batch_size=4,
        max_iters=4,
        eval_interval=2,
        eval_batches=1,
        progress=False,
        device="cpu",
    )
    crash_after_checkpoint()
    with pytest.raises(KeyboardInterrupt):
        train.train(resolve_defaults(TrainConfig(**settings)))
    monkeypatch.setattr(checkpoints, "TINY_BASE_DIR", str(base_dir))

    assert checkpoints.ensure_tiny_base("cpu") == str(base_dir / "ckpt.pt")
    log = list(csv.DictReader(open(base_dir / "log.csv")))
    assert [int(r["iter"]) for r in log] == [1, 2, 3, 4]  # resumed at step 2, not started again
    model, tokenizer_name = checkpoints.load_base_model("tiny")
    assert tokenizer_name == "bytes" and (model.config.n_layer, model.config.n_embd) == (
        1,
        16,
    )  # the shape it was started with
    finished = (base_dir / "ckpt.pt").stat().st_mtime_ns
    checkpoints.ensure_tiny_base("cpu")
    assert (base_dir / "ckpt.pt").stat().st_mtime_ns == finished  # done: nothing runs again


# ---------------------------------------------------------------------------------------------------------
# GPT-2 from the hub or an HF folder, checked before loading; state dicts whose wrong tensor is named


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A randomly initialised HF GPT-2 (3 layers, GPT-2's vocabulary) saved as config.json + model.safetensors."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=3, n_head=4, n_embd=64, n_positions=128, vocab_size=50257)
    hf = transformers.GPT2LMHeadModel(config).eval()
    directory = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(directory, safe_serialization=True)
    return str(directory), hf


def test_unknown_base_lists_valid_ones():
    with pytest.raises(ValueError, match="gpt2, gpt2-medium, gpt2-large, gpt2-xl"):
        checkpoints.load_base_model("gpt3")


def test_download_then_load_offline_from_file_urls(hf_dir, tmp_path, monkeypatch):
    """The real download path, fed from local files: pretend the hub lives in hf_dir. Both the lesson's
    GPT.from_pretrained("gpt2") and the programs' load_base_model download once and load the same weights."""
    directory, hf = hf_dir
    monkeypatch.setattr(checkpoints, "HF_URL", "file://" + directory + "/{file}")
    monkeypatch.setenv("NANOQLORA_CACHE", str(tmp_path))
    idx = torch.randint(0, 50257, (1, 10))
    for load in (GPT.from_pretrained, lambda name: checkpoints.load_base_model(name)[0]):
        ours = load("gpt2")
        assert sorted(os.listdir(tmp_path / "gpt2")) == ["config.json", "model.safetensors"]
        with torch.no_grad():
            assert (ours(idx)[0] - hf(idx).logits).abs().max() <= 1e-4


def test_missing_or_wrong_tensor_is_named():
    model = GPT(GPTConfig(block_size=8, vocab_size=10, n_layer=2, n_head=1, n_embd=8))
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    broken = dict(state)
    del broken["transformer.h.1.attn.v_proj.weight"]
    with pytest.raises(KeyError, match="transformer.h.1.attn.v_proj.weight"):
        checkpoints.load_weights(model, broken)
    broken = dict(state, **{"transformer.h.0.mlp.fc_in.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match=r"transformer.h.0.mlp.fc_in.bias.*\(5,\).*\(32,\)"):
        checkpoints.load_weights(model, broken)
    with pytest.raises(KeyError, match="transformer.h.7.ln_1.weight"):
        checkpoints.load_weights(model, dict(state, **{"transformer.h.7.ln_1.weight": torch.zeros(8)}))


def test_a_config_whose_shapes_the_weights_do_not_have_is_refused_before_loading(hf_dir, tmp_path):
    import json

    directory = copy_hf_dir(hf_dir[0], tmp_path / "hf")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "n_embd": 200_000, "n_head": 4}))
    with pytest.raises(ValueError, match=r"wte.weight is \(50257, 64\) but .*config.json implies \(50257, 200000\)"):
        checkpoints.load_base_model(str(directory))
    (directory / "config.json").write_text(json.dumps({**config, "n_head": 3}))
    with pytest.raises(ValueError, match="n_embd 64 is not divisible by n_head 3"):
        checkpoints.load_base_model(str(directory))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_head": 3}, "n_embd 64 is not divisible by n_head 3"),
        ({"n_embd": 128}, r"wte.weight is \(50257, 64\) but .*config.json implies \(50257, 128\)"),
    ],
    ids=["n_head 3", "n_embd 128"],
)
def test_the_lessons_from_pretrained_checks_the_config_against_the_weights_too(hf_dir, tmp_path, change, message):
    """GPT.from_pretrained (model.py) used to trust config.json: an AssertionError for n_head 3, and a model of the
    config's size allocated before its weights were read (40 GB for n_embd 200,000). Now one line, nothing allocated."""
    import json

    directory = copy_hf_dir(hf_dir[0], tmp_path / "hf")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError, match=message):
        GPT.from_pretrained(str(directory))


def test_a_byte_level_hf_folder_loads_with_the_tokenizer_its_config_names(tmp_path):
    """--export_hf of a byte-level model writes "tokenizer": "bytes" into config.json, and loading honours it (GPT-2's
    BPE was assumed for every HF folder: offline a download of its files was tried, with them an IndexError)."""
    import json

    from support.hf_format import save_hf_checkpoint

    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=2, n_head=2, n_embd=32)).eval()
    save_hf_checkpoint(ours, tmp_path / "hf")
    model, tokenizer_name = checkpoints.load_base_model(str(tmp_path / "hf"))
    assert tokenizer_name == "bytes" and checkpoints.weights_sha256(model) == checkpoints.weights_sha256(
        ours
    )  # the same weights, the same fingerprint
    idx = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], ours(idx)[0])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["nanoqlora"]["tokenizer"] == "bytes"
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "nanoqlora": {"tokenizer": "gpt2"}}))
    with pytest.raises(UserError, match=r"config.json names the gpt2 tokenizer \(50257 tokens\) but vocab_size 257"):
        checkpoints.load_base_model(str(tmp_path / "hf"))
    with pytest.raises(
        UserError, match="vocab_size 300 is neither GPT-2's BPE"
    ):  # no tokenizer named, none of this size
        checkpoints.hf_tokenizer({"vocab_size": 300}, "config.json")
    assert checkpoints.hf_tokenizer({"vocab_size": 50257}, "config.json") == "gpt2"  # GPT-2's own folders name none


def test_the_fingerprint_sees_one_changed_weight():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=1, n_embd=8))
    before = checkpoints.weights_sha256(model)
    assert checkpoints.weights_sha256(model) == before and len(before) == 64
    with torch.no_grad():
        model.transformer.h[0].attn.v_proj.weight[0, 0] += 1e-6
    assert checkpoints.weights_sha256(model) != before


def copy_hf_dir(source, target):
    import shutil

    shutil.copytree(source, target)
    return target


def test_config_with_fewer_layers_than_the_weights_is_refused(hf_dir, tmp_path):
    import json

    directory = copy_hf_dir(hf_dir[0], tmp_path / "hf")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "n_layer": 2}))  # the weights hold 3 layers
    with pytest.raises(ValueError, match=r"config.json says n_layer=2 but .*model.safetensors holds 3 layers"):
        checkpoints.load_base_model(str(directory))
    (directory / "config.json").write_text(json.dumps({**config, "n_layer": 4}))
    with pytest.raises(ValueError, match=r"config.json says n_layer=4 but .*model.safetensors holds 3 layers"):
        checkpoints.load_base_model(str(directory))


def test_unreadable_hf_files_are_named(hf_dir, tmp_path):
    directory = copy_hf_dir(hf_dir[0], tmp_path / "hf")
    config = (directory / "config.json").read_text()
    for text, problem in [
        ("", "is not valid JSON"),
        (config[:40], "is not valid JSON"),
        ('{"n_layer": 3}', "lacks 'n_positions'"),
    ]:
        (directory / "config.json").write_text(text)
        with pytest.raises(ValueError, match=f"config.json {problem}"):
            checkpoints.load_base_model(str(directory))
    (directory / "config.json").write_text(config)
    weights = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        checkpoints.load_base_model(str(directory))
