"""PETS2 reader and writer: layout, units, round trips, every bad-input case (style.md §5, §7)."""

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from edkit import schema
from edkit.constants import electron_wavelength
from edkit.errors import EdkitError
from edkit.io.pets import cell_parameters, read_pets, write_pets

FILES = ["quartz_experimental", "quartz_synthetic", "glycine_dyn", "albite"]


@pytest.fixture(scope="module")
def pets_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "edkit" / "data" / "pets"


@pytest.fixture(scope="module")
def datasets(pets_dir: Path) -> dict[str, xr.Dataset]:
    return {name: read_pets(pets_dir / f"{name}.cif_pets") for name in FILES}


@pytest.fixture(scope="module")
def quartz_text(pets_dir: Path) -> str:
    return (pets_dir / "quartz_experimental.cif_pets").read_text()


def _write(tmp_path: Path, text: str, name: str = "bad.cif_pets") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _without_provenance(ds: xr.Dataset) -> xr.Dataset:
    out = ds.copy()
    for key in schema.PROVENANCE_ATTRS:
        out.attrs.pop(key, None)
    return out


def _line_of(text: str, needle: str) -> int:
    """1-based line number of the first line containing ``needle``."""
    for i, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return i
    raise AssertionError(needle)


# ---------------------------------------------------------------------------------------------
# layout


def _count_loop_rows(text: str, last_tag: str) -> int:
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if line.strip() == last_tag) + 1
    n = 0
    while i < len(lines) and lines[i].strip() and not lines[i].lstrip().startswith(("_", "loop_")):
        n += 1
        i += 1
    return n


@pytest.mark.parametrize("name", FILES)
def test_sizes_match_the_file(name: str, datasets, pets_dir: Path) -> None:
    text = (pets_dir / f"{name}.cif_pets").read_text()
    ds = datasets[name]
    assert ds.sizes["frame"] == _count_loop_rows(text, "_diffrn_zone_axis_scale")
    assert ds.sizes["refl"] == _count_loop_rows(text, "_refln_zone_axis_id")
    assert ds.sizes["uvw"] == 3


def test_quartz_experimental_counts(datasets) -> None:
    """science.md §9: 99 frames, 6666 reflections, 200 kV, θ = 1°."""
    ds = datasets["quartz_experimental"]
    assert ds.sizes == {"frame": 99, "refl": 6666, "uvw": 3, "ub_row": 3, "ub_col": 3}
    assert float(ds.voltage) == 200e3
    np.testing.assert_array_equal(ds.semiangle.values, 1.0)
    np.testing.assert_array_equal(ds.frame.values, np.arange(1, 100))
    assert ds.attrs["geometry"] == "continuous rotation"
    # first and last rows of the file
    first = ds.isel(refl=0)
    assert (int(first.h), int(first.k), int(first.l), int(first.frame_id)) == (2, -3, -8, 1)
    assert (float(first.I_obs), float(first.sigma)) == (146.10, 114.69)
    last = ds.isel(refl=-1)
    assert (int(last.h), int(last.k), int(last.l), int(last.frame_id)) == (-4, 2, 7, 99)
    np.testing.assert_array_equal(ds.zone_axis.isel(frame=0).values, [-1.0, 0.07564, -0.28404])
    assert float(ds.alpha[0]) == -49.197 and float(ds.omega[0]) == 0.287
    assert float(ds.UB[1, 2]) == 0.05362  # _diffrn_orient_matrix_UB_23
    np.testing.assert_array_equal(cell_parameters(ds), [4.9226, 4.9226, 5.4003, 90, 90, 120])
    assert float(ds.rotation_axis_position) == 0.484
    assert float(ds.mosaicity) == 0.05 and float(ds.dstarmax) == 1.8
    assert "RC width:  0.00100" in ds.attrs["measurement_details"]
    assert "Original zones file" in ds.attrs["comments"]


@pytest.mark.parametrize("name", FILES)
def test_dtypes_units_and_names(name: str, datasets) -> None:
    ds = datasets[name]
    for var in ("h", "k", "l", "frame_id", "frame"):
        assert ds[var].dtype == np.int64, var
    for var_name, var in ds.variables.items():
        spec = schema.VARIABLES[str(var_name)]
        assert var.dims == spec.dims, var_name
        assert var.attrs["long_name"] == spec.long_name
        if var.dtype.kind == "f":
            assert var.dtype == np.float64, var_name
            assert var.attrs["units"] == spec.units, var_name
    assert ds.wavelength.attrs["units"] == "angstrom"
    assert ds.voltage.attrs["units"] == "V"
    assert ds.alpha.attrs["units"] == "degree"
    assert ds.UB.attrs["units"] == "1/angstrom"
    for key, value in ds.attrs.items():
        assert isinstance(value, str), key
    assert ds.attrs["geometry"] in ("continuous rotation", "precession")


