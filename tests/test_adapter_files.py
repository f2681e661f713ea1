"""support/adapters.py on disk: what save_adapter writes and load_adapter reads back; a pair of files from two
saves, non-finite or non-float tensors, unreadable or malformed files are refused with a message naming them."""

import json
import os

import pytest
import torch
from test_lora import randomize_lora, tiny_gpt

from lora import apply_lora
from support import adapters as adapter_files
from support.adapters import load_adapter, save_adapter


def saved_adapter(tmp_path):
    model = apply_lora(tiny_gpt(), rank=4, alpha=8)
    randomize_lora(model)
    save_adapter(model, tmp_path / "a")
    return tmp_path / "a"


def rewrite_weights(directory, tensors):
    """Replace the weights and record their checksum in the config, as if save_adapter had written them."""
    import hashlib

    from safetensors.torch import save

    data = save(tensors)
    (directory / "adapter_model.safetensors").write_bytes(data)
    config = json.loads((directory / "adapter_config.json").read_text())
    config["weights_sha256"] = hashlib.sha256(data).hexdigest()
    (directory / "adapter_config.json").write_text(json.dumps(config))


def test_adapter_tensors_must_be_finite_floats(tmp_path):
    from safetensors.torch import load_file

    directory = saved_adapter(tmp_path)
    good = load_file(directory / "adapter_model.safetensors")
    name = next(iter(good))
    rewrite_weights(directory, {**good, name: torch.full_like(good[name], float("nan"))})
    with pytest.raises(ValueError, match=f"tensor '{name}' holds NaN or infinite values"):
        load_adapter(tiny_gpt(), directory)
    rewrite_weights(directory, {**good, name: good[name].long()})
    with pytest.raises(ValueError, match=f"tensor '{name}' is torch.int64, but adapter weights are floating point"):
        load_adapter(tiny_gpt(), directory)


def test_weights_and_config_of_different_saves_are_refused(tmp_path, monkeypatch):
    """A crash between the two renames of save_adapter leaves new weights beside the old config."""
    directory = saved_adapter(tmp_path)
    newer = apply_lora(tiny_gpt(), rank=4, alpha=8)
    randomize_lora(newer, seed=7)
    real_write_json_atomic = adapter_files.write_json_atomic

    def crash_before_the_config(obj, path):
        if path.endswith("adapter_config.json"):
            raise KeyboardInterrupt
        real_write_json_atomic(obj, path)

    monkeypatch.setattr(adapter_files, "write_json_atomic", crash_before_the_config)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(newer, directory)
    with pytest.raises(
        ValueError, match="adapter_model.safetensors is not the file adapter_config.json beside it was saved with"
    ):
        load_adapter(tiny_gpt(), directory)


def test_unreadable_adapter_files_are_named(tmp_path):
    import hashlib

    directory = saved_adapter(tmp_path)
    config = (directory / "adapter_config.json").read_text()
    broken = b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}"  # a safetensors header that is not JSON
    (directory / "adapter_model.safetensors").write_bytes(broken)
    fixed = dict(json.loads(config), weights_sha256=hashlib.sha256(broken).hexdigest())
    (directory / "adapter_config.json").write_text(json.dumps(fixed))
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a readable safetensors file"):
        load_adapter(tiny_gpt(), directory)
    for text, problem in [
        ("", "is not valid JSON"),
        (config[: len(config) // 2], "is not valid JSON"),
        ("[1, 2]", "holds a JSON list"),
    ]:
        (directory / "adapter_config.json").write_text(text)
        with pytest.raises(ValueError, match=f"adapter_config.json {problem}"):
            load_adapter(tiny_gpt(), directory)
    for key, value, must_be in [
        ("dropout", "0.1", "a number"),
        ("targets", 5, "a list of names"),
        ("rank", 2.5, "an integer"),
        ("use_dora", "yes", "true or false"),
        ("trainable", "head", "a list of parameter names"),
        ("method", "lora2", "one of lora, bottleneck"),
    ]:
        (directory / "adapter_config.json").write_text(json.dumps({**fixed, key: value}))
        with pytest.raises(
            ValueError, match=f"adapter_config.json: '{key}' is {json.dumps(value)}, but must be {must_be}"
        ):
            load_adapter(tiny_gpt(), directory)
    good = saved_adapter(tmp_path / "intact")
    intact = json.loads((good / "adapter_config.json").read_text())
    for key, value, problem in [
        ("rank", 0, "rank must be a positive integer.*got 0"),
        ("dropout", 1.5, r"dropout in \[0, 1\): 8, 1.5"),
        ("bottleneck", 4, "has setting 'bottleneck', which lora adapters do not take"),
    ]:
        (good / "adapter_config.json").write_text(json.dumps({**intact, key: value}))
        with pytest.raises(ValueError, match=problem):  # of the right kind but out of range: apply_lora's checks, named
            load_adapter(tiny_gpt(), good)


def test_saved_files_are_readable_like_the_rest(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    directory = saved_adapter(tmp_path)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert os.stat(directory / name).st_mode & 0o777 == 0o666 & ~umask, name


def test_an_absurd_scaling_is_refused(tmp_path):
    """alpha 1e30 in adapter_config.json (the checksum covers the weights, not the config) made every answer blank."""
    directory = saved_adapter(tmp_path)
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "alpha": 1e30}))
    with pytest.raises(
        ValueError, match=r"alpha 1e\+30 with rank 4 scales the update by 2.5e\+29, beyond any adapter trained here"
    ):
        load_adapter(tiny_gpt(), directory)
    (directory / "adapter_config.json").write_text(
        json.dumps({**config, "alpha": 4000.0})
    )  # scaling 1000: the largest allowed
    load_adapter(tiny_gpt(), directory)
