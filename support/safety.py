"""
What keeps the scripts honest about their inputs and their output folders:

- UserError: a bad flag, file or setting. Its message names the input and what would be valid; the scripts print
  it as one `error: ...` line and exit 1, without a traceback.
- load_tensor_file: torch.load with weights_only=True. A checkpoint is a pickle, and unpickling an arbitrary object
  runs arbitrary code; our checkpoints hold only tensors and plain containers, so anything else is refused.
- read_json: a JSON file that must be an object with some keys; an empty, partial or foreign file is named.
- lock_out_dir: one run (or export) owns an output folder at a time. The lock is the operating system's (filelock:
  flock on Unix, msvcrt on Windows, on out_dir/run.lock, which also holds the owner's process id for messages): it
  is released when its process ends, however it ends, so there are no stale locks to judge and no race over taking
  one over. The temporary files a killed writer left behind are removed when the next run starts, and a run that
  fails leaves no empty folders.
- new_run_id / file_sha256: the files of one run are tied together by a run id, and a manifest written last records
  the checksum of the weights written before it, so a pair from two different saves is never loaded as one.
- check_finite_settings: NaN and infinity are refused for every float setting; check_finite stops a run whose loss
  or gradient norm is no longer finite, before anything is saved.
"""

import contextlib
import errno
import hashlib
import json
import math
import os
import pickle
import re
import uuid
import zipfile
from dataclasses import fields

LOCK_FILE = "run.lock"
TMP_NAME = re.compile(r"\.(\d+)\.tmp$")  # common.atomic_write names its temporary files <path>.<pid>.tmp


class UserError(ValueError):
    """A bad input (flag, file, setting) or a run that cannot go on; the message says what is wrong and how to fix
    it. A ValueError, so code that already catches ValueError keeps working."""


def main_errors():
    """The exceptions a script's __main__ turns into one `error: ...` line: ours, the ValueError / FileNotFoundError /
    KeyError / ConnectionError that the modules raise with a message meant for the user, and the errors of a path
    that cannot be used as given (their message names the path)."""
    return (UserError, ValueError, FileNotFoundError, KeyError, ConnectionError, PermissionError, FileExistsError,
            IsADirectoryError, NotADirectoryError)


def error_line(e):
    """The one-line message for an exception in main_errors (a KeyError's str() would wrap it in quotes)."""
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
    return f"error: {' '.join(text.splitlines())}"  # one line, whatever the message holds


# what to do when the file system refuses a write, by errno
WRITE_FIXES = {errno.ENOSPC: "the disk is full: free some space, or choose another folder",
               errno.EDQUOT: "the disk quota is used up: free some space, or choose another folder",
               errno.EROFS: "the file system is read-only: choose a folder you can write to",
               errno.EACCES: "permission denied: choose a folder you can write to",
               errno.EPERM: "not permitted: choose a folder you can write to",
               errno.EFBIG: "the file is larger than this process may write (ulimit -f)"}


