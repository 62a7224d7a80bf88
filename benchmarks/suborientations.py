"""Sharing work between a frame's sub-orientations (issue 12, item 3): two candidates, measured.

Within a frame only the excitation errors change along the rotation: A(φ_k) = M_k U M_k +
diag(2K S_k M_k²) with U the same for every sub-orientation. Two ways to exploit it:

1. **A Chebyshev propagator over the whole frame** (``chebyshev_frame`` below): exp(iBt)e₀ =
   e^{ict} Σ_j (2 − δ_j0) i^j J_j(Rt) T_j(B̂)e₀ with B̂ = (B − c)/R, the spectrum's centre c and
   half-width R from Gershgorin discs. The recurrence T_{j+1} = 2B̂T_j − T_{j−1} advances every
   sub-orientation at once, so each term is one (n, n) × (n, n_sub) matrix product (BLAS 3) instead
   of n_sub eigendecompositions, every thickness comes from the same terms, and no Bethe
   approximation is needed (every beam up to sg_weak is solved exactly). It needs
   m ≈ Rt_max + 4(Rt_max)^⅓ + 20 terms: its cost grows with the thickest crystal, which must
   be bounded statically (a compiled shape).
2. **Fewer sub-orientations** (solve every k-th): the rocking-curve integral at n_sub/k points
   against n_sub, on the refinement's own default route (Bethe, shared correction).

Prints, for one CsPbBr₃ frame (g_max 2.3 Å⁻¹, θ = 1.47°, 60 sub-orientations, 16 thicknesses
300–500 Å), the forward and gradient seconds of: every beam of |S_g| ≤ 0.03 Å⁻¹ by eigh (exact),
the same by Chebyshev (at the least safe number of terms and with a 1.5× thickness margin), and
the refinement's default route (|S_g| ≤ 0.005 exact, Bethe to 0.03, 12 shared terms) in double
and single precision; each against the exact route (max |ΔI| over the largest diffracted I).
Then the R (on |F|, per-frame scale) between the default route at 60 and at 30/20/15
sub-orientations over a few frames. Run: ``python benchmarks/suborientations.py [--frames 3]``
(about 5 minutes on 2 cores; the dataset is large.py's cspbbr3 cache, simulated first if absent).
"""

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import large
from timing import best_time

import edkit
from edkit.constants import potential_prefactor
from edkit.physics import bloch
from edkit.physics.orientation import rotation_x
from edkit.physics.rocking import LAB_BEAM, frame_intensities
from edkit.physics.structure import structure_params, structure_tables
from edkit.simulate.frames import simulate_frames
from edkit.simulate.setup import build_frame_setup
from edkit.simulate.stack import frame_intensity_stack, potentials

THICKNESS = np.linspace(300.0, 500.0, 16)  # Å


def _bessel_miller(x: jax.Array, m: int) -> jax.Array:
    """J_0 … J_{m−1}(x), x (n_t,) > 0, by Miller's backward recurrence (stable), (m, n_t)."""
    start = m + 30

    def body(carry, k):
        upper, current = carry  # J_{k+1}, J_k (unnormalised)
        lower = (2.0 * k / x) * current - upper
        return (current, lower), lower

    init = (jnp.zeros_like(x), jnp.full_like(x, 1e-300))
    _, seq = jax.lax.scan(body, init, jnp.arange(start, 0, -1))
    seq = seq[::-1]  # J_0 … J_{start−1}
    return (seq / (seq[0] + 2.0 * jnp.sum(seq[2::2], axis=0)))[:m]


@jax.custom_jvp
def bessel(x: jax.Array, m: int) -> jax.Array:
    return _bessel_miller(x, m)


bessel = jax.custom_jvp(bessel.fun, nondiff_argnums=(1,))


@bessel.defjvp
def _bessel_jvp(m, primals, tangents):
    # J_k' = (J_{k−1} − J_{k+1})/2, J_{−1} = −J_1: the recurrence itself is not differentiated.
    (x,), (dx,) = primals, tangents
    j = _bessel_miller(x, m + 1)
    lower = jnp.concatenate([-j[1:2], j[:-2]])
    return j[:m], 0.5 * (lower - j[1:]) * dx[None]


