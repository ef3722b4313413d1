"""Every command's flags, its TOML keys and its config dataclass agree, because the flags and keys are made from it."""

import dataclasses

import click
import pytest
from click.testing import CliRunner

from distill.cli import cli
from distill.errors import ConfigError
from distill.pipeline.config import build_config, check_settings, settings

# what each command needs besides the one setting a test sets
REQUIRED = {
    "generate-labels": {"teacher": "mlp", "data": "mnist1d", "out": "store"},
    "import-labels": {"data": "labels.parquet", "out": "store"},
    "train-student": {"labels": "store", "model": "mlp", "data": "mnist1d", "out": "run"},
    "train-teacher": {"model": "mlp", "data": "mnist1d", "out": "run"},
    "evaluate": {"model": "mlp", "data": "mnist1d"},
    "quantize": {"model": "mlp", "out": "q"},
    "report": {"runs": ("run",)},
    "inspect": {"path": "store"},
}
SPECIAL_VALUES = {"shard": "0/2"}  # strings with a grammar of their own
COMPANIONS = {"eval_every": {"eval_split": "test"}}  # settings that need another one
COMMANDS = sorted(REQUIRED)


def command(name: str) -> click.Command:
    cmd = cli.commands[name]
    cmd.get_params(click.Context(cmd))  # loads the options from the config class
    return cmd


def config_class(name: str) -> type:
    return command(name).config_class


def some_value(s):
    """A valid value of the setting ``s`` other than its default, as a TOML file would give it."""
    if s.name in SPECIAL_VALUES:
        return SPECIAL_VALUES[s.name]
    if s.choices is not None:
        value = next(c for c in reversed(s.choices) if c != s.default)
    elif s.type is bool:
        value = not s.default
    elif s.type is int:
        value = int(s.minimum or 0) + 3
    elif s.type is float:
        value = 0.5
    else:
        value = "something"
    return [value] if s.multiple else value


def test_every_stage_command_gets_its_flags_from_a_config_class():
    stage_commands = {name for name, cmd in cli.commands.items() if hasattr(cmd, "config_path")}
    assert stage_commands == set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_field_of_the_config_is_a_declared_setting(name):
    cls = config_class(name)
    declared = {s.name for s in settings(cls)}
    assert declared == {f.name for f in dataclasses.fields(cls)}
    assert all(s.help for s in settings(cls))


@pytest.mark.parametrize("name", COMMANDS)
def test_the_options_are_the_settings(name):
    cmd = command(name)
    cls = cmd.config_class
    options = {p.name: p for p in cmd.params if isinstance(p, click.Option) and p.name not in ("as_json", "config")}
    arguments = {p.name for p in cmd.params if isinstance(p, click.Argument)}
    assert set(options) == {s.name for s in settings(cls) if s.cli}
    assert arguments == {s.name for s in settings(cls) if not s.cli}
    for s in settings(cls):
        if not s.cli:
            continue
        option = options[s.name]
        assert option.opts + option.secondary_opts == [s.flag, *s.aliases]
        assert option.help == s.help_text and (s.default_help is None or f"[default: {s.default_help}]" in option.help)
        assert option.is_flag == (s.type is bool) and option.multiple == s.multiple
        if s.choices is not None:
            assert tuple(option.type.choices) == (*s.choices, *s.value_aliases)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_every_flag_with_its_default(name):
    result = CliRunner().invoke(cli, [name, "--help"], prog_name="distill", terminal_width=400)
    assert result.exit_code == 0
    for s in settings(config_class(name)):
        if s.cli:
            assert s.flag in result.output
            shown = s.help_text.rsplit("[default: ", 1)
            assert len(shown) == 1 or f"[default: {shown[1]}" in result.output


@pytest.mark.parametrize("name", COMMANDS)
def test_each_flag_name_and_field_name_is_a_toml_key_that_sets_its_field(name):
    cls, base = config_class(name), REQUIRED[name]
    for s in settings(cls):
        value = base.get(s.name, some_value(s))
        expected = tuple(value) if s.multiple else s.value_aliases.get(value, value)
        flag = s.flag.removeprefix("--")
        for key in (flag, s.name, s.name.replace("_", "-"), *(a.removeprefix("--") for a in s.aliases)):
            given = (not value) if s.negated and key == flag else value
            others = {k: v for k, v in base.items() if k != s.name} | COMPANIONS.get(s.name, {})
            assert getattr(build_config(cls, {**others, key: given}, {}), s.name) == expected, key


@pytest.mark.parametrize("name", COMMANDS)
def test_an_unknown_toml_key_is_refused_and_the_valid_keys_listed(name):
    cls = config_class(name)
    with pytest.raises(ConfigError) as err:
        build_config(cls, {**REQUIRED[name], "no-such-key": 1}, {}, source="job.toml")
    message = str(err.value)
    assert message.startswith("job.toml: unknown key 'no-such-key'")
    flags = [f.removeprefix("--") for s in settings(cls) for f in (s.flag, *s.aliases)]
    assert all(key in message for key in flags) and "\n" not in message


def test_choice_lists_are_the_registries_themselves():
    from distill.pipeline.losses import LOSS_NAMES
    from distill.pipeline.runtime import PRECISIONS, TRAINING_PRECISIONS
    from distill.pipeline.tasks import TASKS
    from distill.stages import quantize
    from distill.storage import BACKENDS, METHODS, VALUE_ENCODINGS

    def choices(name, field):
        return next(s.choices for s in settings(config_class(name)) if s.name == field)

    assert choices("generate-labels", "method") is METHODS and choices("generate-labels", "backend") is BACKENDS
    assert choices("generate-labels", "value_encoding") is VALUE_ENCODINGS
    assert choices("train-student", "loss") is LOSS_NAMES and choices("quantize", "method") is quantize.METHODS
    assert choices("train-teacher", "task") is TASKS and choices("evaluate", "precision") is PRECISIONS
    assert choices("train-student", "precision") is TRAINING_PRECISIONS


def test_the_checks_apply_to_the_python_api_too():
    cls = config_class("generate-labels")
    with pytest.raises(ConfigError, match="unknown --method 'argmax': use topk, sample"):
        cls(**REQUIRED["generate-labels"], method="argmax")
    with pytest.raises(ConfigError, match="--batch-size must be at least 1, got 0"):
        cls(**REQUIRED["generate-labels"], batch_size=0)
    old = cls(**REQUIRED["generate-labels"], dtype="bfloat16")  # generate-labels' old name and values
    assert old.precision == "bf16" and cls(**REQUIRED["generate-labels"], precision="float16").precision == "fp16"
    check_settings(old)  # idempotent


def test_old_spellings_still_work_on_the_command_line_and_in_files(tmp_path):
    cls = config_class("generate-labels")
    assert build_config(cls, {**REQUIRED["generate-labels"], "dtype": "float32", "temperature": [1, 3],
                              "no-progress": True}, {}).precision == "fp32"
    config = build_config(cls, {**REQUIRED["generate-labels"], "temperature": [1, 3], "no-progress": True}, {})
    assert config.temperatures == (1.0, 3.0) and config.progress is False
    result = CliRunner().invoke(cli, ["generate-labels", "--dtype", "nonsense"], prog_name="distill")
    assert result.exit_code == 2 and "Invalid value for '--precision' / '--dtype'" in result.stderr
