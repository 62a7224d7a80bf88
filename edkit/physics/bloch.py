"""Bloch-wave dynamical diffraction for one orientation (science.md §4, §10).

Everything here is written for a single orientation and a fixed beam set; callers lift it with
``vmap``/``lax.map`` over sub-orientations and frames. Units: Å and Å⁻¹ without 2π.

The propagation ψ(t) = M exp(iπ t A / K) M⁻¹ e₀₀₀ is computed from one eigendecomposition per
orientation, any number of thicknesses. Its derivative is the Daleckii–Krein rule for the *matrix
function* (not for the eigenvectors), so gradients stay exact at degenerate eigenvalues (zone
axes), where the eigenvector derivative of ``eigh`` is undefined.
"""

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

AbsorptionMethod = Literal["eig", "expm", "perturbative"]
#: Name of the eigendecompositions inside the derivative rules, for ``jax.checkpoint`` policies
#: (``save_only_these_names``): a rematerialised backward pass can keep them instead of
#: recomputing them, the one O(n³) step that is not a matrix product.
EIGENSYSTEM = "edkit_eigensystem"
#: The ``jax.checkpoint`` policy that keeps only those eigendecompositions.
KEEP_EIGENSYSTEMS = jax.checkpoint_policies.save_only_these_names(EIGENSYSTEM)


def excitation_errors[A: (np.ndarray, jax.Array)](g: A, k_hat: A, k_mag: float | A) -> A:
    """Excitation errors S_g = (K² − |K + g|²)/(2K) in Å⁻¹, positive inside the Ewald sphere.

    The one definition, for JAX and numpy alike: numpy inputs give a float64 numpy result (the
    beam selection of :mod:`edkit.physics.beams`), JAX inputs a traceable JAX array.

    Args:
      g: reciprocal-lattice vectors (Cartesian, same frame as ``k_hat``), Å⁻¹, shape (n, 3).
      k_hat: unit vector along the incident wave vector (the electrons' direction), shape (3,).
      k_mag: |K| in Å⁻¹ (inside the crystal when the mean inner potential is included).

    Returns:
      S_g, shape (n,).
    """
    return -(g @ k_hat) - (g * g).sum(axis=-1) / (2.0 * k_mag)


def metric_factors(g_normal: jax.Array, k_mag: float | jax.Array) -> jax.Array:
    """M_i = 1/sqrt(1 + g_{i,n}/K), shape (n,), the non-normal-incidence metric of science.md §4.

    Args:
      g_normal: component of each g along the surface normal n (taken along the beam), Å⁻¹, (n,).
      k_mag: |K| in Å⁻¹.
    """
    return 1.0 / jnp.sqrt(1.0 + g_normal / k_mag)


def structure_matrix(
    excitation_error: jax.Array,
    metric: jax.Array,
    potential: jax.Array,
    k_mag: float | jax.Array,
    absorptive: jax.Array | None = None,
) -> jax.Array:
    """The structure matrix A of science.md §4, Å⁻², shape (n, n).

    A_ii = 2K S_i M_i², A_ij = M_i M_j U(h_j − h_i) for i ≠ j, plus i M_i M_j U'(h_j − h_i) on
    every element (the diagonal included) when an absorptive potential is given.

    Args:
      excitation_error: S_i, Å⁻¹, shape (n,).
      metric: M_i, shape (n,).
      potential: U(h_j − h_i) = (γ/π) F(h_j − h_i), Å⁻², complex, shape (n, n); the diagonal
        (U₀, already inside K) is ignored.
      k_mag: |K| in Å⁻¹.
      absorptive: U'(h_j − h_i), Å⁻², complex, shape (n, n), or None. Its diagonal U'₀ is used.

    Returns:
      A, complex, shape (n, n); Hermitian when ``absorptive`` is None and ``potential`` is.
    """
    n = excitation_error.shape[0]
    outer = metric[:, None] * metric[None, :]
    off_diagonal = jnp.where(jnp.eye(n, dtype=bool), 0.0, potential * outer)
    a = off_diagonal + jnp.diag(2.0 * k_mag * excitation_error * metric**2)
    if absorptive is not None:
        a = a + 1j * absorptive * outer
    return a