def chebyshev_frame(k_hats, weights, g_cart, valid, potential, k_mag, thickness, n_terms):
    """Rocking-curve intensities of one frame (n_t, n) by the Chebyshev recurrence; also the
    spectral half-width R (Å⁻¹), so that the caller can check R·t_max against n_terms."""
    n = valid.shape[0]
    coupled = valid[:, None] & valid[None, :] & ~jnp.eye(n, dtype=bool)
    scale = jnp.pi / k_mag
    u = scale * jnp.where(coupled, potential, 0.0)
    s = jax.vmap(lambda k: bloch.excitation_errors(g_cart, k, k_mag))(k_hats)
    s = jnp.where(valid[None], s, 0.0)  # padding: decoupled, harmless
    metric = bloch.metric_factors(jnp.where(valid[None], k_hats @ g_cart.T, 0.0), k_mag)
    diagonal = scale * 2.0 * k_mag * s * metric**2  # (n_sub, n)
    radius = metric * (jnp.abs(u) @ metric.T).T  # Gershgorin: every eigenvalue lies inside
    low = jax.lax.stop_gradient(jnp.min(diagonal - radius))
    high = jax.lax.stop_gradient(jnp.max(diagonal + radius))
    centre, half = 0.5 * (high + low), 0.5 * (high - low)
    m_t, d_t = metric.T, (diagonal.T - centre) / half  # (n, n_sub)

    def apply(v):  # B̂ v for every sub-orientation at once: one matrix product
        return m_t * (u @ (m_t * v)) / half + d_t * v

    e0 = jnp.zeros((n, k_hats.shape[0]), u.dtype).at[0].set(1.0)
    t1 = apply(e0)

    def body(carry, _):
        previous, current = carry
        following = 2.0 * apply(current) - previous
        return (current, following), following

    _, rest = jax.lax.scan(body, (e0, t1), None, length=n_terms - 2)
    terms = jnp.concatenate([e0[None], t1[None], rest])  # (m, n, n_sub)
    j = jnp.arange(n_terms)
    coefficients = (
        jnp.where(j == 0, 1.0, 2.0)[:, None]
        * (1j**j)[:, None]
        * bessel(half * thickness, n_terms)
        * jnp.exp(1j * centre * thickness)[None, :]
    )  # (m, n_t)
    psi = jnp.einsum("jt,jns->tsn", coefficients, terms.astype(coefficients.dtype))
    intensity = jnp.abs(psi) ** 2 * (metric / metric[:, :1])[None] ** 2
    return jnp.where(valid[None], jnp.einsum("s,tsn->tn", weights, intensity), 0.0), half


def _frame_inputs(crystal, data, setup):
    tables, params = structure_tables(crystal), structure_params(crystal)
    pot = potentials(params, tables, setup.differences, setup.voltage, None, True)
    rotation = jnp.asarray(setup.rotations[0])
    k_hats = jax.vmap(lambda phi: (rotation_x(phi) @ rotation).T @ jnp.asarray(LAB_BEAM))(
        jnp.asarray(setup.angles[0])
    )
    g_cart = setup.hkl[0].astype(float) @ np.asarray(tables.reciprocal_basis)
    coupling = jnp.asarray(setup.coupling[0])
    prefactor = potential_prefactor(setup.voltage)

    def potential_of(f_values):
        return prefactor * f_values[coupling]

    fixed = (
        k_hats,
        jnp.asarray(setup.weights[0]),
        jnp.asarray(g_cart),
        jnp.asarray(setup.valid[0]),
    )
    return pot, fixed, potential_of, params, tables


def _probe(n: int) -> jax.Array:
    return jnp.asarray(np.arange(n) % 7, float)  # a loss that weighs beams unevenly