def write_error(path, error):
    """The OSError behind a failed write (torch.save wraps it in a RuntimeError) as a UserError naming the path and the
    fix; None when the failure is not the file system's."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    if error is None or error.errno is None:
        return None
    reason, fix = error.strerror or os.strerror(error.errno), WRITE_FIXES.get(error.errno)
    return UserError(f"cannot write {path}: {reason}" + (f" ({fix}); the files there before are as they were" if fix else ""))


# ---------------------------------------------------------------------------------------------- reading files


def load_tensor_file(path, what="checkpoint", fix="delete it and train again"):
    """torch.load(path) with weights_only=True, for files that hold tensors in plain containers (dict, list, str,
    numbers). Anything else in the file, e.g. a pickled object that would run code as it loads, is refused, as is a
    truncated or corrupt file; the error names the file."""
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a global (a class or function), or the bytes do not unpickle
        if "Unsupported global" in str(e):
            raise UserError(f"{path} holds more than tensors and plain containers (e.g. a pickled object, which could run code "
                            f"as it loads), so it is not loaded: a {what} written by this repository never does; {fix}") from None
        raise UserError(f"{path} is not a readable {what} ({os.path.getsize(path):,} bytes that torch.load cannot read: empty, "
                        f"truncated or not written by torch.save); {fix}") from None
    except (EOFError, OSError, RuntimeError, UnicodeDecodeError, IndexError, KeyError, ValueError, zipfile.BadZipFile):
        # what torch.load raises on a zero-byte, truncated or random file depends on where the bytes stop making sense
        raise UserError(f"{path} is not a readable {what} ({os.path.getsize(path):,} bytes that torch.load cannot read: empty, "
                        f"truncated or not written by torch.save); {fix}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not the dict a {what} is; {fix}")
    return obj


def first_line(e):
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


def check_tensors_match(stored, expected, source):
    """Tensors read from `source` against the ones a model has room for: the same names, each with the same shape.
    The first difference is named, so a file saved from another model is refused, never half-loaded."""
    missing, unexpected = [k for k in expected if k not in stored], [k for k in stored if k not in expected]
    if missing:
        raise KeyError(f"{source} lacks tensor {missing[0]!r} ({len(missing)} missing); was it saved from another model?")
    if unexpected:
        raise KeyError(f"{source} has tensor {unexpected[0]!r} that this model has no place for ({len(unexpected)} in all)")
    for k, v in stored.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"tensor {k!r} is {tuple(v.shape)} in {source} but {tuple(expected[k].shape)} in the model")


def read_saved_pair(directory, config_name, weights_name, writer):
    """(the JSON config, the weights file's path) of a directory that `writer` fills with a config and a weights file;
    a missing file or a config that is not a JSON object is named."""
    paths = [os.path.join(directory, name) for name in (config_name, weights_name)]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found; {writer} writes {config_name} and {weights_name} into a directory")
    return read_json(paths[0], what=f"config written by {writer}"), paths[1]


def read_json(path, required=(), what="file"):
    """A JSON object from path, with every key in `required`; a missing, empty, partial or foreign file is a
    UserError that names it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}), so not the {what} it should be") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}: line {e.lineno} column {e.colno}; empty or cut short?), "
                        f"so not the {what} it should be") from None
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


def new_run_id():
    """A fresh id for a training run; it stays the same through --resume and is written into every file of the run."""
    return uuid.uuid4().hex[:16]


# ---------------------------------------------------------------------------------------------- settings


def check_finite_settings(cfg):
    """Every float setting of a config dataclass must be a finite number: `--learning_rate nan` parses as a float
    but trains nothing, and a NaN never compares false to a range check that would catch it."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{f.name} {value}: must be a finite number")


def check_optimizer_ranges(cfg, extra=None):
    """The LoRA and AdamW settings both scripts share, each within its valid range (plus `extra`, name ->
    (valid?, what is valid)); the first one outside names itself and what would be valid."""
    ranges = {
        "learning_rate": (cfg.learning_rate >= 0, ">= 0 (0 = the default for the job)"),
        "lora_alpha": (cfg.lora_alpha >= 0, ">= 0 (0 = the default, 2 x --lora_rank)"),
        "lora_dropout": (0 <= cfg.lora_dropout < 1, "in [0, 1)"),
        "loraplus_ratio": (cfg.loraplus_ratio > 0, "> 0 (1 = plain LoRA)"),
        "min_lr_ratio": (0 <= cfg.min_lr_ratio <= 1, "in [0, 1]"),
        "weight_decay": (cfg.weight_decay >= 0, ">= 0"),
        "beta1": (0 <= cfg.beta1 < 1, "in [0, 1)"),
        "beta2": (0 <= cfg.beta2 < 1, "in [0, 1)"),
        "grad_clip": (cfg.grad_clip >= 0, ">= 0 (0 = no clipping)"),
        **(extra or {}),
    }
    for name, (valid, description) in ranges.items():
        if not valid:
            raise UserError(f"--{name} {getattr(cfg, name)}: use a number {description}")


def check_finite(step, what, values, last_saved_step, out_dir, learning_rate):
    """Stop a training run at the first NaN or infinity, before it reaches the weights or any saved file: out_dir
    keeps the checkpoint of the last good evaluation (last_saved_step; None: nothing saved yet), from which
    --resume can go on (with other settings)."""
    if all(math.isfinite(v) for v in values):
        return
    kept = f"{out_dir} keeps the checkpoint of step {last_saved_step}" if last_saved_step is not None else "nothing of this run was saved"
    raise UserError(f"step {step}: {what}: training diverged, so it stops here and {kept}; "
                    f"try a lower --learning_rate (this run: {learning_rate:g}) or --grad_clip")


# ---------------------------------------------------------------------------------------------- output folders


def process_is_alive(pid):
    """Whether a process with this id exists and has not exited (a zombie waiting to be reaped has exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): os.kill said it exists


