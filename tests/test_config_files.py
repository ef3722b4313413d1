"""--config files: keys are the flag names, top-level keys are shared by every command, relative paths are the file's.

Also the other rough edges of the command line a new user meets: a memory:// store, a lone
held-out file (one split), and what `--finalize` says about missing shards
(tests/stages/test_generate.py::test_job_array_then_finalize).
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from distill.cli import cli
from distill.errors import ConfigError
from distill.pipeline.config import build_config, load_toml
from distill.pipeline.data import choose_split, only_split
from tests.pipeline.datahelp import save_hf_dataset, write_jsonl

REPO = Path(__file__).resolve().parents[1]
MNIST = "mnist1d:num_samples=200"
MLP = "mlp:hidden=8"


def stages() -> dict[str, type]:
    """Every stage command's config class, as the CLI hands them to load_toml."""
    return {name: cmd.config_class for name, cmd in cli.commands.items() if hasattr(cmd, "config_path")}


def job(tmp_path: Path, text: str) -> str:
    (tmp_path / "jobs").mkdir(exist_ok=True)
    path = tmp_path / "jobs" / "job.toml"
    path.write_text(text)
    return str(path)


def config_of(command: str, path: str, **flags):
    classes = stages()
    return build_config(classes[command], load_toml(path, command, classes), flags, source=path)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="distill")


# --- keys --------------------------------------------------------------------------------------


def test_the_keys_are_the_flag_names_and_no_note_is_printed(tmp_path, capsys):
    path = job(tmp_path, f'[generate-labels]\nteacher = "{MLP}"\ndata = "{MNIST}"\nout = "s"\n'
                         'temperature = [1.0, 3.0]\nno-progress = true\nbatch-size = 7\ndtype = "bfloat16"\n')
    config = config_of("generate-labels", path)
    assert config.temperatures == (1.0, 3.0) and config.progress is False and config.batch_size == 7
    assert config.precision == "bf16" and capsys.readouterr().err == ""


def test_old_spellings_work_with_one_note_each(tmp_path, capsys):
    path = job(tmp_path, f'[generate-labels]\nteacher = "{MLP}"\ndata = "{MNIST}"\nout = "s"\n'
                         'temperatures = [1.0, 3.0]\nprogress = false\nbatch_size = 7\n')
    config = config_of("generate-labels", path)
    assert config.temperatures == (1.0, 3.0) and config.progress is False and config.batch_size == 7
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 3 and all(n.startswith(f"distill: note: {path}: key ") for n in notes)
    assert "write temperature = [1.0, 3.0]" in notes[0] and "write no-progress = true" in notes[1]
    assert "write batch-size = 7" in notes[2]


def test_top_level_keys_apply_to_every_command_unless_its_table_overrides(tmp_path):
    path = job(tmp_path, f'data = "{MNIST}"\nbatch-size = 8\ntemperature = 2.0\nseed = 5\n'
                         f'[generate-labels]\nteacher = "{MLP}"\nout = "/abs/store"\nbatch-size = 64\n'
                         f'[train-student]\nstudent = "{MLP}"\nlabels = "/abs/store"\nout = "/abs/run"\n')
    generate = config_of("generate-labels", path)
    assert (generate.data, generate.batch_size, generate.temperatures, generate.seed) == (MNIST, 64, (2.0,), 5)
    student = config_of("train-student", path)  # teacher is not its setting: skipped, not an error
    assert (student.data, student.batch_size, student.temperature, student.seed) == (MNIST, 8, 2.0, 5)
    assert student.model == MLP and student.labels == "/abs/store"
    assert config_of("train-student", path, batch_size=3).batch_size == 3  # a flag beats both


def test_a_list_for_a_one_value_flag_is_refused_unless_the_commands_table_sets_it(tmp_path):
    common = f'data = "{MNIST}"\ntemperature = [1.0, 2.0]\n[train-student]\nstudent = "{MLP}"\nlabels = "/a"\nout = "/r"\n'
    with pytest.raises(ConfigError, match=r"temperature = \[1.0, 2.0\] is a list, but train-student's --temperature "
                                          r"takes one value: give one \(in a \[train-student\] table, if the "
                                          r"list is for another command\)"):
        config_of("train-student", job(tmp_path, common))
    assert config_of("train-student", job(tmp_path, common + "temperature = 2.0\n")).temperature == 2.0