def named_eigensystem(arrays: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """``checkpoint_name(arrays, EIGENSYSTEM)``, complex arrays through their real and imaginary
    parts: JAX 0.12's rematerialisation inserts ``reduce_precision`` on saved residuals, which
    rejects complex dtypes."""

    def named(x):
        if not jnp.iscomplexobj(x):
            return checkpoint_name(x, EIGENSYSTEM)
        real, imag = checkpoint_name((jnp.real(x), jnp.imag(x)), EIGENSYSTEM)
        return jax.lax.complex(real, imag)

    return tuple(named(x) for x in arrays)


# e^{ix} sin(x)/x = (e^{2ix} − 1)/(2ix) = Σ_k p_k x^k: the divided difference of exp near a
# degeneracy, (e^{itλ_i} − e^{itλ_j})/(λ_i − λ_j) = i t e^{itλ_j} Σ_k p_k (t(λ_i − λ_j)/2)^k.
NEAR_SERIES = (1.0, 1j, -2.0 / 3.0, -1j / 3.0)
# Pairs with |t (λ_i − λ_j)/2| below this use the series (truncation ~ x⁴ ≈ 1e-12); the rest the
# plain difference quotient (cancellation ~ 1e-16/x ≤ 1e-13).
NEAR_THRESHOLD = 1e-3


def propagate_from_eigensystem(
    eigenvalues: jax.Array, right: jax.Array, entrance: jax.Array, thickness: jax.Array
) -> jax.Array:
    """ψ(t) = W diag(e^{itλ}) c with c = W⁻¹ e₀; shape (n_t, n)."""
    phases = jnp.exp(1j * thickness[:, None] * eigenvalues[None, :])
    return (phases * entrance[None, :]) @ right.T


@jax.custom_jvp
def propagate_hermitian(b: jax.Array, thickness: jax.Array) -> jax.Array:
    """exp(i t B) e₀ for a Hermitian B, for every thickness, from one ``eigh``.

    Args:
      b: Hermitian matrix B = (π/K) A, Å⁻¹, shape (n, n).
      thickness: thicknesses t in Å, shape (n_t,).

    Returns:
      The wave vectors exp(i t B)[:, 0], complex, shape (n_t, n).

    The JVP is the Daleckii–Krein rule dψ = V[(Vᴴ dB V) ∘ D(t)]Vᴴ e₀ (exact at degenerate
    eigenvalues) plus i B ψ dt for the thickness.
    """
    eigenvalues, vectors = jnp.linalg.eigh(b)
    return propagate_from_eigensystem(eigenvalues, vectors, jnp.conj(vectors[0]), thickness)


@propagate_hermitian.defjvp
def _propagate_hermitian_jvp(primals, tangents):
    b, thickness = primals
    db, dthickness = tangents
    eigenvalues, vectors = named_eigensystem(jnp.linalg.eigh(b))
    left = jnp.conj(vectors).T
    return _matrix_function_jvp(eigenvalues, vectors, left, thickness, db, dthickness)


@jax.custom_jvp
def propagate_general(b: jax.Array, thickness: jax.Array) -> jax.Array:
    """exp(i t B) e₀ for a general (absorptive, non-Hermitian) B, from one ``eig``.

    Args:
      b: complex matrix B = (π/K)(A + iA'), Å⁻¹, shape (n, n).
      thickness: thicknesses t in Å, shape (n_t,).

    Returns:
      exp(i t B)[:, 0], complex, shape (n_t, n).

    The JVP is the Daleckii–Krein rule with W⁻¹ dB W; exact where B is diagonalisable. ``eig`` runs
    on CPU only in current JAX.
    """
    eigenvalues, right = jnp.linalg.eig(b)
    left = jnp.linalg.inv(right)
    return propagate_from_eigensystem(eigenvalues, right, left[:, 0], thickness)


@propagate_general.defjvp
def _propagate_general_jvp(primals, tangents):
    b, thickness = primals
    db, dthickness = tangents
    eigenvalues, right = jnp.linalg.eig(b)
    eigenvalues, right, left = named_eigensystem((eigenvalues, right, jnp.linalg.inv(right)))
    return _matrix_function_jvp(eigenvalues, right, left, thickness, db, dthickness)


def _matrix_function_jvp(eigenvalues, right, left, thickness, db, dthickness):
    """Daleckii–Krein JVP of ψ(t) = W e^{itΛ} W⁻¹ e₀ (``left`` = W⁻¹), for every thickness.

    dψ(t) = W[(X ∘ D(t)) c] with X = W⁻¹ dB W, c = W⁻¹e₀ and D_ij(t) the divided difference of
    exp(itλ). For well-separated pairs D_ij = (φ_i − φ_j) G_ij with G = 1/(λ_i − λ_j), so
    (X∘D(t))c = φ(t) ∘ ((X∘G)c) − (X∘G)(c∘φ(t)): matrix products, never an (n_t, n, n) tensor.
    Near-degenerate pairs (the diagonal included) use the series in t(λ_i − λ_j)/2 instead.
    """
    x = left @ db.astype(right.dtype) @ right
    return transported_jvp(eigenvalues, right, left[:, 0], thickness, x, dthickness)


def transported_jvp(eigenvalues, right, entrance, thickness, x, dthickness):
    """:func:`_matrix_function_jvp` from X = W⁻¹ dB W already in the eigenbasis (``x``) and
    c = W⁻¹e₀ (``entrance``): (ψ, dψ), each (n_t, n)."""
    phases = jnp.exp(1j * thickness[:, None] * eigenvalues[None, :])  # (n_t, n)
    weighted = phases * entrance[None, :]  # c ∘ φ(t)
    psi = weighted @ right.T
    gap = eigenvalues[:, None] - eigenvalues[None, :]
    t_max = jnp.max(jnp.abs(thickness))
    near = jnp.abs(gap) * (0.5 * t_max) < NEAR_THRESHOLD
    x_far = jnp.where(near, 0.0, x / jnp.where(near, 1.0, gap))
    y = phases * (x_far @ entrance)[None, :] - weighted @ x_far.T
    x_near = jnp.where(near, x, 0.0)
    half_gap = 0.5 * gap
    for power, coefficient in enumerate(NEAR_SERIES):
        t_power = (1j * coefficient) * thickness[:, None] ** (power + 1)
        y = y + t_power * (weighted @ (x_near * half_gap**power).T)
    rate = 1j * eigenvalues[None, :] * weighted
    dpsi = (y + rate * dthickness[:, None]) @ right.T
    return psi, dpsi


def propagate_expm(b: jax.Array, thickness: jax.Array) -> jax.Array:
    """exp(i t B) e₀ by one matrix exponential per thickness (the reference route).

    Args:
      b: complex matrix B, Å⁻¹, shape (n, n).
      thickness: Å, shape (n_t,).

    Returns:
      complex, shape (n_t, n). Costs 3–4 ``eigh`` per thickness; use for validation.
    """
    return jax.lax.map(lambda t: jax.scipy.linalg.expm(1j * t * b)[:, 0], thickness)


def propagate_perturbative(
    b: jax.Array, b_absorptive: jax.Array, thickness: jax.Array
) -> jax.Array:
    """First-order absorption in the Hermitian eigenbasis: λ_j = v_j + i (Cᴴ B' C)_jj.

    An approximation (science.md §10: a few per cent in intensity when A' is 1 % of U, tens of
    per cent at 10 %); validate against :func:`propagate_general`. Its gradient is JAX's own
    ``eigh`` derivative, undefined at exactly degenerate eigenvalues.

    Args:
      b: Hermitian part B = (π/K)A, Å⁻¹, shape (n, n).
      b_absorptive: B' = (π/K)A' with the absorptive part entering as B + iB', shape (n, n).
      thickness: Å, shape (n_t,).
    """
    eigenvalues, vectors = jnp.linalg.eigh(b)
    shift = jnp.einsum("ij,ik,kj->j", jnp.conj(vectors), b_absorptive, vectors)
    return propagate_from_eigensystem(
        eigenvalues + 1j * shift, vectors, jnp.conj(vectors[0]), thickness
    )


def bethe_correction(
    coupling_out: jax.Array,
    coupling_in: jax.Array,
    weak_excitation_error: jax.Array,
    k_mag: float | jax.Array,
) -> jax.Array:
    """Second-order (Bethe) correction of the strong beams' coupling by weak beams, Å⁻².

    Eliminating weak beams w from (A − γ)C = 0 with A_ww − γ ≈ 2K S_w M_w² (weak beams are far
    from the Ewald sphere: |2K S_w| ≫ |U| ≈ |γ|) leaves the strong block
    A_eff = A_SS − M_i M_j C_ij with C_ij = Σ_w U(h_w − h_i) U(h_j − h_w) / (2K S_w); the weak
    beams' metric factors cancel.

    Args:
      coupling_out: U(h_w − h_i) (plus i U' when absorbing), Å⁻², complex, shape (n, n_w).
      coupling_in: U(h_j − h_w) (plus i U'), Å⁻², complex, shape (n_w, n).
      weak_excitation_error: S_w, Å⁻¹, shape (n_w,); padding weak beams must carry zero coupling.
      k_mag: |K|, Å⁻¹.

    Returns:
      C, complex, shape (n, n); Hermitian when the couplings are U alone (U(−g) = U(g)*).
    """
    inverse = 1.0 / (2.0 * k_mag * weak_excitation_error)
    return (coupling_out * inverse[None, :]) @ coupling_in


def bethe_terms(
    coupling_out: jax.Array, coupling_in: jax.Array, inverse_coefficients: jax.Array
) -> jax.Array:
    """Bethe corrections for an expansion of the weak beams' 1/(2K S_w) in some basis, Å⁻².

    When 1/(2K S_w(φ)) = Σ_k c_kw T_k(φ) over a frame's sub-orientations φ, the correction of
    :func:`bethe_correction` is C(φ) = Σ_k T_k(φ) C_k with C_k = Σ_w U(h_w − h_i) c_kw U(h_j − h_w):
    the n²·n_w products are paid once per basis function, not once per sub-orientation.

    Args:
      coupling_out: U(h_w − h_i) (plus i U'), Å⁻², complex, shape (n, n_w).
      coupling_in: U(h_j − h_w) (plus i U'), Å⁻², complex, shape (n_w, n).
      inverse_coefficients: c_kw, Å², shape (n_k, n_w); zero for padding weak beams.

    Returns:
      C_k, complex, shape (n_k, n, n).
    """
    return jnp.einsum("iw,kw,wj->kij", coupling_out, inverse_coefficients, coupling_in)


def with_bethe(a: jax.Array, metric: jax.Array, bethe: jax.Array) -> jax.Array:
    """A − M_i M_j C_ij with the Hermitian part of the Bethe correction C, Å⁻², (n, n)."""
    hermitian = 0.5 * (bethe + jnp.conj(bethe).T)
    return a - (metric[:, None] * metric[None, :]) * hermitian


def cast_solve(x: jax.Array, solve_dtype: jnp.dtype | None) -> jax.Array:
    """``x`` in the solves' precision: ``solve_dtype`` (complex) or its real counterpart for a
    real ``x``, so that a real (centrosymmetric) matrix keeps a real solve, 2–2.5× faster
    (kernel.py --real); None keeps ``x``."""
    if solve_dtype is None:
        return x
    return x.astype(solve_dtype if jnp.iscomplexobj(x) else jnp.finfo(solve_dtype).dtype)


def bloch_intensities(
    excitation_error: jax.Array,
    g_normal: jax.Array,
    potential: jax.Array,
    k_mag: float | jax.Array,
    thickness: jax.Array,
    absorptive: jax.Array | None = None,
    method: AbsorptionMethod = "eig",
    solve_dtype: jnp.dtype | None = None,
    bethe: jax.Array | None = None,
) -> jax.Array:
    """Beam intensities I_g(t) = |ψ_g(t)|² for one orientation, ψ(0) = e₀₀₀ (beam 0 is 000).

    Args:
      excitation_error: S_g, Å⁻¹, shape (n,).
      g_normal: g·n̂ with n̂ the unit surface normal along the beam direction, Å⁻¹, shape (n,).
      potential: U(h_j − h_i), Å⁻², complex, shape (n, n); real for a centrosymmetric crystal
        (origin at the inversion centre), which makes the solve real symmetric and cheaper.
      k_mag: |K|, Å⁻¹.
      thickness: Å, shape (n_t,).
      absorptive: U'(h_j − h_i), Å⁻², complex or real, shape (n, n), or None for no absorption.
      method: absorptive route: "eig" (exact, default), "expm" (reference), "perturbative".
        Without absorption the Hermitian eigen route is always used.
      solve_dtype: complex dtype of the eigendecomposition and propagation (e.g.
        ``jnp.complex64``: ~1.5× faster, intensities to ~1e-5 relative); None keeps the input
        precision. Geometry and structure factors stay in the caller's precision.
      bethe: weak-beam correction C from :func:`bethe_correction`, Å⁻², shape (n, n), or None.
        Built from U alone it is Hermitian and joins A; with absorption, build it from U + iU'
        (exact routes) — the perturbative route takes only its Hermitian part.

    Returns:
      Intensities, shape (n_t, n), in the precision of ``potential``'s real part.
    """
    metric = metric_factors(g_normal, k_mag)
    scale = jnp.pi / k_mag
    outer = metric[:, None] * metric[None, :]
    a = structure_matrix(excitation_error, metric, potential, k_mag)
    out_dtype = jnp.real(a).dtype
    if bethe is not None and (absorptive is None or method == "perturbative"):
        a = with_bethe(a, metric, bethe)

    def cast(x):
        return cast_solve(x, solve_dtype)

    t = thickness if solve_dtype is None else thickness.astype(jnp.real(cast(a)).dtype)
    if absorptive is None:
        psi = propagate_hermitian(cast(scale * a), t)
    elif method == "perturbative":
        a_abs = absorptive * outer
        psi = propagate_perturbative(cast(scale * a), cast(scale * a_abs), t)
    else:
        b = structure_matrix(excitation_error, metric, potential, k_mag, absorptive)
        if bethe is not None:
            b = b - outer * bethe
        b = cast(scale * b)
        psi = propagate_general(b, t) if method == "eig" else propagate_expm(b, t)
    # ψ = M exp(iπtA/K) M⁻¹ e₀ and M₀ = 1 for g = 0.
    psi = psi.astype(jnp.result_type(out_dtype, jnp.complex64))
    return (jnp.abs(psi * (metric[None, :] / metric[0])) ** 2).astype(out_dtype)


def bloch_intensities_expm(
    excitation_error: jax.Array,
    g_normal: jax.Array,
    potential: jax.Array,
    k_mag: float | jax.Array,
    thickness: jax.Array,
    absorptive: jax.Array | None = None,
) -> jax.Array:
    """Same as :func:`bloch_intensities` through the matrix exponential (validation route)."""
    metric = metric_factors(g_normal, k_mag)
    a = structure_matrix(excitation_error, metric, potential, k_mag, absorptive)
    psi = propagate_expm((jnp.pi / k_mag) * a, thickness)
    return jnp.abs(metric[None, :] * psi / metric[0]) ** 2
