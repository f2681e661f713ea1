"""
Files written atomically (alone, or several renamed together), read safely (tensors with weights_only=True, JSON
objects, checked pairs), downloaded whole; UserError, the one-line error of every bad input.
"""

import contextlib
import csv
import errno
import hashlib
import json
import os
import urllib.request

import torch

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root, above support/
DOWNLOAD_DIR = os.path.join(REPO_DIR, "data", "downloads")  # datasets fetched from the web (instructions, SMS)


class UserError(ValueError):
    """A bad input or a run that cannot go on; the message names the input and the fix, in one line."""


def user_cache_dir():
    """Where GPT-2's weights and the compiled kernel go: $NANOQLORA_CACHE or ~/.cache/nanoqlora."""
    return os.environ.get("NANOQLORA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "nanoqlora"))


def shown_path(path):
    """A path as printed: relative inside the working folder or its parent (../checkpoints/...), else absolute."""
    relative = os.path.relpath(path)
    return os.path.abspath(path) if relative.startswith(os.path.join(os.pardir, os.pardir)) else relative


# ---------------------------------------------------------------------------------------------- writing

WRITE_FIXES = {  # what to do when the file system refuses a write, by errno
    errno.ENOSPC: "the disk is full: free some space, or choose another folder",
    errno.EDQUOT: "the disk quota is used up: free some space, or choose another folder",
    errno.EROFS: "the file system is read-only: choose a folder you can write to",
    errno.EACCES: "permission denied: choose a folder you can write to",
    errno.EPERM: "not permitted: choose a folder you can write to",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f)",
}


def write_error(path, error):
    """The OSError behind a failed write (torch.save wraps it) as a UserError naming the path and the fix, or None."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    if error is None or error.errno is None:
        return None
    reason, fix = error.strerror or os.strerror(error.errno), WRITE_FIXES.get(error.errno)
    kept = f" ({fix}); the files there before are as they were" if fix else ""
    return UserError(f"cannot write {path}: {reason}{kept}")


STAGED = []  # inside write_together: the (temporary file, path) pairs waiting to be renamed together


def atomic_write(path, write):
    """write(temporary path), then rename it onto path: a crash never leaves a half file (inside write_together
    the rename waits for the others'). A refused write is a UserError naming the path; the old file stays."""
    tmp = f"{path}.{os.getpid()}.tmp"  # beside path (a rename within one file system is atomic), one per process
    try:
        write(tmp)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the usual permissions, whatever the writer chose (safetensors: 0600)
        with open(tmp, "rb") as f:  # on disk before the rename: a power cut cannot leave an empty file
            os.fsync(f.fileno())
        if STAGED:
            if (tmp, path) not in STAGED[-1]:
                STAGED[-1].append((tmp, path))
            return
        os.replace(tmp, path)
        sync_directory(os.path.dirname(path))
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        refused = write_error(path, e) if isinstance(e, (OSError, RuntimeError)) else None
        if refused is not None:
            raise refused from None
        raise


@contextlib.contextmanager
def write_together():
    """The files written inside are renamed into place together once all are written and synced, or (on any
    failure) none is: one step's files are replaced together or not at all."""
    if STAGED:  # nested: joins the outer
        yield
        return
    STAGED.append([])
    try:
        yield
        for tmp, path in STAGED[-1]:
            os.replace(tmp, path)
        for directory in {os.path.dirname(path) for _, path in STAGED[-1]}:
            sync_directory(directory)
    finally:
        for tmp, _ in STAGED.pop():  # those a failure left: none renamed, or some after a failed rename
            with contextlib.suppress(OSError):
                os.remove(tmp)


def sync_directory(directory):
    """fsync a directory, so a rename inside it is on disk too (POSIX; Windows cannot open a directory)."""
    if os.name == "posix":
        fd = os.open(directory or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_file_atomic(path, write, mode="w", **open_args):
    def write_to(tmp):
        with open(tmp, mode, **open_args) as f:
            write(f)

    atomic_write(path, write_to)


def save_atomic(obj, path):  # through a Python file: a refused write raises its OSError, errno and all
    write_file_atomic(path, lambda f: torch.save(obj, f), "wb")


def write_bytes_atomic(data, path):
    write_file_atomic(path, lambda f: f.write(data), "wb")


def write_json_atomic(obj, path):
    def dump(f):
        try:  # a bare NaN or Infinity is not JSON: never write a file that JSON readers reject
            json.dump(obj, f, indent=2, allow_nan=False)
        except ValueError as e:
            raise ValueError(f"not writing {path}: {e} (a NaN or infinite number)") from None

    write_file_atomic(path, dump)


def write_csv_atomic(rows, path, fieldnames):
    def write(f):
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)

    write_file_atomic(path, write, newline="")


def save_safetensors_atomic(tensors, path, metadata=None):
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_figure_atomic(fig, path):
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def download_file(url, path):
    """url to path with a progress bar, via path.part, renamed once every byte the server announced arrived."""
    if os.path.exists(path):
        return path
    from tqdm import tqdm

    partial = path + ".part"
    with urllib.request.urlopen(url, timeout=60) as response:
        expected = response.headers.get("Content-Length")
        expected, received = int(expected) if expected is not None else None, 0
        bar = tqdm(total=expected, unit="B", unit_scale=True, desc=os.path.basename(path))
        with open(partial, "wb") as f, bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if expected is not None and received != expected:
        os.remove(partial)
        raise OSError(f"download of {url} stopped at {received} of {expected} bytes; run again to retry")
    os.replace(partial, path)
    return path


# ---------------------------------------------------------------------------------------------- reading


def first_line(e):
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


def load_tensor_file(path, what="checkpoint", fix="delete it and train again"):
    """torch.load with weights_only=True: a dict of tensors and plain containers (a pickled object could run code as
    it loads); anything else, or a truncated or corrupt file, is one line naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # its type depends on where the bytes stop making sense
        if "Unsupported global" in str(e):  # weights_only refused a class or function
            raise UserError(f"{path} holds more than tensors and plain containers (a pickled object?); {fix}") from None
        size = f"{os.path.getsize(path):,} bytes: empty, truncated or not written by torch.save"
        raise UserError(f"{path} is not a readable {what} ({size}); {fix}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not the dict a {what} is; {fix}")
    return obj


def check_tensors_match(stored, expected, source):
    """The same tensor names as the model's, each with the same shape; the first difference is named."""
    missing, unexpected = [k for k in expected if k not in stored], [k for k in stored if k not in expected]
    if missing:
        raise KeyError(f"{source} lacks tensor {missing[0]!r} ({len(missing)} missing): saved from another model?")
    if unexpected:
        raise KeyError(f"{source} has tensor {unexpected[0]!r} that this model has no place for ({len(unexpected)})")
    for k, v in stored.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"tensor {k!r} is {tuple(v.shape)} in {source} but {tuple(expected[k].shape)} here")


