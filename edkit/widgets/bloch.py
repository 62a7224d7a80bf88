"""``BlochExplorer``: a teaching widget on dynamical diffraction (two-beam vs many-beam)."""

from typing import Any

import holoviews as hv
import ipywidgets as widgets
import jax
import jax.numpy as jnp
import numpy as np

from edkit.constants import potential_prefactor
from edkit.crystal import Crystal
from edkit.errors import EdkitError
from edkit.examples import example_file
from edkit.io.cif import read_cif
from edkit.physics import bloch
from edkit.physics.structure import structure_factors_of, structure_params, structure_tables
from edkit.simulate.pattern import beam_direction, make_pattern_model
from edkit.widgets.bridge import HoloViewsWidget, extension

__all__ = ["BlochExplorer", "two_beam_intensity"]

T = hv.Dimension("thickness", label="thickness", unit="Å")
U = hv.Dimension("u", label="g · e₁", unit="Å⁻¹")
V = hv.Dimension("v", label="g · e₂", unit="Å⁻¹")
S_G = hv.Dimension("S_g", label="S_g", unit="Å⁻¹")


def two_beam_intensity(
    thickness: np.ndarray, excitation_error: float, potential: float, wave_number: float
) -> np.ndarray:
    """Two-beam Pendellösung I_g(t) = (|U_g|/K)² sin²(π t s_eff)/s_eff², s_eff = √(S_g² + ξ_g⁻²).

    Args:
      thickness: t, Å, any shape.
      excitation_error: S_g, Å⁻¹.
      potential: |U_g| = (γ/π)|F_g|, Å⁻².
      wave_number: K, Å⁻¹ (ξ_g = K/|U_g| is the extinction distance, Å).

    Returns:
      I_g, the shape of ``thickness``.
    """
    inverse_xi = potential / wave_number
    s_eff = np.sqrt(excitation_error**2 + inverse_xi**2)
    return inverse_xi**2 * np.sin(np.pi * np.asarray(thickness) * s_eff) ** 2 / s_eff**2


