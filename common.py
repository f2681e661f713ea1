"""
The plumbing that every script and module here shares, in one place (nanochat keeps its own in common.py too):

- files: atomic_write, and the writers built on it for tensors (torch.save, safetensors), JSON, CSV and figures;
- downloads: download_file, with a progress bar and a check that every byte arrived;
- the device: pick_device and autocast_context;
- memory: reset_peak_memory, peak_memory_bytes and training_state_bytes;
- command lines: parse_config (a config dataclass -> argparse flags) and run_script (a config -> a run of train.py
  or finetune_classifier.py in a child process, for what drives those programs: experiments, the tiny base).

What keeps inputs and output folders trustworthy (locks, weights-only loading, UserError) is safety.py's.
"""

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import urllib.request
from dataclasses import fields

import torch

from safety import UserError

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
DOWNLOAD_DIR = os.path.join(REPO_DIR, "data", "downloads")  # datasets fetched from the web (instruction-data, alpaca, SMS)


def user_cache_dir():
    """Where downloaded GPT-2 weights (and the compiled dequantize kernel) go: $NANOQLORA_CACHE or ~/.cache/nanoqlora."""
    return os.environ.get("NANOQLORA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "nanoqlora"))


# ---------------------------------------------------------------------------------------------- files


def atomic_write(path, write):
    """Call write(temporary path) and rename the result onto path, so a crash never leaves a half file."""
    # beside path (a rename within one file system is atomic); named by the process id so two runs cannot collide;
    # written by `write` itself, so it gets the usual permissions (mkstemp's file would be private to its owner)
    # (a killed writer's file is removed by the next run on the folder: safety.remove_stale_temporary_files)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # the data reach the disk before the rename makes them the file: a power cut
            os.fsync(f.fileno())   # after the rename can then not leave an empty file under the real name
        os.replace(tmp, path)
        sync_directory(os.path.dirname(path))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def sync_directory(directory):
    """fsync a directory, so a rename inside it is on disk too (POSIX; Windows cannot open a directory)."""
    if os.name == "posix":
        fd = os.open(directory or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_atomic(obj, path):
    """torch.save through a temporary file and a rename: a crash mid-write never leaves a broken checkpoint."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_safetensors_atomic(tensors, path, metadata=None):
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def write_bytes_atomic(data, path):
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def write_json_atomic(obj, path):
    def write(tmp):
        with open(tmp, "w") as f:
            try:  # a bare NaN or Infinity is not JSON: refuse to write a file that JSON readers would reject
                json.dump(obj, f, indent=2, allow_nan=False)
            except ValueError as e:
                raise ValueError(f"not writing {path}: {e} (a NaN or infinite number)") from None

    atomic_write(path, write)


def write_csv_atomic(rows, path, fieldnames):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def save_figure_atomic(fig, path):
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


# ---------------------------------------------------------------------------------------------- downloads


def download_file(url, path):
    """Download url to path with a progress bar. The bytes go to path + '.part' and are renamed only
    once their count matches the server's Content-Length, so an interrupted download is never loaded."""
    if os.path.exists(path):
        return path
    from tqdm import tqdm

    partial = path + ".part"
    with urllib.request.urlopen(url, timeout=60) as response:
        expected = response.headers.get("Content-Length")
        expected = int(expected) if expected is not None else None
        received = 0
        with open(partial, "wb") as f, tqdm(total=expected, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if expected is not None and received != expected:
        os.remove(partial)
        raise IOError(f"download of {url} stopped at {received} of {expected} bytes; run again to retry")
    os.replace(partial, path)
    return path


# ---------------------------------------------------------------------------------------------- device


def pick_device(name="auto"):
    if name not in ("auto", "cuda", "mps", "cpu") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise UserError(f"--device {name!r}: use auto, cuda (or cuda:N), mps or cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this PyTorch sees no CUDA GPU (torch.cuda.is_available() is False); use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps: this PyTorch sees no Apple GPU (torch.backends.mps.is_available() is False); use --device cpu or auto")
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def autocast_context(device):
    """bf16 autocast on CUDA GPUs that support it (weights and optimizer stay fp32); plain fp32 elsewhere."""
    if device == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# ---------------------------------------------------------------------------------------------- model surgery


def replace_module(model, name, new):
    """Put `new` where the submodule called `name` (dotted, e.g. 'transformer.h.0.attn.q_proj') was."""
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, new)


def check_trainable_names(model, trainable):
    """Every name in `trainable` (kept trainable beside an adapter, e.g. a classification head) must be a module or
    parameter of the model: a typo would otherwise leave it frozen without a word."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    for t in trainable:
        if not any(n == t or n.startswith(t + ".") for n in names):
            top = ", ".join(name for name, _ in model.named_children())
            raise ValueError(f"trainable={t!r} names no module or parameter of the model (its top-level modules: {top})")


# ---------------------------------------------------------------------------------------------- memory


def reset_peak_memory(device):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the process's peak resident set size (VmHWM)


def peak_memory_bytes(device):
    """Peak GPU memory allocated on CUDA; on CPU the process's peak resident set size (which includes Python and
    PyTorch themselves, a few hundred MB)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def training_state_bytes(model, optimizer):
    """Bytes of trainable parameters' gradients and optimizer state plus all weights: what training must hold."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    states = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    return weights + grads + states


# ---------------------------------------------------------------------------------------------- command lines


def parse_config(config_class, argv=None, description=None):
    """Every field of a config dataclass becomes a --flag with its default in --help; unknown flags are errors.
    (train.py builds its command line from TrainConfig this way, finetune_classifier.py from ClassifierConfig.)"""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(config_class):
        help_text = (f.metadata.get("help", "") + f" (default: {f.default})").replace("%", "%%")  # argparse formats help with %
        if f.type is bool or f.type == "bool":
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=help_text)
    return config_class(**vars(parser.parse_args(argv)))


def config_flags(settings):
    """{name: value} -> the command-line flags parse_config reads back as those values (None: left at its default)."""
    flags = []
    for name, value in settings.items():
        if isinstance(value, bool):
            flags.append(f"--{name}" if value else f"--no-{name}")
        elif value is not None:
            flags += [f"--{name}", str(value)]
    return flags


def run_script(script, settings):
    """Run one of this repository's programs (train.py, finetune_classifier.py) in a child process with `settings` as
    its flags, its output going where ours goes, and return its out_dir/summary.json. Whatever drives those programs
    (the tiny base's pretraining, the experiments) runs them as a user would, and imports neither."""
    command = [sys.executable, os.path.join(REPO_DIR, script), *config_flags(settings)]
    sys.stdout.flush()  # what we printed so far comes before what the child prints
    status = subprocess.run(command).returncode  # in our working directory: a relative out_dir means the same to both
    if status != 0:
        raise UserError(f"`python {script} {' '.join(command[2:])}` failed with exit status {status} (its error is printed above)")
    with open(os.path.join(settings["out_dir"], "summary.json")) as f:
        return json.load(f)