def read_saved_pair(directory, config_name, weights_name, writer):
    """(the JSON config, the weights file's path) of a directory that `writer` fills with the two."""
    paths = [os.path.join(directory, name) for name in (config_name, weights_name)]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found; {writer} writes {config_name} and {weights_name} together")
    return read_json(paths[0], what=f"config written by {writer}"), paths[1]


def read_json(path, required=(), what="file"):
    """A JSON object with every key in `required`; a missing, empty, partial or foreign file is named."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}), so not a {what}") from None
    except json.JSONDecodeError as e:
        problem = f"{e.msg}: line {e.lineno} column {e.colno}; empty or cut short?"
        raise UserError(f"{path} is not valid JSON ({problem}), so not a {what}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a JSON {type(obj).__name__}, but a {what} is a JSON object")
    missing = [k for k in required if k not in obj]
    if missing:
        raise UserError(f"{path} lacks {', '.join(repr(k) for k in missing)}: it is not a complete {what}")
    return obj


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_weights_checked(weights_path, sha256, manifest, fix="save or train the adapter again"):
    """The tensors of an adapter's safetensors file, checked: its SHA-256 is `sha256`, the one its manifest (the config
    file written after it) recorded (None: the format has no manifest, e.g. an adapter PEFT saved); it reads; every
    tensor is floating point and finite. Every adapter loads through this (support.adapters, peft_format)."""
    from safetensors.torch import load

    if not os.path.isfile(weights_path):
        raise FileNotFoundError(
            f"{weights_path} not found; an adapter directory holds {manifest} and {os.path.basename(weights_path)}"
        )
    with open(weights_path, "rb") as f:
        weights = f.read()
    if sha256 is not None and hashlib.sha256(weights).hexdigest() != sha256:
        raise UserError(
            f"{weights_path} is not the file {manifest} beside it was saved with (its checksum differs: "
            f"the two come from different saves, e.g. a run killed between writing them); {fix}"
        )
    try:
        stored = load(weights)
    except Exception as e:  # safetensors raises its own error type for a corrupt header or data
        raise UserError(f"{weights_path} is not a readable safetensors file ({first_line(e)}); {fix}") from None
    for k, v in stored.items():
        if not v.is_floating_point():
            raise UserError(f"{weights_path}: tensor {k!r} is {v.dtype}, but adapter weights are floating point; {fix}")
        if not torch.isfinite(v).all():
            raise UserError(
                f"{weights_path}: tensor {k!r} holds NaN or infinite values; the training that saved it "
                f"diverged: train again (e.g. with a lower learning rate)"
            )
    return stored