class BlochExplorer:
    """Drag thickness and tilt, watch a reflection's intensity: two-beam theory against the
    full Bloch-wave (many-beam) solution, with every beam's excitation error.

    The beam set is chosen once at the zone axis (|g| ≤ ``g_max``, |S_g| ≤ ``sg_max``) and the
    many-beam intensities at all thicknesses come from one compiled eigendecomposition per tilt
    (a few ms), so the sliders can be dragged. The tilt turns the beam towards the chosen
    reflection, in the plane of the zone axis and g: its Bragg condition S_g = 0 lies at
    −|g⊥|/(2K) (a few mrad).

    Args:
      crystal: the structure; default the bundled α-quartz (``quartz.cif``).
      zone_axis: [u, v, w], PETS convention (from the crystal towards the source).
      voltage: accelerating voltage, V.
      g_max, sg_max: beam selection, Å⁻¹.
      thickness_max: the thickness axis runs from 0 to this, Å.
      thickness_step: its spacing and the slider's step, Å.
      tilt_max: tilt slider range ±, mrad.
      reflection: Miller indices of the reflection shown first (default: the strongest of the
        lowest-order beams).

    Attributes:
      widget: the top-level ipywidgets container.
      thickness_slider (Å), tilt_slider (mrad): ipywidgets.FloatSlider.
      reflection: ipywidgets.Dropdown of the beams (value: index into ``hkl``).
      readout: ipywidgets.HTML: S_g, ξ_g, s_eff and both intensities at the current thickness.
      hkl: the beams' Miller indices, (n, 3), 000 first.
      thickness: the thickness axis, Å, (n_t,).
      curve_stream, pattern_stream: ``hv.streams.Pipe`` of the two plots.
      plot: the :class:`~edkit.widgets.bridge.HoloViewsWidget`.
    """

    def __init__(
        self,
        crystal: Crystal | None = None,
        *,
        zone_axis: Any = (0, 0, 1),
        voltage: float = 200e3,
        g_max: float = 1.0,
        sg_max: float = 0.05,
        thickness_max: float = 2000.0,
        thickness_step: float = 10.0,
        tilt_max: float = 20.0,
        reflection: Any = None,
    ) -> None:
        extension()
        self.crystal = read_cif(example_file("quartz.cif")) if crystal is None else crystal
        self.voltage = float(voltage)
        n_t = round(float(thickness_max) / float(thickness_step)) + 1
        self.thickness = np.linspace(0.0, (n_t - 1) * float(thickness_step), n_t)
        with jax.enable_x64(True):
            model = make_pattern_model(
                self.crystal, zone_axis, voltage=self.voltage, g_max=g_max, sg_max=sg_max
            )
            params = structure_params(self.crystal)
            tables = structure_tables(self.crystal)
            structure_factors = np.asarray(
                structure_factors_of(params, tables, jnp.asarray(model.hkl))
            )
            self._k_hat0 = np.asarray(beam_direction(tables.real_basis, zone_axis))
            thickness = jnp.asarray(self.thickness)
            self._solve = jax.jit(lambda axis: model.intensities(params, thickness, axis))
        self.hkl = np.asarray(model.hkl)
        self.wave_number = float(model.wave_number)
        self.potential = potential_prefactor(self.voltage) * np.abs(structure_factors)  # |U_g|
        self._real = np.asarray(tables.real_basis)
        self._g = self.hkl @ np.asarray(tables.reciprocal_basis)
        self._e1, self._e2 = _plane_axes(self._k_hat0, self._g)
        if len(self.hkl) < 2:
            raise EdkitError("BlochExplorer: only the direct beam was selected; raise g_max")

        options = _reflection_options(self.hkl, self._g, self.potential)
        first = options[0][1]
        if reflection is not None:
            wanted = np.asarray(reflection, dtype=int)
            matches = np.flatnonzero(np.all(self.hkl == wanted, axis=1))
            if matches.size == 0:
                raise EdkitError(f"BlochExplorer: {tuple(wanted)} is not among the beams")
            first = int(matches[0])
            if first not in [index for _, index in options]:
                options.append((_label(self.hkl[first], self._g[first]), first))
        self.thickness_slider = widgets.FloatSlider(
            value=float(self.thickness[min(40, n_t - 1)]),
            min=0.0,
            max=float(self.thickness[-1]),
            step=float(thickness_step),
            description="thickness (Å)",
            style={"description_width": "initial"},
            layout=widgets.Layout(width="420px"),
        )
        self.tilt_slider = widgets.FloatSlider(
            value=0.0,
            min=-float(tilt_max),
            max=float(tilt_max),
            step=0.1,
            description="tilt (mrad)",
            style={"description_width": "initial"},
            layout=widgets.Layout(width="420px"),
        )
        self.reflection = widgets.Dropdown(options=options, value=first, description="reflection")
        self.readout = widgets.HTML()
        for control, name in (
            (self.thickness_slider, "edkit-thickness-slider"),
            (self.tilt_slider, "edkit-tilt-slider"),
            (self.reflection, "edkit-reflection"),
            (self.readout, "edkit-bloch-readout"),
        ):
            control.add_class(name)

        self._intensities = np.zeros((n_t, len(self.hkl)))
        self._s = np.zeros(len(self.hkl))
        self._recompute()
        self.curve_stream = hv.streams.Pipe(data=self._curve_data())
        self.pattern_stream = hv.streams.Pipe(data=self._pattern_data())
        curves = hv.DynamicMap(self._curves, streams=[self.curve_stream])
        pattern = hv.DynamicMap(self._pattern, streams=[self.pattern_stream])
        self.plot = HoloViewsWidget(curves + pattern, css_class="edkit-bloch-plot")
        self.thickness_slider.observe(lambda _: self._refresh(), names="value")
        self.tilt_slider.observe(lambda _: self._refresh(solve=True), names="value")
        self.reflection.observe(lambda _: self._refresh(solve=True), names="value")
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.reflection, self.readout]),
                self.thickness_slider,
                self.tilt_slider,
                self.plot,
            ]
        )
        self.widget.add_class("edkit-bloch-explorer")
        self._refresh_readout()

    # ------------------------------------------------------------------------------ physics
    def electron_direction(self) -> np.ndarray:
        """The electrons' direction of travel at the current tilt, crystal-Cartesian, (3,)."""
        g = self._g[self.reflection.value]
        k0 = self._k_hat0
        g_perp = g - (g @ k0) * k0
        norm = np.linalg.norm(g_perp)
        towards = g_perp / norm if norm > 1e-9 else self._e1
        phi = 1e-3 * float(self.tilt_slider.value)
        return np.cos(phi) * k0 + np.sin(phi) * towards

    def _recompute(self) -> None:
        k_hat = self.electron_direction()
        axis = -k_hat @ np.linalg.inv(self._real)  # [uvw] whose beam direction is k_hat
        with jax.enable_x64(True):
            self._intensities = np.asarray(self._solve(jnp.asarray(axis)))
            self._s = np.asarray(
                bloch.excitation_errors(jnp.asarray(self._g), jnp.asarray(k_hat), self.wave_number)
            )

    @property
    def index(self) -> int:
        """Index of the chosen reflection in ``hkl``."""
        return int(self.reflection.value)

    def many_beam(self) -> np.ndarray:
        """Many-beam I_g(t) of the chosen reflection on ``thickness``, (n_t,)."""
        return self._intensities[:, self.index]

    def two_beam(self) -> np.ndarray:
        """Two-beam I_g(t) of the chosen reflection at its current S_g, (n_t,)."""
        i = self.index
        return two_beam_intensity(self.thickness, self._s[i], self.potential[i], self.wave_number)

    # ------------------------------------------------------------------------------ plots
    def _thickness_index(self) -> int:
        return int(np.argmin(np.abs(self.thickness - self.thickness_slider.value)))

    def _curve_data(self) -> dict[str, Any]:
        h, k, l = self.hkl[self.index]
        return {
            "thickness": self.thickness,
            "many": self.many_beam(),
            "two": self.two_beam(),
            "t": float(self.thickness[self._thickness_index()]),
            "label": f"{h} {k} {l}",
        }

    def _pattern_data(self) -> dict[str, Any]:
        j = self._thickness_index()
        intensity = self._intensities[j]
        strongest = max(float(np.max(intensity[1:])), 1e-12)
        size = 4.0 + 26.0 * np.sqrt(np.clip(intensity / strongest, 0.0, 1.0))
        return {
            "u": self._g @ self._e1,
            "v": self._g @ self._e2,
            "intensity": intensity,
            "S_g": self._s,
            "size": size,
            "hkl": [f"{h} {k} {l}" for h, k, l in self.hkl],
            "chosen": self.index,
            "t": float(self.thickness[j]),
        }

    @staticmethod
    def _curves(data: dict[str, Any]) -> hv.Overlay:
        columns = {k: data[k] for k in ("thickness", "many", "two")}
        many = hv.Curve(columns, T, hv.Dimension("many", label="I_g"), label="many-beam")
        two = hv.Curve(columns, T, hv.Dimension("two", label="I_g"), label="two-beam")
        return (
            many.opts(line_width=2, color="#1f5fa8", backend="bokeh")
            * two.opts(line_dash="dashed", color="#c0392b", backend="bokeh")
            * hv.VLine(data["t"]).opts(color="gray", line_width=1, backend="bokeh")
        ).opts(
            hv.opts.Overlay(
                width=480,
                height=320,
                title=f"I({data['label']}) against thickness",
                legend_position="top_right",
                backend="bokeh",
            )
        )

    @staticmethod
    def _pattern(data: dict[str, Any]) -> hv.Overlay:
        columns = {k: data[k] for k in ("u", "v", "intensity", "S_g", "size", "hkl")}
        limit = max(float(np.max(np.abs(data["S_g"]))), 1e-6)
        beams = hv.Points(columns, [U, V], ["intensity", S_G, "size", "hkl"]).opts(
            size=hv.dim("size"),
            color=hv.dim("S_g"),
            cmap="coolwarm",
            clim=(-limit, limit),
            colorbar=True,
            line_color="black",
            line_width=0.5,
            tools=["hover"],
            backend="bokeh",
        )
        i = data["chosen"]
        ring = hv.Points(([data["u"][i]], [data["v"][i]]), [U, V]).opts(
            size=36, fill_alpha=0, line_color="black", line_width=2, backend="bokeh"
        )
        return (beams * ring).opts(
            hv.opts.Overlay(
                width=420,
                height=360,
                data_aspect=1,
                title=f"many-beam pattern at {data['t']:.0f} Å (colour: S_g)",
                backend="bokeh",
            )
        )

    # ------------------------------------------------------------------------------ update
    def _refresh(self, solve: bool = False) -> None:
        if solve:
            self._recompute()
        self.curve_stream.send(self._curve_data())
        self.pattern_stream.send(self._pattern_data())
        self._refresh_readout()

    def _refresh_readout(self) -> None:
        i, j = self.index, self._thickness_index()
        h, k, l = self.hkl[i]
        s = float(self._s[i])
        xi = self.wave_number / self.potential[i]
        s_eff = np.sqrt(s**2 + xi**-2)
        many, two = float(self._intensities[j, i]), float(self.two_beam()[j])
        text = (
            f"<b>{h} {k} {l}</b>: S_g = {s:+.5f} Å⁻¹, ξ_g = {xi:.0f} Å, "
            f"s_eff = {s_eff:.5f} Å⁻¹ (period {1 / s_eff:.0f} Å); at t = {self.thickness[j]:.0f} Å "
            f"I_g = {many:.4f} (many-beam), {two:.4f} (two-beam)"
        )
        self.readout.value = f"<span>{text}</span>"  # numbers and Miller indices only

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def _plane_axes(k_hat: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors spanning the plane ⊥ the beam, e₁ along the shortest projected g."""
    perp = g - np.outer(g @ k_hat, k_hat)
    lengths = np.linalg.norm(perp, axis=1)
    usable = np.flatnonzero(lengths > 1e-6)
    if usable.size:
        e1 = perp[usable[np.argmin(lengths[usable])]] / lengths[usable].min()
    else:
        trial = np.array([1.0, 0.0, 0.0]) if abs(k_hat[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
        e1 = trial - (trial @ k_hat) * k_hat
        e1 /= np.linalg.norm(e1)
    return e1, np.cross(k_hat, e1)


def _label(hkl: np.ndarray, g: np.ndarray) -> str:
    h, k, l = (int(v) for v in hkl)
    return f"{h} {k} {l}  (|g| = {np.linalg.norm(g):.3f} Å⁻¹)"


def _reflection_options(hkl: np.ndarray, g: np.ndarray, potential: np.ndarray, n: int = 24):
    """Dropdown options: the ``n`` lowest-order beams (not 000), strongest |U_g| first at equal
    |g|; the first option is the strongest of the lowest-order shell."""
    norms = np.linalg.norm(g, axis=1)
    order = [int(i) for i in np.lexsort((-potential, np.round(norms, 4))) if norms[i] > 0][:n]
    return [(_label(hkl[i], g[i]), i) for i in order]
