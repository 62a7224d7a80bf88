"""The one source of refinement options (edkit.refine.options) and the CLI flags made from it.

Cheap: no Refinement is built; the CLI is only parsed, or stopped at its input checks.
"""

import dataclasses
import json
import typing

import pytest

from edkit import cli
from edkit.cli.flags import options_of
from edkit.errors import EdkitError
from edkit.refine import options as opts
from edkit.refine.options import (
    GROUPS,
    THICKNESS_KINDS,
    RefinementOptions,
    options_from,
    options_json,
    parse_memory,
)
from edkit.refine.planner import AUTO_SINGLE_BEAMS
from edkit.simulate import frames, pattern

CLI_FIELDS = [f for f in dataclasses.fields(RefinementOptions) if f.metadata["cli"]]


def test_literals_are_the_one_list_of_choices() -> None:
    assert GROUPS == ("positions", "adp", "occupancy", "orientation", "absorption", "thickness")
    assert THICKNESS_KINDS == typing.get_args(opts.ThicknessKind)
    assert opts.CHOICES["precision"] == ("auto", "double", "single")
    precision = next(f for f in dataclasses.fields(opts.RefinementOptions) if f.name == "precision")
    assert f"{AUTO_SINGLE_BEAMS} beams" in precision.metadata["help"]
    assert opts.CHOICES["objective"] == ("jana", "wr2")


def test_one_default_resolution_limit() -> None:
    assert RefinementOptions().g_max == frames.DEFAULT_G_MAX == pattern.DEFAULT_G_MAX == 1.6


def test_every_field_documented() -> None:
    for option in dataclasses.fields(RefinementOptions):
        assert option.metadata["help"], option.name
        assert "units" in option.metadata and "cli" in option.metadata, option.name
        if option.default is None:
            assert option.metadata["none"], option.name


def test_defaults() -> None:
    o = RefinementOptions()
    assert o.refine == ("positions", "adp", "thickness", "orientation")
    assert (o.thickness, o.sg_max, o.sg_weak, o.bethe_terms) == ("profile-net", 0.005, 0.03, 12)
    assert (o.remat, o.memory_limit, o.chunk_frames) == (None, None, None)
    assert set(opts.DEFAULT_LEARNING_RATES) == set(GROUPS)


def test_unknown_keyword_suggests_the_closest() -> None:
    with pytest.raises(EdkitError, match=r"unknown refinement option 'thicknes'; did you mean "):
        options_from(thicknes="wedge")
    with pytest.raises(EdkitError, match=r"'memory_limt'; did you mean 'memory_limit'\?"):
        options_from(memory_limt=1e9)
    with pytest.raises(EdkitError, match=r"'zzz'; expected one of \('refine', "):
        options_from(zzz=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"refine": "position"}, r"refine = \('position',\): unknown group\(s\) \['position'\]"),
        ({"thickness": "slab"}, r"thickness = 'slab': expected one of \('constant', "),
        ({"objective": "R1"}, r"objective = 'R1': expected one of \('jana', 'wr2'\)"),
        ({"precision": "half"}, r"precision = 'half': expected one of"),
        ({"absorption": -0.1}, r"absorption = -0.1: expected κ ≥ 0 or None"),
        ({"refine": ["absorption"]}, r"refine includes 'absorption' but absorption is None"),
        ({"remat": "all"}, r"remat = 'all': expected False, True, 'eigensystems' or None"),
        ({"memory_limit": 0}, r"memory_limit = 0: expected a size > 0 bytes"),
        ({"chunk_frames": 0}, r"chunk_frames = 0: expected an integer ≥ 1"),
        ({"chunk_frames": 2.5}, r"chunk_frames = 2.5: expected an integer ≥ 1"),
        ({"n_sub": 0}, r"n_sub = 0: expected an integer ≥ 1"),
        ({"g_max": 0.0}, r"g_max = 0.0: expected a resolution limit > 0 Å⁻¹"),
        ({"sg_max": float("nan")}, r"sg_max = nan: expected an excitation error > 0 Å⁻¹"),
        ({"batch_size": 0}, r"batch_size = 0: expected an integer ≥ 1"),
        ({"devices": 0}, r"devices = 0: expected an integer ≥ 1"),
        ({"devices": True}, r"devices = True: expected an integer ≥ 1"),
        ({"validation_fraction": 1.0}, r"validation_fraction = 1.0: expected a fraction"),
        ({"learning_rates": {"xyz": 1e-3}}, r"learning_rates: unknown group\(s\) \['xyz'\]"),
        ({"learning_rates": {"adp": -1.0}}, r"learning_rates\['adp'\] = -1.0: expected a rate"),
        ({"thickness_grid": (100.0, 50.0, 5.0)}, r"thickness_grid = \(100.0, 50.0, 5.0\)"),
    ],
)
def test_bad_values_name_option_value_and_expectation(kwargs, match) -> None:
    with pytest.raises(EdkitError, match=match):
        options_from(**kwargs)


