"""
The plumbing the programs share, in one place (nanochat keeps its own in common.py too):

- files: atomic_write, and the writers built on it for tensors (torch.save, safetensors), JSON, CSV and figures;
- downloads: download_file, with a progress bar and a check that every byte arrived;
- the device: pick_device and autocast_context;
- memory: reset_peak_memory, peak_memory_bytes and training_state_bytes;
- command lines: parse_config (a config dataclass, its comments as the help -> argparse flags in groups) and
  run_script (a config -> a run of train.py or finetune_classifier.py in a child process, for what drives those
  programs: the experiments, the tiny base).

What keeps inputs and output folders trustworthy (locks, weights-only loading, UserError) is safety.py's.
"""

import argparse
import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import fields

import torch

from support.safety import UserError, write_error

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root, above support/
DOWNLOAD_DIR = os.path.join(REPO_DIR, "data", "downloads")  # datasets fetched from the web (instruction-data, alpaca, SMS)


def shown_path(path):
    """A path as printed for the reader: relative to the working directory when it lies inside it or its parent
    folder (checkpoints/tiny-base, ../out/notebooks/05), absolute otherwise, so a log names no machine's folders."""
    relative = os.path.relpath(path)
    return os.path.abspath(path) if relative.startswith(os.path.join(os.pardir, os.pardir)) else relative


def user_cache_dir():
    """Where downloaded GPT-2 weights (and the compiled dequantize kernel) go: $NANOQLORA_CACHE or ~/.cache/nanoqlora."""
    return os.environ.get("NANOQLORA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "nanoqlora"))


# ---------------------------------------------------------------------------------------------- files


STAGED = []  # inside write_together: a list of the (temporary file, path) pairs waiting to be renamed together


def atomic_write(path, write):
    """Call write(temporary path) and rename the result onto path, so a crash never leaves a half file. Inside
    write_together the rename waits for the others'. A write the file system refuses (a full disk, a read-only
    folder) is a UserError naming the path, and the file that was there is left as it was."""
    # beside path (a rename within one file system is atomic); named by the process id so two runs cannot collide
    # (a killed writer's file is removed by the next run on the folder: safety.remove_stale_temporary_files)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # the usual permissions, whatever the writer chose (safetensors: 0600)
        with open(tmp, "rb") as f:  # the data reach the disk before the rename makes them the file: a power cut
            os.fsync(f.fileno())   # after the rename can then not leave an empty file under the real name
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
    """The files written inside (by atomic_write and the writers built on it) are renamed into place together at the
    end, after every one of them was written and synced; if anything inside fails (a full disk, an error, an
    interrupt), none is renamed and their temporary files are removed. So the checkpoint, adapter and log of one step
    are replaced together or not at all: a failure leaves the previous step's files whole. Nested: joins the outer."""
    if STAGED:
        yield
        return
    STAGED.append([])
    try:
        yield
    except BaseException:
        for tmp, _ in STAGED.pop():
            with contextlib.suppress(OSError):
                os.remove(tmp)
        raise
    staged = STAGED.pop()
    try:
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.remove(tmp)  # only those a failed rename left
    for directory in {os.path.dirname(path) for _, path in staged}:
        sync_directory(directory)


def current_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def sync_directory(directory):
    """fsync a directory, so a rename inside it is on disk too (POSIX; Windows cannot open a directory)."""
    if os.name == "posix":
        fd = os.open(directory or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_atomic(obj, path):
    """torch.save through a temporary file and a rename: a crash mid-write never leaves a broken checkpoint. Saved
    through a Python file object, so a write the disk refuses raises its OSError (errno and all) and not only the
    RuntimeError torch.save makes of it."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    atomic_write(path, write)


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
    """bf16 autocast on CUDA GPUs that compute in bf16 natively (Ampere, compute capability 8.0, and later; weights and
    optimizer stay fp32); plain fp32 elsewhere, older GPUs included: torch.cuda.is_bf16_supported() alone says yes
    there too, because bf16 tensors can be emulated, which is slower than fp32."""
    if str(device).startswith("cuda") and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# ---------------------------------------------------------------------------------------------- memory


def reset_peak_memory(device):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the process's peak resident set size (VmHWM)


def process_status_bytes(field):
    """A memory figure of this process from Linux's /proc/self/status, in bytes: VmRSS (resident now), VmHWM (its
    peak); 0 where the file or the field is missing."""
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    return 0


def peak_memory_bytes(device):
    """Peak GPU memory allocated on CUDA; on CPU the process's peak resident set size (which includes Python and
    PyTorch themselves, a few hundred MB); None where neither Linux's /proc nor Unix's `resource` module says it
    (Windows): reports then show "n/a"."""
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
    """A byte count as reports print it: MiB, or "n/a" when it is not known (peak_memory_bytes on Windows)."""
    return "n/a" if size is None else f"{size / 2**20:.0f} MiB"


def training_state_bytes(model, optimizer):
    """Bytes of trainable parameters' gradients and optimizer state plus all weights: what training must hold."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    states = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    return weights + grads + states


# ---------------------------------------------------------------------------------------------- command lines


