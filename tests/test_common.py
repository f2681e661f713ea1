"""files.py, runs.py, cli.py: atomic writes reach the disk before they replace a file, an interrupted download is never
kept, and a config goes to the command line and back unchanged."""

import io
import os
import warnings
from dataclasses import asdict, dataclass, field, fields

import pytest

from support import cli, files, runs


def test_atomic_write_syncs_before_the_rename_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(files.os, "fsync", lambda fd: calls.append("fsync"))
    real_replace = os.replace
    monkeypatch.setattr(files.os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b)))
    files.atomic_write(str(tmp_path / "x.txt"), lambda tmp: open(tmp, "w").write("data"))
    assert calls[:2] == ["fsync", "replace"] and (tmp_path / "x.txt").read_text() == "data"
    assert os.listdir(tmp_path) == ["x.txt"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "summary.json"
    files.write_json_atomic({"a": 1}, str(path))

    def crash(tmp):
        open(tmp, "w").write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(str(path), crash)
    assert path.read_text() == '{\n  "a": 1\n}' and os.listdir(tmp_path) == ["summary.json"]


def test_interrupted_download_is_never_kept(tmp_path, monkeypatch):
    class Truncated(io.BytesIO):
        headers = {"Content-Length": "100"}

        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

    monkeypatch.setattr(files.urllib.request, "urlopen", lambda url, timeout: Truncated(b"x" * 60))
    target = tmp_path / "model.safetensors"
    with pytest.raises(IOError, match="stopped at 60 of 100 bytes"):
        files.download_file("https://example.invalid/model.safetensors", str(target))
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
        assert cli.parse_config(ExampleConfig, cli.config_flags(asdict(config))) == config
    assert cli.config_flags({"pack": True, "mask": False, "prompt": None}) == ["--pack", "--no-mask"]
    with pytest.raises(SystemExit):
        cli.parse_config(ExampleConfig, ["--stepz", "3"])  # an unknown flag is an error, not ignored


def test_pick_device_refuses_what_this_machine_lacks(monkeypatch):
    monkeypatch.setattr(runs.torch.cuda, "is_available", lambda: False)
    assert runs.pick_device("cpu") == "cpu"
    with pytest.raises(files.UserError, match="--device cuda: this PyTorch sees no CUDA GPU"):
        runs.pick_device("cuda")
    with pytest.raises(files.UserError, match="--device 'tpu': use auto, cuda"):
        runs.pick_device("tpu")


# writes the file system refuses are one line; a step's files are replaced together or not at all


@pytest.mark.parametrize(
    "error, says",
    [
        (
            OSError(28, "No space left on device"),
            "No space left on device (the disk is full: free some space, or choose another folder)",
        ),
        (
            OSError(30, "Read-only file system"),
            "Read-only file system (the file system is read-only: choose a folder you can write to)",
        ),
    ],
)
def test_a_refused_write_is_one_line_naming_the_file_and_the_old_file_stays(tmp_path, error, says):
    path = tmp_path / "log.csv"
    path.write_text("the old log")

    def refused(tmp):
        open(tmp, "w").write("half")
        raise error

    def refused_inside_torch_save(tmp):  # torch.save turns the OSError of a full disk into a RuntimeError (its context)
        try:
            raise error
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904

    for write in (refused, refused_inside_torch_save):
        with pytest.raises(files.UserError) as caught:
            files.atomic_write(str(path), write)
        assert str(caught.value) == f"cannot write {path}: {says}; the files there before are as they were"
        assert path.read_text() == "the old log" and os.listdir(tmp_path) == ["log.csv"]
    with pytest.raises(RuntimeError, match="not a write error"):  # other failures are not dressed up as one
        files.atomic_write(str(path), lambda tmp: (_ for _ in ()).throw(RuntimeError("not a write error")))


def test_files_written_together_are_renamed_together_or_not_at_all(tmp_path):
    for name in ("ckpt.pt", "adapter_config.json"):
        (tmp_path / name).write_text(f"step 2 {name}")
    with pytest.raises(KeyboardInterrupt):
        with files.write_together():
            files.write_json_atomic({"step": 4}, str(tmp_path / "adapter_config.json"))
            assert (tmp_path / "adapter_config.json").read_text() == "step 2 adapter_config.json"  # not yet
            raise KeyboardInterrupt  # killed before the checkpoint was written
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "ckpt.pt"]
    assert all((tmp_path / name).read_text() == f"step 2 {name}" for name in ("ckpt.pt", "adapter_config.json"))
    with files.write_together():
        files.write_json_atomic({"step": 4}, str(tmp_path / "adapter_config.json"))
        files.save_atomic({"step": 4}, str(tmp_path / "ckpt.pt"))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "ckpt.pt"]
    assert runs.torch.load(tmp_path / "ckpt.pt", weights_only=True) == {"step": 4}


