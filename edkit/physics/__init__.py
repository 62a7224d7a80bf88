"""Pure JAX physics: constants, scattering, structure factors, geometry, Bloch-wave solvers."""
