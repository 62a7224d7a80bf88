"""Crystal and frame orientations of a 3D-ED dataset (science.md §5). Pure JAX, differentiable.

Conventions:
  * Crystal Cartesian frame: a along +x, b in the xy plane, c with positive z.
  * ``real`` (3, 3) has the real-space cell vectors a, b, c as **rows** (Å); a lattice direction
    [uvw] is ``real.T @ uvw``.
  * ``B = inv(real)`` (Å⁻¹, without 2π) has the reciprocal vectors a*, b*, c* as **columns**, so
    ``g = B @ hkl`` and ``real @ B = I`` (a_i · a*_j = δ_ij). Its transpose is the row-stacked
    ``reciprocal_basis`` used by :mod:`edkit.physics.beams`. B is never built from a hand-written
    Busing–Levy formula (one published version breaks triclinic cells).
  * Lab frame: electrons travel along −z, so a PETS zone axis [uvw] points to +z (toward the
    source); the goniometer axis is +x once the "rotation axis position" φ is removed.
  * PETS ``UB`` (read row by row, ``UB[i-1, j-1] = _diffrn_orient_matrix_UB_ij``) maps hkl to the
    reciprocal-lattice vector in the lab frame at zero goniometer angles, Å⁻¹: ``g = UB @ hkl``.
    Hence ``U = UB · B⁻¹ = UB · real`` (made a pure rotation). This convention was found from the
    data: with it every frame's zone axis maps to lab +z within 0.046° (quartz), 0.001°
    (glycine), 0.002° (albite); UBᵀ or inv(UB)ᵀ do not (tests/test_orientation.py).
  * Rotations are active and right-handed; angles in radians here (the io layer converts).
"""

from typing import Any

import jax
import jax.numpy as jnp

from edkit.crystal import cell_basis_rows


def _rotation(angle: Any, i: int, j: int, xp: Any) -> Any:
    """Active rotation by ``angle`` (rad) in the (i, j) plane, i → j, shape (3, 3)."""
    angle = xp.asarray(angle)
    c, s = xp.cos(angle), xp.sin(angle)
    one, zero = xp.ones_like(c), xp.zeros_like(c)
    m = [[one, zero, zero], [zero, one, zero], [zero, zero, one]]
    m[i][i], m[i][j], m[j][i], m[j][j] = c, -s, s, c
    return xp.stack([xp.stack(row) for row in m])


def rotation_x(angle: Any, xp: Any = jnp) -> Any:
    """Active right-handed rotation about +x by ``angle`` (rad, scalar), shape (3, 3).

    ``xp=numpy`` gives a float64 numpy matrix for numpy bookkeeping (no JAX dispatch); the
    default ``jax.numpy`` is traceable and differentiable. The same holds for ``rotation_y/z``.
    """
    return _rotation(angle, 1, 2, xp)


def rotation_y(angle: Any, xp: Any = jnp) -> Any:
    """Active right-handed rotation about +y by ``angle`` (rad, scalar), shape (3, 3)."""
    return _rotation(angle, 2, 0, xp)


def rotation_z(angle: Any, xp: Any = jnp) -> Any:
    """Active right-handed rotation about +z by ``angle`` (rad, scalar), shape (3, 3)."""
    return _rotation(angle, 0, 1, xp)


def real_space_basis(cell: jax.Array) -> jax.Array:
    """Real-space cell vectors as rows, Cartesian crystal frame, Å, shape (3, 3).

    a along +x, b in the xy plane (positive y), c with positive z, built from the metric (lengths
    and angles), so a_i · a_j reproduces the cell's metric tensor exactly. The formula is
    :func:`edkit.crystal.cell_basis_rows`, shared with the validated numpy
    :func:`edkit.crystal.real_basis_of`; this one is differentiable and does not validate.

    Args:
      cell: (a, b, c, α, β, γ), lengths in Å, angles in **degrees** (as in a CIF), shape (6,).
    """
    cell = jnp.asarray(cell)
    angles = jnp.deg2rad(cell[3:])
    cosines = jnp.cos(angles)
    return cell_basis_rows(
        (cell[0], cell[1], cell[2]), (cosines[0], cosines[1], cosines[2]), jnp.sin(angles[2]), jnp
    )


