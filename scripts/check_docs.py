"""After `mkdocs build`: every public name has an entry in the API reference.

Public names: ``edkit.__all__`` and the ``__all__`` of every module the API pages document
(``::: module`` lines in docs/api/*.md). A name counts as listed when the built pages carry an
anchor for it under the documented module or under the module that defines it.
"""

import importlib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "build" / "site" / "api"


def main() -> int:
    anchors: set[str] = set()
    for page in SITE.rglob("*.html"):
        anchors |= set(re.findall(r'id="(edkit[\w.]*)"', page.read_text(encoding="utf-8")))
    modules = ["edkit"]
    for page in sorted((ROOT / "docs" / "api").glob("*.md")):
        modules += re.findall(r"^::: (edkit[\w.]*)", page.read_text(), flags=re.MULTILINE)
    missing = []
    for module_name in dict.fromkeys(modules):
        if module_name not in anchors:
            missing.append(module_name)
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", []):
            value = getattr(module, name)
            places = {f"{module_name}.{name}", getattr(value, "__name__", "")}
            defining = getattr(value, "__module__", None)
            if defining:
                places.add(f"{defining}.{name}")
            if not places & anchors:
                missing.append(f"{module_name}.{name}")
    if missing:
        print("not in the API reference:", ", ".join(missing), file=sys.stderr)
        return 1
    print(f"API reference: {len(dict.fromkeys(modules))} modules, every public name listed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