def remove_stale_temporary_files(directory):
    """Delete `<name>.<pid>.tmp` files (half-written by common.atomic_write) whose writer no longer runs; returns them."""
    removed = []
    for root, _, files in os.walk(directory):
        for name in files:
            match = TMP_NAME.search(name)
            if match and not process_is_alive(int(match.group(1))):
                os.remove(os.path.join(root, name))
                removed.append(os.path.join(root, name))
    return removed


def make_directories(directory):
    """os.makedirs(directory) -> the directories it created, top first (empty if it existed); a file system that refuses
    is one line naming the folder."""
    missing, path = [], os.path.abspath(directory)
    while not os.path.exists(path):
        missing.insert(0, path)
        path = os.path.dirname(path)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise write_error(directory, e) or e from None
    return missing


def remove_if_empty(directories):
    """Remove the directories a failed run created (deepest first) as long as they hold nothing."""
    for directory in reversed(directories):
        try:
            os.rmdir(directory)
        except OSError:
            return


class OutDirLock:
    """An exclusive lock on `directory/run.lock` (filelock: flock on Unix, msvcrt on Windows), held until release() or
    the process ends (the operating system drops it then: a killed run leaves no lock that stops the next one). The
    file holds the owner's process id, read only to name the owner in the message of a run that is refused."""

    def __init__(self, directory):
        from filelock import FileLock, Timeout

        self.path = os.path.join(directory, LOCK_FILE)
        self.lock = FileLock(self.path, on_acquired=write_owner)
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            owner = read_lock_owner(self.path)
            raise UserError(f"{directory} is in use by another run or export (process {owner if owner else '?'}, see "
                            f"{self.path}); wait for it to finish or choose another folder") from None
        except OSError as e:
            raise write_error(self.path, e) or e from None
        self.stat = os.stat(self.path)

    def release(self):
        """Remove the lock file (if it is still ours: an export may have moved its folder away), then unlock. A run
        that opened the file before its removal gets a lock on a file no longer at the path, which filelock refuses."""
        if not self.lock.is_locked:
            return
        with contextlib.suppress(OSError):
            if os.path.samestat(self.stat, os.stat(self.path)):
                os.remove(self.path)
        self.lock.release()


def write_owner(fd):
    """Our process id into the lock file, through the locked descriptor (a run that is refused only reads it)."""
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())


@contextlib.contextmanager
def lock_out_dir(directory):
    """Hold `directory/run.lock` (an OutDirLock) for the duration of a run or export; a second one on the same
    folder is refused while the first lives. Stale temporary files are removed once the lock is ours. A run that fails
    removes the folders it created, if they hold nothing: a mistyped flag leaves no empty output tree behind."""
    created = make_directories(directory)
    lock = OutDirLock(directory)
    failed = True
    try:
        for stale in remove_stale_temporary_files(directory):
            print(f"removed {stale}, left half-written by a run that was killed")
        yield lock.path
        failed = False
    finally:
        lock.release()
        if failed:
            remove_if_empty(created)


def remove_earlier_run(out_dir, run_files, hint=""):
    """A fresh run replaces whatever an earlier run left in out_dir (its `run_files`), at its start: otherwise the
    earlier run's summary or checkpoint would sit beside this run's files until it overwrote them (or forever, if
    killed), and the folder would mix two runs."""
    earlier = [name for name in run_files if os.path.exists(os.path.join(out_dir, name))]
    if earlier:
        print(f"{out_dir} holds an earlier run ({', '.join(earlier)}): replacing it{hint}")
        for name in earlier:
            os.remove(os.path.join(out_dir, name))


def read_lock_owner(path):
    """The process id in a lock file, or None if it is empty or unreadable (a writer killed before writing it)."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None
