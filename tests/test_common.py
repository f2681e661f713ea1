"""common.py: atomic writes reach the disk before they replace a file, an interrupted download is never kept, and a
config goes to the command line and back unchanged."""
import io
import os
import warnings
from dataclasses import asdict, dataclass, field

import pytest

from support import common


def test_atomic_write_syncs_before_the_rename_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(common.os, "fsync", lambda fd: calls.append("fsync"))
    real_replace = os.replace
    monkeypatch.setattr(common.os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b)))
    common.atomic_write(str(tmp_path / "x.txt"), lambda tmp: open(tmp, "w").write("data"))
    assert calls[:2] == ["fsync", "replace"] and (tmp_path / "x.txt").read_text() == "data"
    assert os.listdir(tmp_path) == ["x.txt"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "summary.json"
    common.write_json_atomic({"a": 1}, str(path))

    def crash(tmp):
        open(tmp, "w").write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        common.atomic_write(str(path), crash)
    assert path.read_text() == '{\n  "a": 1\n}' and os.listdir(tmp_path) == ["summary.json"]


def test_interrupted_download_is_never_kept(tmp_path, monkeypatch):
    class Truncated(io.BytesIO):
        headers = {"Content-Length": "100"}

        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

    monkeypatch.setattr(common.urllib.request, "urlopen", lambda url, timeout: Truncated(b"x" * 60))
    target = tmp_path / "model.safetensors"
    with pytest.raises(IOError, match="stopped at 60 of 100 bytes"):
        common.download_file("https://example.invalid/model.safetensors", str(target))
    assert not target.exists() and not (tmp_path / "model.safetensors.part").exists()


@dataclass
class ExampleConfig:
    name: str = "tiny"
    steps: int = field(default=10, metadata={"help": "optimizer steps"})
    rate: float = 3e-3
    pack: bool = False
    mask: bool = True
    prompt: str = None


def test_config_flags_parse_back_to_the_same_config():
    changed = ExampleConfig(name="a b", steps=0, rate=1e-7, pack=True, mask=False, prompt="")
    for config in (ExampleConfig(), changed):
        assert common.parse_config(ExampleConfig, common.config_flags(asdict(config))) == config
    assert common.config_flags({"pack": True, "mask": False, "prompt": None}) == ["--pack", "--no-mask"]
    with pytest.raises(SystemExit):
        common.parse_config(ExampleConfig, ["--stepz", "3"])  # an unknown flag is an error, not ignored


def test_pick_device_refuses_what_this_machine_lacks(monkeypatch):
    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: False)
    assert common.pick_device("cpu") == "cpu"
    with pytest.raises(common.UserError, match="--device cuda: this PyTorch sees no CUDA GPU"):
        common.pick_device("cuda")
    with pytest.raises(common.UserError, match="--device 'tpu': use auto, cuda"):
        common.pick_device("tpu")


def test_autocast_is_bf16_only_on_a_gpu_that_computes_in_bf16(monkeypatch):
    """A GPU older than Ampere reports bf16 support through emulation (torch.cuda.is_bf16_supported() is True by default
    there): training must then run in fp32, not in emulated bf16. Stand-ins for torch.cuda answer as such a GPU does."""
    def older_gpu(including_emulation=True):
        return including_emulation  # no native bf16, emulation possible

    monkeypatch.setattr(common.torch.cuda, "is_bf16_supported", older_gpu)
    assert common.autocast_context("cuda").device == "cpu"  # the disabled context, as on the CPU
    monkeypatch.setattr(common.torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere and later
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (without a GPU here torch.autocast("cuda") warns that it disables itself)
        context = common.autocast_context("cuda")
    assert (context.device, context.fast_dtype) == ("cuda", common.torch.bfloat16)
    assert common.autocast_context("cpu").device == "cpu"