def reciprocal_basis_from_real(real: jax.Array) -> jax.Array:
    """B = inv(real): reciprocal vectors a*, b*, c* as **columns**, Å⁻¹ without 2π, shape (3, 3).

    ``g = B @ hkl`` in the same Cartesian frame as ``real``; ``real @ B = I``.

    Args:
      real: real-space cell vectors as rows, Å, shape (3, 3) (:func:`real_space_basis`).
    """
    return jnp.linalg.inv(jnp.asarray(real))


@jax.custom_jvp
def polar_rotation(m: jax.Array) -> jax.Array:
    """The pure rotation (det +1) nearest to ``m`` in the Frobenius norm, shape (3, 3).

    With the SVD m = W S Vᵀ this is W D Vᵀ, D = diag(1, 1, sign det(W Vᵀ)) (the orthogonal polar
    factor when det m > 0). Its derivative is the closed form dR = W [(X − Xᵀ) ⊘ (s_i + s_j)] Vᵀ
    with X = Wᵀ dm V (singular values signed by D), which stays finite where the singular values are
    equal (m already a rotation), unlike differentiating the SVD itself.

    Args:
      m: a non-singular (3, 3) matrix, e.g. UB · real, nearly a rotation.
    """
    w, _, vt = _signed_svd(m)
    return w @ vt


def _signed_svd(m: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """SVD with the last left vector flipped so that det(W Vᵀ) = +1: m = W diag(s) Vᵀ, s₃ ≤ 0 ok."""
    w, s, vt = jnp.linalg.svd(jnp.asarray(m))
    d = jnp.sign(jnp.linalg.det(w @ vt))
    flip = jnp.stack([jnp.ones_like(d), jnp.ones_like(d), d])
    return w * flip[None, :], s * flip, vt


@polar_rotation.defjvp
def _polar_rotation_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]):
    (m,), (dm,) = primals, tangents
    w, s, vt = _signed_svd(m)
    x = w.T @ dm @ vt.T
    denom = s[:, None] + s[None, :]
    safe = jnp.where(jnp.abs(denom) > 0.0, denom, 1.0)
    omega = jnp.where(jnp.abs(denom) > 0.0, (x - x.T) / safe, 0.0)
    return w @ vt, w @ omega @ vt


def orientation_matrix(ub: jax.Array, cell: jax.Array) -> jax.Array:
    """U: rotation from the crystal Cartesian frame to the lab frame at zero goniometer angles.

    U = polar(UB · B⁻¹) = polar(UB · real), shape (3, 3), det +1. A PETS UB carries small metric
    residuals (≈1 % for the quartz file), which the polar factor removes.

    Args:
      ub: PETS orientation matrix, g_lab = UB @ hkl, Å⁻¹, shape (3, 3).
      cell: (a, b, c, α, β, γ), Å and degrees, shape (6,).
    """
    return polar_rotation(jnp.asarray(ub) @ real_space_basis(cell))


def frame_rotation(
    u: jax.Array,
    alpha: jax.Array,
    beta: jax.Array,
    omega: jax.Array,
    axis_position: jax.Array,
) -> jax.Array:
    """O = R_z(−φ) R_z(ω) R_x(α) R_y(β) U: crystal Cartesian → lab for one frame, shape (3, 3).

    Every frame's zone axis u a + v b + w c then points along lab +z (science.md §5). Lift over
    frames with ``jax.vmap(frame_rotation, in_axes=(None, 0, 0, 0, None))``.

    Args:
      u: :func:`orientation_matrix`, shape (3, 3).
      alpha, beta, omega: the frame's goniometer angles, **radians**, scalars.
      axis_position: φ, the dataset's rotation axis position, radians, scalar.
    """
    goniometer = (
        rotation_z(-jnp.asarray(axis_position))
        @ rotation_z(omega)
        @ rotation_x(alpha)
        @ rotation_y(beta)
    )
    return goniometer @ jnp.asarray(u)