def config_help(config_class):
    """A config dataclass's comments, read as its --help: ({field name: help text}, [(group title, description,
    [field names])]). The comment that ends a field's line is its help, continued by comment lines right below it
    that start in the same column. Comment lines of their own before a field open a group: the first line is the
    group's title, any further ones its description. So the dataclass reads like nanoGPT's configuration (a value
    and a comment per line) and --help says the same, in groups."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    source = textwrap.dedent(inspect.getsource(config_class))
    comments, code_lines = {}, set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = (token.start[1], token.string.lstrip("#").strip())
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(token.start[0], token.end[0] + 1))
    body = ast.parse(source).body[0].body
    field_lines = [(node.target.id, node.lineno, node.end_lineno) for node in body if isinstance(node, ast.AnnAssign)]
    helps, groups, line = {}, [], 1
    for name, first, last in field_lines:
        standalone = [comments[n][1] for n in range(line, first) if n in comments and n not in code_lines]
        if standalone or not groups:
            groups.append((standalone[0] if standalone else "options", " ".join(standalone[1:]), []))
        groups[-1][2].append(name)
        text, line = [], last + 1
        if last in comments:
            column = comments[last][0]
            text.append(comments[last][1])
            while line in comments and line not in code_lines and comments[line][0] == column:
                text.append(comments[line][1])
                line += 1
        helps[name] = " ".join(text)
    return helps, groups


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help as wide as the terminal but never over 120 columns; each option's help starts at column 26 when the
    option fits there. The program's docstring is printed as written, everything else wrapped."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=26, width=min(shutil.get_terminal_size().columns, 120) - 2)

    def _format_action_invocation(self, action):  # a switch as one name, --[no-]pack, rather than two
        if isinstance(action, argparse.BooleanOptionalAction):
            return "--[no-]" + action.option_strings[0][2:]
        return super()._format_action_invocation(action)

    def _fill_text(self, text, width, indent):  # a docstring as written; a group's description (one line) wrapped
        import textwrap

        if "\n" in text:
            return super()._fill_text(text, width, indent)
        return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False)

    def _split_lines(self, text, width):  # "all-linear" is one word, not "all-" and "linear" on two lines
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


METAVARS = {int: "N", float: "X", str: "TEXT"}  # what --help shows after a flag that takes a value


def default_text(value):
    """A default as --help shows it: on/off for a switch, a number as Python writes it, text as it is."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def parse_config(config_class, argv=None, description=None, aliases=None):
    """Every field of a config dataclass becomes a --flag, its comment the help (config_help), in the groups its
    comment lines make; a Literal type lists the choices; unknown flags are errors. train.py builds its command line
    from TrainConfig this way, finetune_classifier.py from ClassifierConfig.

    The help adds "(default: ...)" unless the comment already says what the default is (a setting whose default
    depends on the job says so itself: "default (0): ...") or the default is empty. aliases maps an old flag name
    to the field it now sets: the old name keeps working, --help does not list it (the field's comment may say it),
    and giving both is an error."""
    from typing import Literal, get_args, get_origin

    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter, usage="%(prog)s [options]")
    helps, groups = config_help(config_class)
    by_name = {f.name: f for f in fields(config_class)}
    for title, group_description, names in groups:
        group = parser.add_argument_group(title, group_description or None)
        for name in names:
            f = by_name[name]
            help_text = helps[name].replace("%", "%%")  # argparse formats help with %
            if f.default not in (None, "") and "default" not in help_text:
                help_text += f" (default: {default_text(f.default)})".replace("%", "%%")
            if f.type is bool:
                group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            elif get_origin(f.type) is Literal:
                choices = get_args(f.type)
                group.add_argument(f"--{name}", type=type(choices[0]), choices=choices, default=f.default, help=help_text)
            else:
                group.add_argument(f"--{name}", type=f.type, default=f.default, help=help_text, metavar=METAVARS.get(f.type))
    for old, name in (aliases or {}).items():
        f = by_name[name]
        parser.add_argument(f"--{old}", dest=name, type=f.type, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = sys.argv[1:] if argv is None else list(argv)
    for old, name in (aliases or {}).items():
        given = {arg.split("=", 1)[0] for arg in args if arg.startswith("--")}
        if {f"--{old}", f"--{name}"} <= given:
            parser.error(f"--{old} is the old name of --{name}: give only --{name}")
    return config_class(**vars(parser.parse_args(args)))


def config_flags(settings):
    """{name: value} -> the command-line flags parse_config reads back as those values (None: left at its default)."""
    flags = []
    for name, value in settings.items():
        if isinstance(value, bool):
            flags.append(f"--{name}" if value else f"--no-{name}")
        elif value is not None:
            flags += [f"--{name}", str(value)]
    return flags


def run_script(script, settings, log_path=None, threads=None):
    """Run one of this repository's programs (train.py, finetune_classifier.py) in a child process with `settings` as
    its flags, its output going where ours goes (or, with log_path, into that file), and return its
    out_dir/summary.json. Whatever drives those programs (the tiny base's pretraining, the experiments) runs them as
    a user would, and imports neither. threads: the child's PyTorch threads (OMP_NUM_THREADS), for runs side by side."""
    command = [sys.executable, os.path.join(REPO_DIR, script), *config_flags(settings)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    sys.stdout.flush()  # what we printed so far comes before what the child prints
    if log_path is None:
        status = subprocess.run(command, env=env).returncode  # in our working directory: a relative out_dir means the same
    else:
        with open(log_path, "w") as log:
            status = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if status != 0:
        where = "printed above" if log_path is None else f"at the end of {log_path}"
        raise UserError(f"`python {script} {' '.join(command[2:])}` failed with exit status {status} (its error is {where})")
    with open(os.path.join(settings["out_dir"], "summary.json")) as f:
        return json.load(f)
