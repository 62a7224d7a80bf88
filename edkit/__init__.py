"""edkit: hybrid Bloch-wave + neural-network refinement against 3D electron diffraction data."""

from edkit.errors import EdkitError

__all__ = ["EdkitError"]
__version__ = "0.1.0"