def time_routes(crystal, frame, repeats: int) -> None:
    exact_setup = build_frame_setup(crystal, frame, g_max=2.3, sg_max=0.03)
    pot, fixed, potential_of, params, tables = _frame_inputs(crystal, frame, exact_setup)
    k_hats, weights, g_cart, valid = fixed
    n, n_sub = int(valid.sum()), k_hats.shape[0]
    thickness = jnp.asarray(THICKNESS)
    probe = _probe(valid.shape[0])

    def exact(f_values, t):
        return frame_intensities(k_hats, weights, g_cart, valid, potential_of(f_values),
                                 pot.wave_number, t)  # fmt: skip

    def cheb(n_terms):
        return lambda f, t: chebyshev_frame(k_hats, weights, g_cart, valid, potential_of(f),
                                            pot.wave_number, t, n_terms)[0]  # fmt: skip

    half = float(chebyshev_frame(k_hats, weights, g_cart, valid, potential_of(pot.f_values),
                                 pot.wave_number, thickness, 4)[1])  # fmt: skip
    rows = {"eigh, every beam exact": exact}
    for label, t_max in (("", THICKNESS.max()), (", 1.5× thickness margin", 1.5 * THICKNESS.max())):
        tau = half * t_max
        terms = int(np.ceil(tau + 4 * tau ** (1 / 3) + 20))
        rows[f"Chebyshev, {terms} terms{label}"] = cheb(terms)
    reference = None
    print(f"# one frame: {n} beams of |S_g| ≤ 0.03 Å⁻¹ exact, {n_sub} sub-orientations, "
          f"spectral half-width R = {half:.3f} Å⁻¹")  # fmt: skip
    print(f"{'route':44} {'fwd s':>7} {'grad s':>7} {'max |ΔI|':>9}")
    for name, function in rows.items():
        forward = jax.jit(function)
        gradient = jax.jit(jax.grad(lambda f, t, fn=function: jnp.sum(fn(f, t) * probe), (0, 1)))
        intensities = np.asarray(forward(pot.f_values, thickness))
        reference = intensities if reference is None else reference
        jax.block_until_ready(gradient(pot.f_values, thickness))
        t_f = best_time(lambda fw=forward: fw(pot.f_values, thickness), repeats)
        t_g = best_time(lambda gr=gradient: gr(pot.f_values, thickness), repeats)
        error = np.abs(intensities - reference).max() / reference[:, 1:].max()
        print(f"{name:44} {t_f:7.2f} {t_g:7.2f} {error:9.1e}", flush=True)
    bethe_setup = build_frame_setup(crystal, frame, g_max=2.3, sg_max=0.005, sg_weak=0.03,
                                    bethe_terms=12)  # fmt: skip
    strong = bethe_setup.hkl[0][bethe_setup.valid[0]]
    exact_valid = np.flatnonzero(exact_setup.valid[0])  # padding rows are 000 too: skip them
    position = {tuple(exact_setup.hkl[0][i]): i for i in exact_valid}
    columns = np.array([position[tuple(h)] for h in strong])
    for precision in (None, "complex64"):

        def default(p, t, precision=precision):
            return frame_intensity_stack(p, tables, bethe_setup, t[None], remat="eigensystems",
                                         solve_dtype=precision, batch_size=1)[0]  # fmt: skip

        forward = jax.jit(default)
        probe_b = _probe(bethe_setup.hkl.shape[1])
        gradient = jax.jit(
            jax.grad(lambda p, t, fn=default, w=probe_b: jnp.sum(fn(p, t) * w), (0, 1))
        )
        intensities = np.asarray(forward(params, thickness))
        jax.block_until_ready(gradient(params, thickness))
        t_f = best_time(lambda fw=forward: fw(params, thickness), repeats)
        t_g = best_time(lambda gr=gradient: gr(params, thickness), repeats)
        error = np.abs(intensities[:, : len(columns)] - reference[:, columns]).max()
        error /= reference[:, 1:].max()
        name = f"default: {len(strong)} exact + {int(bethe_setup.n_weak[0])} Bethe, " + (
            "double" if precision is None else "single"
        )
        print(f"{name:44} {t_f:7.2f} {t_g:7.2f} {error:9.1e}", flush=True)


def sub_orientation_study(crystal, data) -> None:
    print(f"# the default route at fewer sub-orientations, {data.sizes['frame']} frames, 400 Å")
    results = {}
    for n_sub in (60, 30, 20, 15):
        setup = build_frame_setup(crystal, data, g_max=2.3, sg_max=0.005, sg_weak=0.03,
                                  bethe_terms=12, n_sub=n_sub)  # fmt: skip
        start = time.perf_counter()
        out = simulate_frames(crystal, data, 400.0, setup=setup)
        seconds = time.perf_counter() - start
        results[n_sub] = out
        scored = out["scored"].values
        f_ref = np.sqrt(np.maximum(results[60]["I_calc_scaled"].values[scored], 0))
        f_new = np.sqrt(np.maximum(out["I_calc_scaled"].values[scored], 0))
        r_between = np.abs(f_new - f_ref).sum() / f_ref.sum()
        f_obs = np.sqrt(np.maximum(data["I_obs"].values[scored], 0))
        r_obs = np.abs(f_new - f_obs).sum() / f_obs.sum()
        print(f"n_sub {n_sub:3d}: {seconds:6.1f} s, R against the data {100 * r_obs:.4f} %, "
              f"R against n_sub 60 {100 * r_between:.4f} %", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=3, help="frames of the n_sub study")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-study", action="store_true", help="only the timing table")
    args = parser.parse_args()
    case = argparse.Namespace(case="cspbbr3", frames=60, g_max=2.3, semiangle=1.47, n_sub=None,
                              cache=os.path.join(tempfile.gettempdir(),
                                                 "edkit_cspbbr3_60xdefault.nc"))  # fmt: skip
    crystal = large._crystal(case)
    data = large._dataset(case)
    print(f"# {os.cpu_count()} cores, JAX {jax.__version__}, load {os.getloadavg()[0]:.2f}")
    with jax.enable_x64(True):
        positions = list(range(20, 20 + args.frames))  # frames near the middle of the series
        time_routes(crystal, edkit.select_frames(data, positions[:1]), args.repeats)
        if not args.skip_study:
            sub_orientation_study(crystal, edkit.select_frames(data, positions))


if __name__ == "__main__":
    main()