@pytest.mark.parametrize("text, message", [
    ("[train-student]\nbatch_sise = 3\n", "unknown key 'batch_sise' in [train-student] (did you mean 'batch-size'?); "
                                          "valid keys: "),
    ("temprature = 2.0\n", "unknown key 'temprature', which no command has (did you mean 'temperature'?)"),
    ("[generate-label]\nk = 3\n", "unknown table [generate-label] (did you mean 'generate-labels'?); tables are the "
                                  "commands: "),
    ("[generate-labels]\ntemperature = [2.0]\ntemperatures = [3.0]\n",
     "keys 'temperature' and 'temperatures' set the same setting: keep one"),
])
def test_unknown_keys_and_tables_are_refused_naming_the_nearest(tmp_path, text, message):
    path = job(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        config_of("generate-labels", path)
    assert str(err.value).startswith(f"{path}: {message}") and "\n" not in str(err.value)


def test_a_key_of_another_commands_table_is_checked_too(tmp_path):
    path = job(tmp_path, f'[generate-labels]\nteacher = "{MLP}"\ndata = "{MNIST}"\nout = "/s"\n[evaluate]\nmodle = "x"\n')
    with pytest.raises(ConfigError, match=r"unknown key 'modle' in \[evaluate\] \(did you mean 'model'\?\)"):
        config_of("generate-labels", path)


# --- relative paths ---------------------------------------------------------------------------


def test_relative_paths_in_a_file_are_taken_from_its_directory(tmp_path, monkeypatch):
    path = job(tmp_path, '[train-student]\ndata = "train.jsonl"\nlabels = "../labels"\nstudent = "mlp:hidden=8"\n'
                         'out = "runs/a"\ntokenizer = "bytes"\neval-data = "s3://bucket/held.jsonl"\n'
                         'split = "train"\nweights = "/abs/w.safetensors"\n')
    jobs = tmp_path / "jobs"
    write_jsonl(jobs / "train.jsonl", [{"text": "a"}])
    (tmp_path / "labels").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (jobs / "train").mkdir()  # split = "train" is not a path, whatever lies beside the file
    monkeypatch.chdir(tmp_path / "elsewhere")
    config = config_of("train-student", path)
    assert config.data == str(jobs / "train.jsonl") and config.labels == str(tmp_path / "labels")
    assert config.out == str(jobs / "runs" / "a")  # an output: always the file's directory
    assert config.model == "mlp:hidden=8" and config.tokenizer == "bytes"  # specs that name nothing there
    assert config.eval_data == "s3://bucket/held.jsonl" and config.split == "train"
    assert config.weights == "/abs/w.safetensors"


def test_generate_labels_from_another_directory_reads_and_writes_beside_the_file(tmp_path, monkeypatch):
    path = job(tmp_path, f'teacher = "{MLP}"\ndata = "{MNIST}"\nout = "store"\nk = 3\n')
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = invoke("generate-labels", "--config", path, "--device", "cpu", "--no-progress", "--json")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "jobs" / "store" / "manifest.json").is_file()
    assert not (tmp_path / "elsewhere" / "store").exists()


@pytest.mark.skipif(shutil.which("make") is None or not (REPO / ".venv" / "bin" / "distill").exists(),
                    reason="needs make and the repository's venv")
def test_make_labels_with_an_absolute_config_from_another_directory(tmp_path):
    write_jsonl(tmp_path / "jobs" / "data.jsonl", [{"inputs": [float(i % 7), 1.0], "label": i % 3} for i in range(30)])
    path = job(tmp_path, '[generate-labels]\nteacher = "mlp:hidden=8,in_features=2,num_classes=3"\n'
                         'data = "data.jsonl"\nout = "store"\nk = 2\nno-progress = true\ndevice = "cpu"\n')
    (tmp_path / "elsewhere").mkdir()
    # -o venv: the venv is there; no install step in a test
    done = subprocess.run(["make", "-s", "-C", str(REPO), "-o", "venv", "labels", f"CONFIG={path}"],
                          cwd=tmp_path / "elsewhere", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "jobs" / "store" / "manifest.json").is_file() and not (REPO / "store").exists()


# --- memory:// ------------------------------------------------------------------------------


def test_a_memory_store_written_by_a_command_gets_a_note_and_one_to_read_is_refused():
    result = invoke("generate-labels", "--teacher", MLP, "--data", MNIST, "--out", "memory://cli-test/store",
                    "--device", "cpu", "--no-progress", "--k", 3)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "memory://" in line]
    assert notes == ["distill: note: --out memory://cli-test/store is held in this process's memory and is gone when "
                     "the command ends: pass a path or an s3:// / gs:// URL to keep it"]
    for args in (["inspect", "memory://cli-test/store"],
                 ["train-student", "--labels", "memory://cli-test/store", "--student", MLP, "--data", MNIST,
                  "--out", "run"]):
        result = invoke(*args)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "memory://cli-test/store cannot hold a store here: memory:// lives only as long as" in result.stderr