def test_voltage_from_wavelength(datasets) -> None:
    for ds in datasets.values():
        assert float(ds.voltage) == 200e3  # 0.02508 / 0.02510 Å snap to 200 kV (science.md §2)


def test_extra_items_are_kept(datasets) -> None:
    assert datasets["albite"].attrs["extra_cif"] == "_diffrn_pets_omega 0.00000"
    extra = datasets["quartz_synthetic"].attrs["extra_cif"]
    assert extra.startswith("loop_\n_orientation_rotation_index")
    assert "_atom_site_label" in extra and "Si1 Si 1.000000 0.471800 0.833333 1.0" in extra
    assert "number of merged frames: 50" in datasets["albite"].attrs["measurement_details"]


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("name", FILES)
def test_netcdf_round_trip(name: str, datasets, tmp_path: Path) -> None:
    ds = datasets[name]
    path = tmp_path / f"{name}.nc"
    ds.to_netcdf(path, engine="h5netcdf")
    with xr.open_dataset(path, engine="h5netcdf") as back:
        xr.testing.assert_identical(back.load(), ds)


@pytest.mark.parametrize("name", FILES)
def test_write_round_trip(name: str, datasets, tmp_path: Path) -> None:
    ds = datasets[name]
    path = tmp_path / f"{name}.cif_pets"
    write_pets(ds, path)
    back = read_pets(path)
    assert back.attrs["source_file"] == str(path)
    xr.testing.assert_identical(_without_provenance(back), _without_provenance(ds))
    # and a second generation is byte-identical
    path2 = tmp_path / f"{name}_2.cif_pets"
    write_pets(back, path2)
    assert path2.read_text() == path.read_text()


def test_write_keeps_every_digit(datasets, tmp_path: Path) -> None:
    """Synthetic data (full float64 values, other voltage, precession) survive write → read."""
    rng = np.random.default_rng(0)
    ds = datasets["glycine_dyn"].copy(deep=True)
    for var in ("I_obs", "sigma"):
        ds[var].values = rng.uniform(0, 1e5, ds.sizes["refl"]) * rng.choice([1e-9, 1.0, 1e9])
    ds["I_obs"].values[::7] *= -1  # negative background-subtracted intensities are fine
    for var in ("alpha", "beta", "omega", "pets_scale"):
        ds[var].values = rng.normal(size=ds.sizes["frame"]) * 37.0
    ds["zone_axis"].values = rng.normal(size=(ds.sizes["frame"], 3))
    ds["UB"].values = rng.normal(size=(3, 3)) / 3
    ds["wavelength"].values = np.float64(electron_wavelength(300e3))
    ds["voltage"].values = np.float64(300e3)
    ds["cell_gamma"].values = np.float64(np.pi * 30)
    ds.attrs["geometry"] = "precession"
    del ds.attrs["measurement_details"]
    ds = ds.drop_vars(["mosaicity"])
    path = tmp_path / "synthetic.cif_pets"
    write_pets(ds, path)
    back = read_pets(path)
    assert "mosaicity" not in back
    assert float(back.voltage) == pytest.approx(300e3, rel=1e-12)
    back["voltage"] = ds["voltage"]  # voltage is derived from λ; compare the rest exactly
    xr.testing.assert_identical(_without_provenance(back), _without_provenance(ds))


def test_write_rejects_bad_datasets(datasets, tmp_path: Path) -> None:
    ds = datasets["glycine_dyn"]
    path = tmp_path / "out.cif_pets"
    with pytest.raises(EdkitError, match="no variable 'UB'"):
        write_pets(ds.drop_vars("UB"), path)
    bad = ds.copy(deep=True)
    bad["I_obs"].values[3] = np.nan
    with pytest.raises(EdkitError, match="I_obs holds NaN"):
        write_pets(bad, path)
    bad = ds.copy(deep=True)
    bad["sigma"].values[3] = -1.0
    with pytest.raises(EdkitError, match="sigma has negative values"):
        write_pets(bad, path)
    bad = ds.copy(deep=True)
    bad["voltage"] = ds.voltage * 0 + 120e3
    with pytest.raises(EdkitError, match="disagrees with wavelength"):
        write_pets(bad, path)
    bad = ds.copy(deep=True)
    bad["frame_id"].values[0] = 999
    with pytest.raises(EdkitError, match="frame_id 999 is not a frame"):
        write_pets(bad, path)
    bad = ds.copy()
    bad.attrs["geometry"] = "tilt series"
    with pytest.raises(EdkitError, match="geometry"):
        write_pets(bad, path)