def test_lists_become_tuples_and_str_refine_a_1_tuple() -> None:
    o = options_from(refine="adp", thickness_grid=[10, 100, 5])
    assert o.refine == ("adp",) and o.thickness_grid == (10, 100, 5)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("8G", 8e9), ("8GB", 8e9), ("8 GiB", 8 * 2**30), ("8gib", 8 * 2**30), ("500M", 5e8),
        ("1.5T", 1.5e12), ("1.5 TiB", 1.5 * 2**40), ("1024", 1024.0), ("64KiB", 65536.0),
        ("2e9", 2e9), (3_000_000, 3e6), (2.5e9, 2.5e9),
    ],
)  # fmt: skip
def test_parse_memory(text, size) -> None:
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["8X", "", "G", "-1G", "0", "nan", "inf", "8 G B", float("inf")])
def test_parse_memory_rejects(text) -> None:
    with pytest.raises(EdkitError, match=r"memory size .*: expected"):
        parse_memory(text)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {
            "refine": ["positions", "absorption"], "absorption": 0.05, "sg_weak": None,
            "bethe_terms": None, "n_sub": 7, "learning_rates": {"adp": 1e-3},
            "thickness_grid": [40.0, 400.0, 20.0], "remat": "eigensystems",
            "memory_limit": parse_memory("8G"), "chunk_frames": 4, "precision": "single",
        },
    ],
)  # fmt: skip
def test_json_round_trip(kwargs) -> None:
    options = options_from(**kwargs)
    text = json.dumps(options_json(options))
    assert options_from(**json.loads(text)) == options
    assert json.loads(text)["refine"] == list(options.refine)


def _help(command: str, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "2000")  # no wrapping inside help texts
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _entries(text: str) -> dict[str, str]:
    """Each flag's help entry in one line (argparse starts long ones on the next line)."""
    entries: dict[str, str] = {}
    flag = None
    for line in text.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0]
            entries[flag] = line
        elif flag and line.startswith("   "):
            entries[flag] += " " + line.strip()
        else:
            flag = None
    return entries


@pytest.mark.parametrize("option", CLI_FIELDS, ids=lambda f: f.name)
def test_every_option_flag_in_help_with_its_default(option, capsys, monkeypatch) -> None:
    line = _entries(_help("refine", capsys, monkeypatch))[option.metadata["cli"]]
    default = option.default
    shown = (
        option.metadata["none"] if default is None
        else ",".join(default) if isinstance(default, tuple) else str(default)
    )  # fmt: skip
    assert f"(default: {shown}" in line
    if option.metadata["units"] not in ("", "1") and default is not None:
        assert f"(default: {shown} {option.metadata['units']})" in line
    if option.name in opts.CHOICES and option.name != "refine":
        assert "{" + ",".join(opts.CHOICES[option.name]) + "}" in line


def test_every_flag_kept(capsys, monkeypatch) -> None:
    text = _help("refine", capsys, monkeypatch)
    flags = (
        "--structure --data --out --steps --thickness --absorption --refine-absorption --g-max "
        "--sg-max --sg-weak --bethe-terms --low-memory --refine --n-sub --seed --every --devices "
        "--precision --lm-rounds --lm-iterations --polish-steps --quiet --memory-limit "
        "--chunk-frames --max-steps --warmup-steps --structure-delay --checkpoint-every --resume "
        "--kinematic-start --no-kinematic-start"
    ).split()
    for flag in flags:
        assert f" {flag}" in text, flag
    demo = _help("demo", capsys, monkeypatch)
    assert "every N-th frame only (default: 3)" in demo  # demo's own --every
    assert "default: until converged" in demo  # the demo runs the default recipe


def _args(*flags: str):
    return cli._parser().parse_args(["refine", "--structure", "s.cif", "--data", "d", *flags])


def test_flags_to_refinement_keywords() -> None:
    assert options_of(_args()) == {}  # all defaults: Refinement's own
    kwargs = options_of(
        _args(
            "--refine", "positions, adp", "--absorption", "--refine-absorption",
            "--sg-weak", "0", "--bethe-terms", "0", "--low-memory", "--memory-limit", "8G",
            "--chunk-frames", "4", "--g-max", "1.2", "--precision", "single", "--n-sub", "5",
        )
    )  # fmt: skip
    assert kwargs == {
        "refine": ("positions", "adp", "absorption"), "absorption": 0.05, "sg_weak": None,
        "bethe_terms": None, "remat": "eigensystems", "memory_limit": 8e9, "chunk_frames": 4,
        "g_max": 1.2, "precision": "single", "n_sub": 5,
    }  # fmt: skip
    assert options_of(_args("--absorption", "0.1"))["absorption"] == 0.1
    # the kinematical start: "auto" unless a flag says always or never
    assert options_of(_args("--kinematic-start")) == {"kinematic_start": True}
    assert options_of(_args("--no-kinematic-start")) == {"kinematic_start": False}


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--devices", "0"], "edkit: error: --devices: devices = 0: expected an integer ≥ 1"),
        (["--refine", "positions,foo"], "edkit: error: --refine: refine = ('positions', 'foo')"),
        (["--chunk-frames", "0"], "edkit: error: --chunk-frames: chunk_frames = 0"),
    ],
)
def test_bad_flag_values_exit_code_2(flags, match, capsys) -> None:
    code = cli.main(["refine", "--structure", "s.cif", "--data", "d", *flags])
    assert code == 2
    assert capsys.readouterr().err.startswith(match)


def test_bad_memory_limit_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["refine", "--structure", "s.cif", "--data", "d", "--memory-limit", "8X"])
    assert exit_.value.code == 2
    assert "argument --memory-limit: memory size '8X': expected" in capsys.readouterr().err


def test_missing_input_file_one_line_exit_code_2(tmp_path, capsys) -> None:
    missing = tmp_path / "missing.cif"
    code = cli.main(["refine", "--structure", str(missing), "--data", str(missing)])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"edkit: error: --structure {missing}: no such file\n"