# --- one split ---------------------------------------------------------------------------------


def test_only_split_of_each_kind_of_data(tmp_path):
    one = write_jsonl(tmp_path / "held.jsonl", [{"text": "a"}])
    save_hf_dataset(tmp_path / "dd1", splits={"validation": {"text": ["a"]}})
    save_hf_dataset(tmp_path / "dd2", splits={"train": {"text": ["a"]}, "test": {"text": ["b"]}})
    save_hf_dataset(tmp_path / "ds", {"text": ["a"]})
    for name, files in {"plain": ["a.txt", "b.txt"], "valonly": ["validation.jsonl", "notes.md"],
                        "both": ["train.jsonl", "test.jsonl"], "empty": []}.items():
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_text("{}\n")
    found = {k: only_split(str(tmp_path / k)) for k in ("dd1", "dd2", "ds", "plain", "valonly", "both", "empty")}
    assert found == {"dd1": "validation", "dd2": None, "ds": "train", "plain": "train", "valonly": "validation",
                     "both": None, "empty": None}
    assert only_split(str(one)) == "train" and only_split("mnist1d") is None and only_split("nothing_here") is None
    assert only_split("tests.pipeline.datahelp:write_jsonl") == "train"  # a function without a split parameter


def test_choose_split_swaps_only_the_default(tmp_path, capsys):
    one = str(write_jsonl(tmp_path / "held.jsonl", [{"text": "a"}]))
    assert choose_split(one, "test") == "train"
    assert capsys.readouterr().err == (f"distill: note: data {one!r} has one split, 'train', and no 'test': "
                                       "reading 'train' (--split NAME chooses another)\n")
    assert choose_split(one, "validation") == "validation" and choose_split("mnist1d", "test") == "test"
    assert capsys.readouterr().err == ""


GPT = "gpt:d_model=16,n_layers=1,n_heads=2,max_len=32"


def test_a_lone_held_out_file_needs_no_split_flag(tmp_path):
    (tmp_path / "train.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    (tmp_path / "held.txt").write_text("a lazy dog sleeps in the sun all day long. " * 10)
    common = ["--tokenizer", "bytes", "--seq-len", 32, "--device", "cpu", "--no-progress", "--workers", 0]
    run = tmp_path / "run"
    result = invoke("train-teacher", "--model", GPT, "--data", tmp_path / "train.txt", "--eval-data",
                    tmp_path / "held.txt", "--eval-every", 2, "--steps", 2, "--out", run, *common)
    assert result.exit_code == 0, result.output
    note = f"distill: note: data {str(tmp_path / 'held.txt')!r} has one split, 'train', and no 'test': reading 'train' "
    assert note + "(--eval-split NAME chooses another)" in result.stderr
    assert json.loads((run / "config.json").read_text())["eval_split"] == "train"
    assert any("eval" in json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())

    result = invoke("evaluate", "--model", run, "--data", tmp_path / "held.txt", "--json", "--repeats", 1,
                    "--warmup", 0, *common[:-3])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["split"] == "train" and note + "(--split NAME chooses another)" in result.stderr

    result = invoke("train-teacher", "--model", GPT, "--data", tmp_path / "train.txt", "--eval-every", 2,
                    "--steps", 2, "--out", tmp_path / "run2", *common)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and not (tmp_path / "run2").exists()
    assert (f"--eval-every: data {str(tmp_path / 'train.txt')!r} has one split, which is the training data: pass "
            "--eval-data HELD_OUT, or --eval-split NAME to evaluate on that split anyway") in result.stderr


def test_finalize_names_the_missing_shards_and_the_command_that_finishes_them(tmp_path):
    args = ["--teacher", MLP, "--data", MNIST, "--examples-per-shard", 40, "--k", 3, "--device", "cpu", "--no-progress"]
    out = tmp_path / "half"
    assert invoke("generate-labels", *args, "--shard", "0/2", "--out", out).exit_code == 0
    result = invoke("generate-labels", "--finalize", "--out", out)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr == (
        f"distill: error: cannot finalize {out}: 2 shard(s) not complete (shards 1, 3 of 4): rerun generation for them: "
        f"`distill generate-labels --teacher ... --data ... --out {out}` with the same settings and no --shard labels "
        "just these and seals the store (or rerun each --shard I/N task whose I is a shard's number mod N)\n")
    result = invoke("generate-labels", *args, "--out", out, "--json")  # what the message says to run
    assert result.exit_code == 0 and json.loads(result.stdout)["shards_written"] == 2
    assert invoke("inspect", out, "--json").exit_code == 0