# ---------------------------------------------------------------------------------------------
# tolerated oddities


def test_repeated_scalar_tag_first_value_wins(quartz_text: str, tmp_path: Path) -> None:
    text = quartz_text.replace(
        "_cell_length_c                   5.4003\n",
        "_cell_length_c                   5.4003\n_cell_length_a  9.9999\n",
    )
    line = _line_of(text, "9.9999")
    ds = read_pets(_write(tmp_path, text))
    assert float(ds.cell_a) == 4.9226
    assert f"line {line}: repeated _cell_length_a ignored" in ds.attrs["read_notes"]
    assert "line 2" in ds.attrs["read_notes"]


def test_repeated_text_field_first_wins(quartz_text: str, tmp_path: Path) -> None:
    block = "_diffrn_measurement_details\n;\ndata collection geometry: precession\n;\n"
    text = quartz_text.replace("loop_\n", block + "loop_\n", 1)
    ds = read_pets(_write(tmp_path, text))
    assert ds.attrs["geometry"] == "continuous rotation"
    assert "repeated _diffrn_measurement_details" in ds.attrs["read_notes"]


def test_crlf_and_no_trailing_newline(quartz_text: str, tmp_path: Path) -> None:
    path = tmp_path / "crlf.cif_pets"
    path.write_bytes(quartz_text.rstrip("\n").replace("\n", "\r\n").encode())
    ds = read_pets(path)
    assert ds.sizes["refl"] == 6666
    assert ds.attrs["measurement_details"] == "RC width:  0.00100\nreflection size:   10.000"


# ---------------------------------------------------------------------------------------------
# bad input: every message names the file, the tag and the line


def _cut_loop(text: str, first_tag: str) -> str:
    """Remove the loop whose first tag is ``first_tag`` (header and rows)."""
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip() == first_tag) - 1
    end = start + 1
    while end < len(lines) and lines[end].strip() and not lines[end].startswith("loop_"):
        end += 1
    return "".join(lines[:start] + lines[end:])


def _replace_line(text: str, line: int, new: str) -> str:
    lines = text.splitlines(keepends=True)
    lines[line - 1] = new + "\n"
    return "".join(lines)


def test_missing_reflection_loop(quartz_text: str, tmp_path: Path) -> None:
    path = _write(tmp_path, _cut_loop(quartz_text, "_refln_index_h"))
    with pytest.raises(EdkitError, match=rf"{path}: no reflection loop .*_refln_index_h"):
        read_pets(path)


def test_missing_zone_axis_loop(quartz_text: str, tmp_path: Path) -> None:
    path = _write(tmp_path, _cut_loop(quartz_text, "_diffrn_zone_axis_id"))
    with pytest.raises(EdkitError, match=rf"{path}: no zone-axis loop .*_diffrn_zone_axis_id"):
        read_pets(path)


def test_missing_loop_column(quartz_text: str, tmp_path: Path) -> None:
    text = quartz_text.replace("_refln_intensity_sigma\n", "_refln_intensity_sigmaX\n")
    line = _line_of(text, "_refln_index_h") - 1
    path = _write(tmp_path, text)
    with pytest.raises(EdkitError, match=rf":{line}: the reflection loop has no column .*sigma"):
        read_pets(path)


def test_missing_ub_element(quartz_text: str, tmp_path: Path) -> None:
    path = _write(tmp_path, quartz_text.replace("_diffrn_orient_matrix_UB_23  0.05362\n", ""))
    with pytest.raises(EdkitError, match=rf"{path}: missing _diffrn_orient_matrix_UB_23"):
        read_pets(path)


def test_non_numeric_scalar(quartz_text: str, tmp_path: Path) -> None:
    text = quartz_text.replace("_cell_length_c                   5.4003", "_cell_length_c  5.4O03")
    path = _write(tmp_path, text)
    with pytest.raises(EdkitError, match=rf"{path}:4: _cell_length_c = '5.4O03' is not a finite"):
        read_pets(path)


