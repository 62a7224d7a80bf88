"""``edkit config``, ``--config FILE``, ``edkit validate`` and the help of every option."""

import argparse
import contextlib
import io
import tomllib

import pytest

from edkit.cli import _parser, _subparser, main
from edkit.cli.config import apply_config, read_config
from edkit.cli.flags import OPTION_FIELDS, options_of
from edkit.errors import EdkitError


def _run(argv: list[str]) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def files(data_dir):
    return {
        "structure": data_dir / "structures" / "quartz_kinematical.cif",
        "data": data_dir / "pets" / "quartz_experimental.cif_pets",
    }


def test_every_subcommand_and_option_has_help_with_its_default() -> None:
    parser = _parser()
    for name in ("refine", "validate", "demo"):
        sub = _subparser(parser, name)
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (name, action.dest)
            if isinstance(action, argparse._StoreTrueAction) or action.dest in (
                "structure",
                "data",
            ):
                continue  # a switch (off unless given), or a required file
            assert "default" in action.help, (name, action.dest, action.help)
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for choice in subcommands._choices_actions:
        assert choice.help, choice.dest


def test_the_template_is_valid_toml_and_changes_no_default(tmp_path) -> None:
    code, text, _ = _run(["config"])
    assert code == 0
    parsed = tomllib.loads(text)
    refine = _subparser(_parser(), "refine")
    for field in OPTION_FIELDS:  # every option is in it, set or commented out
        assert f"{field.name} = " in text, field.name
    path = tmp_path / "refine.toml"
    path.write_text(text)
    values = read_config(path, refine)
    assert set(values) == set(parsed)
    defaults = vars(_parser().parse_args(["refine"]))
    for key, value in values.items():
        assert value == defaults[key], key


def test_config_values_apply_and_flags_win(tmp_path, files) -> None:
    path = tmp_path / "refine.toml"
    path.write_text(
        f'structure = "{files["structure"]}"\ndata = "{files["data"]}"\n'
        'g_max = 1.0\nn_sub = 5\nrefine = ["positions", "thickness"]\nevery = 33\n'
        'memory_limit = "6G"\nrestraints = ["DFIX 1.61 Si1 O1", "RIGU"]\n'
        "kinematic_start = false\n"
    )
    parser = _parser()
    args = parser.parse_args(["refine", "--config", str(path), "--g-max", "1.2"])
    apply_config(args, _subparser(parser, "refine"), vars(parser.parse_args(["refine"])))
    options = options_of(args)
    assert options["g_max"] == 1.2  # the flag wins
    assert options["n_sub"] == 5 and options["refine"] == ("positions", "thickness")
    assert options["memory_limit"] == 6e9
    assert options["restraints"] == ("DFIX 1.61 Si1 O1", "RIGU")
    assert options["kinematic_start"] is False
    flagged = parser.parse_args(["refine", "--restrain", "SIMU", "--restrain", "RIGU 0.01"])
    assert options_of(flagged)["restraints"] == ("SIMU", "RIGU 0.01")
    assert "riding_uiso" not in options  # the default (riding Uiso) is left to Refinement
    assert options_of(parser.parse_args(["refine", "--fixed-h-uiso"]))["riding_uiso"] is False
    assert args.every == 33 and args.structure == str(files["structure"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("g_mx = 1.0\n", r"refine.toml, line 1: 'g_mx' is not an option .* did you mean 'g_max'"),
        ("\n\nn_sub = 2.5\n", r"line 3: n_sub = 2.5"),
        ('thickness = "cubic"\n', r"line 1: thickness = 'cubic': expected one of"),
        ("g_max = \n", r"refine.toml: not valid TOML: .*line 1"),
        ("quiet = 1\n", r"quiet = 1: expected true or false"),
        ("restraints = [1.6]\n", r"restraints = \[1.6\]: expected a list of instructions"),
        ('kinematic_start = "yes"\n', r"line 1: kinematic_start = 'yes': expected true, false"),
        ("segment_tails = 1\n", r"segment_tails = 1: expected true, false$"),
    ],
)
def test_bad_configs_name_the_file_key_and_line(tmp_path, text, message) -> None:
    path = tmp_path / "refine.toml"
    path.write_text(text)
    with pytest.raises(EdkitError, match=message):
        read_config(path, _subparser(_parser(), "refine"))
    code, _, stderr = _run(["refine", "--config", str(path)])
    assert code == 2 and stderr.startswith("edkit: error: ")


def test_validate_reports_beams_memory_and_time_without_refining(files, tmp_path) -> None:
    argv = ["validate", "--structure", str(files["structure"]), "--data", str(files["data"])]
    code, stdout, stderr = _run([*argv, "--every", "10", "--out", str(tmp_path / "out")])
    assert code == 0, stderr
    assert "10 frames" in stdout and "scored" in stdout
    assert "beams per frame" in stdout and "memory plan" in stdout.lower()
    assert "an Adam step ≈" in stdout and stdout.rstrip().endswith("would start")
    assert "a least-squares iteration (" in stdout and "iteration(s), the s.u.'s ≈" in stdout
    assert not (tmp_path / "out").exists()  # nothing written
    assert "kinematical start: made if the model fits the first thickness search" in stdout
    for flag, says in (("--kinematic-start", "made before"), ("--no-kinematic-start", "none")):
        code, stdout, stderr = _run([*argv, "--every", "10", flag])
        assert code == 0 and f"kinematical start: {says}" in stdout, stderr
    code, _, stderr = _run([*argv[:3], "--data", str(tmp_path / "missing.cif_pets")])
    assert code == 2 and "missing.cif_pets: no such file" in stderr
