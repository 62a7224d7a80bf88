"""The example data shipped with edkit: ``edkit.example_file("quartz_experimental.cif_pets")``.

Structures (``data/structures``: quartz, quartz_kinematical, quartz_displaced_0N, pyrite,
glycine, borane) and PETS2 datasets (``data/pets``: quartz_experimental, quartz_synthetic,
glycine_dyn, albite); sources and licences in ``edkit/data/README.md``.
"""

from importlib.resources import files
from pathlib import Path

from edkit.errors import EdkitError

_FOLDERS = ("structures", "pets")

__all__ = ["example_file", "example_files"]


def _folder(kind: str) -> Path:
    return Path(str(files("edkit") / "data" / kind))


def example_files() -> dict[str, Path]:
    """Every bundled example file by name (``.cif`` structures and ``.cif_pets`` datasets)."""
    found: dict[str, Path] = {}
    for kind in _FOLDERS:
        for path in sorted(_folder(kind).iterdir()):
            if path.suffix in (".cif", ".cif_pets"):
                found[path.name] = path
    return found


def example_file(name: str) -> Path:
    """The path of a bundled example file, e.g. ``"quartz.cif"`` or ``"albite.cif_pets"``.

    Raises:
      EdkitError: no bundled file has that name (the message lists the names there are).
    """
    available = example_files()
    if name not in available:
        raise EdkitError(f"no bundled example file {name!r}; the examples are {sorted(available)}")
    return available[name]