def test_impossible_cell(quartz_text: str, tmp_path: Path) -> None:
    text = quartz_text.replace("_cell_angle_gamma                120", "_cell_angle_gamma  30")
    text = text.replace("_cell_angle_alpha                90", "_cell_angle_alpha  150")
    path = _write(tmp_path, text)
    line = _line_of(text, "_cell_angle_alpha")
    with pytest.raises(EdkitError, match=rf"{path}:{line}: cell angles 150.0, 90.0, 30.0 .*volume"):
        read_pets(path)
    text = quartz_text.replace("_cell_angle_gamma                120", "_cell_angle_gamma  190")
    with pytest.raises(EdkitError, match=r":7: _cell_angle_gamma = 190.0 is not a valid cell"):
        read_pets(_write(tmp_path, text))


def test_reflection_on_unknown_frame(quartz_text: str, tmp_path: Path) -> None:
    line = _line_of(quartz_text, "  1  -1  -4    42631.14")
    text = _replace_line(quartz_text, line, "   1  -1  -4    42631.14      519.82   100")
    path = _write(tmp_path, text)
    with pytest.raises(
        EdkitError,
        match=rf"{path}:{line}: _refln_zone_axis_id \(row 11\) = 100 has no frame",
    ):
        read_pets(path)


@pytest.mark.parametrize(
    ("bad", "tag", "expected"),
    [
        ("abc", "_refln_intensity_meas", "a finite number"),
        ("nan", "_refln_intensity_meas", "a finite number"),
        ("inf", "_refln_intensity_meas", "a finite number"),
        ("?", "_refln_intensity_meas", "a finite number"),
    ],
)
def test_bad_reflection_value(
    bad: str, tag: str, expected: str, quartz_text: str, tmp_path: Path
) -> None:
    line = _line_of(quartz_text, "  1  -1  -4    42631.14")
    text = _replace_line(quartz_text, line, f"   1  -1  -4    {bad}      519.82     1")
    path = _write(tmp_path, text)
    with pytest.raises(EdkitError, match=rf"{path}:{line}: {tag} \(row 11\) = '\S+' is not"):
        read_pets(path)


def test_bad_index(quartz_text: str, tmp_path: Path) -> None:
    line = _line_of(quartz_text, "  1  -1  -4    42631.14")
    text = _replace_line(quartz_text, line, "   1  -1.5  -4    42631.14      519.82     1")
    path = _write(tmp_path, text)
    with pytest.raises(EdkitError, match=rf":{line}: _refln_index_k \(row 11\) = '-1.5' is not an"):
        read_pets(path)


def test_bad_frame_value(quartz_text: str, tmp_path: Path) -> None:
    line = _line_of(quartz_text, "   3 -1.00000  0.12510")
    text = _replace_line(
        quartz_text,
        line,
        "   3 -1.00000  0.12510 -0.28591     1.000   NaN    -0.230     0.249     0.700",
    )
    path = _write(tmp_path, text)
    with pytest.raises(EdkitError, match=rf":{line}: _diffrn_zone_axis_alpha \(row 3\) = 'NaN'"):
        read_pets(path)


def test_duplicate_frame_id(quartz_text: str, tmp_path: Path) -> None:
    line = _line_of(quartz_text, "   3 -1.00000  0.12510")
    text = quartz_text.replace("   3 -1.00000  0.12510", "   2 -1.00000  0.12510")
    path = _write(tmp_path, text)
    with pytest.raises(EdkitError, match=rf":{line}: _diffrn_zone_axis_id 2 appears twice"):
        read_pets(path)


def test_negative_sigma(quartz_text: str, tmp_path: Path) -> None:
    line = _line_of(quartz_text, "  1  -1  -4    42631.14")
    text = _replace_line(quartz_text, line, "   1  -1  -4    42631.14      -519.82     1")
    path = _write(tmp_path, text)
    with pytest.raises(
        EdkitError, match=rf"{path}:{line}: _refln_intensity_sigma \(row 11\) = -519.82 is negative"
    ):
        read_pets(path)


def test_empty_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "\n  \n")
    with pytest.raises(EdkitError, match=rf"{path}: the file is empty"):
        read_pets(path)


def test_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "image.cif_pets"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(EdkitError, match=rf"{path}: binary content"):
        read_pets(path)