def test_every_writer_gives_the_usual_permissions(tmp_path):
    """safetensors creates its files 0600: a model or adapter file then could not be shared like the JSON beside it."""
    umask = os.umask(0o022)
    os.umask(umask)
    files.save_safetensors_atomic({"x": runs.torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    files.write_json_atomic({}, str(tmp_path / "a.json"))
    files.save_atomic({}, str(tmp_path / "a.pt"))
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == dict.fromkeys(
        ["a.safetensors", "a.json", "a.pt"], 0o666 & ~umask
    )


def test_autocast_is_bf16_only_on_a_gpu_that_computes_in_bf16(monkeypatch):
    """A GPU older than Ampere reports bf16 support through emulation (torch.cuda.is_bf16_supported() is True by default
    there): training must then run in fp32, not in emulated bf16. Stand-ins for torch.cuda answer as such a GPU does."""

    def older_gpu(including_emulation=True):
        return including_emulation  # no native bf16, emulation possible

    monkeypatch.setattr(runs.torch.cuda, "is_bf16_supported", older_gpu)
    assert runs.autocast_context("cuda").device == "cpu"  # the disabled context, as on the CPU
    monkeypatch.setattr(runs.torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere and later
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (without a GPU here torch.autocast("cuda") warns that it disables itself)
        context = runs.autocast_context("cuda")
    assert (context.device, context.fast_dtype) == ("cuda", runs.torch.bfloat16)
    assert runs.autocast_context("cpu").device == "cpu"


# ---------------------------------------------------------------------------------------------- --help


def help_text(config_class, monkeypatch, columns, **options):
    monkeypatch.setenv("COLUMNS", str(columns))  # argparse wraps to the terminal's width, which COLUMNS sets
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_config(config_class, ["--help"], "A program.\n\n    python program.py   # an example\n", **options)
    assert exit_info.value.code == 0
    return exit_info


def program_configs():
    import finetune_classifier
    import train

    return [train.TrainConfig, finetune_classifier.ClassifierConfig]


@pytest.mark.parametrize("columns", [60, 120, 300])
def test_help_of_both_programs_is_grouped_narrow_and_says_every_default(columns, monkeypatch, capsys):
    """Every option has a help text, in a group; a choice lists its values; no line is wider than 120 columns
    however wide the terminal; no empty "(default: )"; a default of 0 that stands for a value chosen by the job says
    what it depends on instead of "(default: 0)"."""
    for config_class in program_configs():
        helps, groups = cli.config_help(config_class)
        assert all(helps[f.name].strip() for f in fields(config_class)), [
            f.name for f in fields(config_class) if not helps[f.name]
        ]
        assert len(groups) >= 5 and "options" not in [title for title, _, _ in groups]
        help_text(config_class, monkeypatch, columns)
        out = capsys.readouterr().out
        wide = [line for line in out.splitlines() if len(line) > 120]
        assert wide == [], wide
        assert "(default: )" not in out and "(default: 0)" not in out
        for f in fields(config_class):
            shown = f"--[no-]{f.name}" if f.type is bool else f"--{f.name}"
            assert shown in out, shown
            assert f"--{f.name} {f.name.upper()}" not in out  # a placeholder such as QUANTIZE tells nothing
        assert "--quantize {none,nf4}" in out or "--mode {head,last_block,lora,qlora,full}" in out


def test_job_dependent_defaults_say_what_they_depend_on(monkeypatch, capsys):
    import finetune_classifier
    import train

    zero_means = {
        train.TrainConfig: (
            "max_iters",
            "learning_rate",
            "warmup_iters",
            "eval_interval",
            "eval_batches",
            "lora_alpha",
        ),
        finetune_classifier.ClassifierConfig: ("max_length", "learning_rate", "lora_alpha"),
    }
    for config_class, names in zero_means.items():
        helps, _ = cli.config_help(config_class)
        for name in names:
            assert getattr(config_class(), name) == 0 and "default (0): " in helps[name], name
        assert "default (0): 2 x rank" in helps["lora_alpha"]  # one alpha convention, in both programs
    monkeypatch.setenv("COLUMNS", "120")
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--max_iters N           optimizer steps; default (0): 1,000 pretraining" in out
    assert "(default: )" not in out
    assert "pretraining only (--init_from scratch --dataset stdlib)" in out
    import chat

    with pytest.raises(SystemExit):
        cli.parse_config(chat.ChatConfig, ["--help"])
    out = capsys.readouterr().out
    assert "--answers_out TEXT" in out and "default: IN.answers.json" in out and "(default: )" not in out


def test_a_renamed_flag_keeps_working_and_giving_both_names_is_an_error(capsys):
    import finetune_classifier
    import train

    for parse in (train.parse_args, finetune_classifier.parse_args):
        assert parse(["--data_path", "my.tsv"]).dataset == "my.tsv"
        assert parse(["--dataset=a.tsv"]).dataset == "a.tsv"
        with pytest.raises(SystemExit):
            parse(["--dataset", "a.tsv", "--data_path=b.tsv"])
        assert "--data_path is the old name of --dataset: give only --dataset" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            parse(["--help"])
        out = capsys.readouterr().out
        assert (
            "--data_path TEXT" not in out and "(--data_path: the same)" in out
        )  # one name listed, the old one mentioned
    assert "data_path" not in {f.name for f in fields(finetune_classifier.ClassifierConfig)}


def test_a_printed_path_is_relative_inside_the_working_folder_or_its_parent_and_absolute_elsewhere(
    tmp_path, monkeypatch
):
    """Notebooks run in notebooks/ and print where runs write: ../checkpoints/..., never a machine's own folders."""
    (tmp_path / "repo" / "notebooks").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "repo" / "notebooks")
    assert files.shown_path(str(tmp_path / "repo" / "checkpoints" / "tiny-base")) == os.path.join(
        "..", "checkpoints", "tiny-base"
    )
    assert files.shown_path(str(tmp_path / "repo" / "notebooks" / "out")) == "out"
    assert files.shown_path(str(tmp_path / "elsewhere")) == str(tmp_path / "elsewhere")  # two levels up: absolute


def test_the_programs_import_where_resource_and_fcntl_are_missing():
    """Windows has neither `resource` nor `fcntl`: importing the three programs (in a fresh process, where both are made
    unimportable) must not need them; the run lock is filelock's (msvcrt there), peak memory falls back below."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['resource'] = None; sys.modules['fcntl'] = None; "
        f"sys.path.insert(0, {files.REPO_DIR!r}); import train, finetune_classifier, chat; print('imported')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "imported", done.stderr[-2000:]


def test_peak_memory_is_reported_as_not_known_where_no_source_says_it(monkeypatch):
    import sys

    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda path: False if str(path).startswith("/proc") else real_exists(path))
    monkeypatch.setitem(sys.modules, "resource", None)  # no /proc (macOS, Windows) and no resource (Windows)
    assert runs.peak_memory_bytes("cpu") is None and runs.memory_text(None) == "n/a"
    monkeypatch.delitem(sys.modules, "resource")
    assert runs.peak_memory_bytes("cpu") > 0 and runs.memory_text(3 * 2**20) == "3 MiB"
