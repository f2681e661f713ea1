"""
What a run holds while it lasts: its device and autocast, its peak memory, its id, the lock on its out_dir (one run or
export per folder: filelock's, released by the operating system however the process ends), and the NaN stop.
"""

import contextlib
import math
import os
import pathlib
import re
import sys
import uuid

import torch

from support.files import UserError, write_error

LOCK_FILE = "run.lock"
TMP_NAME = re.compile(r"\.(\d+)\.tmp$")  # files.atomic_write's temporary files: <path>.<pid>.tmp


def pick_device(name="auto"):
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name not in ("auto", "cuda", "mps", "cpu") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise UserError(f"--device {name!r}: use auto, cuda (or cuda:N), mps or cpu")
    if (name.startswith("cuda") and not cuda) or (name == "mps" and not mps):
        gpu = "CUDA GPU" if name.startswith("cuda") else "Apple GPU"
        raise UserError(f"--device {name}: this PyTorch sees no {gpu}; use --device cpu or auto")
    return name if name != "auto" else "cuda" if cuda else "mps" if mps else "cpu"


def autocast_context(device):
    """bf16 autocast on GPUs that compute in bf16 natively (Ampere and later; emulated bf16 is slower than fp32),
    plain fp32 elsewhere; weights and optimizer stay fp32."""
    if str(device).startswith("cuda") and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def reset_peak_memory(device):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the process's peak resident set size (VmHWM)


def process_status_bytes(field):
    """VmRSS (resident now) or VmHWM (its peak) from Linux's /proc/self/status, in bytes; 0 where it is missing."""
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    return 0


def peak_memory_bytes(device):
    """Peak GPU memory on CUDA; on the CPU the process's peak resident set size; None where unknown (Windows)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    if os.path.exists("/proc/self/status"):
        return process_status_bytes("VmHWM")
    try:
        import resource  # Unix only
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def memory_text(size):
    return "n/a" if size is None else f"{size / 2**20:.0f} MiB"


def training_state_bytes(model, optimizer):
    """All weights plus the trainable parameters' gradients and optimizer state: what training must hold."""
    size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)
    trainable = [p for p in model.parameters() if p.requires_grad]
    states = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    return size(model.parameters()) + size(model.buffers()) + size(trainable) + size(states)


def new_run_id():
    """A fresh id for a run; kept through --resume and written into every file of the run."""
    return uuid.uuid4().hex[:16]


def check_finite(step, what, values, last_saved_step, out_dir, learning_rate):
    """Stop at the first NaN or infinity, before it reaches the weights or a file: out_dir keeps the checkpoint of
    the last good evaluation (last_saved_step; None: nothing saved yet), from which --resume goes on."""
    if all(math.isfinite(v) for v in values):
        return
    kept = "nothing of this run was saved"
    if last_saved_step is not None:
        kept = f"{out_dir} keeps the checkpoint of step {last_saved_step}"
    fix = f"try a lower --learning_rate (this run: {learning_rate:g}) or --grad_clip"
    raise UserError(f"step {step}: {what}: training diverged, so it stops here and {kept}; {fix}")


# ---------------------------------------------------------------------------------------------- output folders


def process_is_alive(pid):
    """Whether a process with this id exists. Where no probe is safe (Windows: os.kill(pid, 0) would send
    CTRL_C_EVENT) every process counts as alive, so nothing of another process's is ever removed."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    return True


def remove_stale_temporary_files(directory):
    """Delete the `<name>.<pid>.tmp` files of writers that no longer run (killed mid-write); returns their paths."""
    paths = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
    stale = [path for path in paths if (match := TMP_NAME.search(path)) and not process_is_alive(int(match[1]))]
    for path in stale:
        os.remove(path)
    return stale


def write_owner(fd):
    """Our process id into the lock file, through the locked descriptor (a refused run only reads it)."""
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())


@contextlib.contextmanager
def lock_out_dir(directory):
    """Own `directory` for a run or export: an exclusive lock on directory/run.lock (filelock: flock on Unix, msvcrt
    on Windows) refuses a second one while this process lives. Stale temporary files go once the lock is ours; a run
    that fails removes the folders it created if they hold nothing."""
    from filelock import FileLock, Timeout

    created, path = [], os.path.abspath(directory)
    while not os.path.exists(path):
        created.insert(0, path)
        path = os.path.dirname(path)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise write_error(directory, e) or e from None
    path = os.path.join(directory, LOCK_FILE)
    lock = FileLock(path, on_acquired=write_owner)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        owner = "?"  # the lock file's process id, if its owner lived to write it
        with contextlib.suppress(OSError, ValueError):
            owner = int(pathlib.Path(path).read_text())
        owner = f"process {owner}, see {path}"
        raise UserError(f"{directory} is in use by another run or export ({owner}); wait, or use another") from None
    except OSError as e:
        raise write_error(path, e) or e from None
    ours, failed = os.stat(path), True
    try:
        for stale in remove_stale_temporary_files(directory):
            print(f"removed {stale}, left half-written by a run that was killed")
        yield path
        failed = False
    finally:
        with contextlib.suppress(OSError):  # our lock file only (an export may have moved the folder away); a run
            if os.path.samestat(ours, os.stat(path)):  # that opened it before gets a lock filelock then refuses
                os.remove(path)
        lock.release()
        for folder in reversed(created if failed else []):
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only while empty


def remove_earlier_run(out_dir, run_files, hint=""):
    """A fresh run first removes an earlier run's `run_files` from out_dir: a folder never mixes two runs."""
    earlier = [name for name in run_files if os.path.exists(os.path.join(out_dir, name))]
    if earlier:
        print(f"{out_dir} holds an earlier run ({', '.join(earlier)}): replacing it{hint}")
        for name in earlier:
            os.remove(os.path.join(out_dir, name))