def test_not_cif(tmp_path: Path) -> None:
    path = _write(tmp_path, "hello, this is not a CIF file\n")
    with pytest.raises(EdkitError, match=rf"{path}: not readable as CIF: line 1"):
        read_pets(path)


def test_missing_rotation_axis_position(quartz_text: str, tmp_path: Path) -> None:
    text = quartz_text.replace("rotation axis position:    0.484\n", "")
    path = _write(tmp_path, text)
    line = _line_of(text, "_diffrn_measurement_details")
    with pytest.raises(
        EdkitError,
        match=rf"{path}:{line}: _diffrn_measurement_details has no 'rotation axis position:'",
    ):
        read_pets(path)


def test_bad_rotation_axis_position(quartz_text: str, tmp_path: Path) -> None:
    text = quartz_text.replace("rotation axis position:    0.484", "rotation axis position: x")
    path = _write(tmp_path, text)
    line = _line_of(text, "rotation axis position")
    with pytest.raises(EdkitError, match=rf"{path}:{line}: .*rotation axis position = 'x'"):
        read_pets(path)


def test_unknown_geometry(quartz_text: str, tmp_path: Path) -> None:
    text = quartz_text.replace("geometry: continuous rotation", "geometry: tilt series")
    path = _write(tmp_path, text)
    line = _line_of(text, "geometry: tilt series")
    with pytest.raises(EdkitError, match=rf"{path}:{line}: .*geometry = 'tilt series'"):
        read_pets(path)


def test_truncated_in_reflection_loop(quartz_text: str, tmp_path: Path) -> None:
    """Cut mid-row: gemmi sees a value count that is not a multiple of the tag count."""
    line = _line_of(quartz_text, "  1  -1  -4    42631.14")
    cut = "".join(quartz_text.splitlines(keepends=True)[: line - 1]) + "   1  -1  -4    426"
    path = _write(tmp_path, cut)
    with pytest.raises(
        EdkitError,
        match=rf"{path}:{line}: reflection loop \(_refln_index_h … _refln_zone_axis_id\) "
        r"row 11 has 4 values, expected 6: the file is truncated",
    ):
        read_pets(path)


def test_short_row_with_whole_cell_count(quartz_text: str, tmp_path: Path) -> None:
    """A short row and a long row: the loop's cell count is a multiple of 6, rows are not."""
    line = _line_of(quartz_text, "  1  -1  -4    42631.14")
    text = _replace_line(quartz_text, line, "   1  -1  -4    42631.14      519.82")
    text = _replace_line(text, line + 1, "   1   3  -3      570.50      167.69     1  1  1")
    path = _write(tmp_path, text)
    with pytest.raises(EdkitError, match=rf"{path}:{line}: reflection loop .* row 11 has 5 values"):
        read_pets(path)


def test_truncated_in_zone_axis_loop(quartz_text: str, tmp_path: Path) -> None:
    line = _line_of(quartz_text, "   3 -1.00000  0.12510")
    cut = "".join(quartz_text.splitlines(keepends=True)[: line - 1]) + "   3 -1.00000  0.12"
    path = _write(tmp_path, cut)
    with pytest.raises(EdkitError, match=rf"{path}:{line}: zone-axis loop .* row 3 has 3 values"):
        read_pets(path)


def test_truncated_in_text_field(quartz_text: str, tmp_path: Path) -> None:
    cut = quartz_text[: quartz_text.index("mosaicity")]
    path = _write(tmp_path, cut)
    with pytest.raises(EdkitError, match=rf"{path}: not readable as CIF: .*line \d+"):
        read_pets(path)


def test_truncated_after_zone_axis_loop(quartz_text: str, tmp_path: Path) -> None:
    cut = quartz_text[: quartz_text.index("loop_\n_refln_index_h")]
    path = _write(tmp_path, cut)
    with pytest.raises(EdkitError, match=rf"{path}: no reflection loop"):
        read_pets(path)


def test_select_frames_out_of_range_is_a_clear_error(data_dir) -> None:
    """Positions past the last frame (e.g. PETS ids 1…n taken for positions) name the count."""
    from edkit import EdkitError, read_pets, select_frames

    dataset = read_pets(data_dir / "pets" / "glycine_dyn.cif_pets")
    with pytest.raises(EdkitError, match=r"has 31 frames \(positions 0–30\)"):
        select_frames(dataset, [1, 31])
