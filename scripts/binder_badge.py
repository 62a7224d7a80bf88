"""Point the README's Binder badge at this repository, read from the git remote.

``python scripts/binder_badge.py`` (``make binder-badge``) reads ``git remote get-url origin``
(https://github.com/OWNER/REPO(.git) or git@github.com:OWNER/REPO(.git)) and rewrites the badge's
``mybinder.org/v2/gh/OWNER/REPO/HEAD`` part; ``--check`` only says whether it matches. Without a
GitHub remote the README keeps its placeholder and the script says how to set one.
"""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BADGE = re.compile(r"https://mybinder\.org/v2/gh/[^/\s]+/[^/\s]+/HEAD")
REMOTE = re.compile(r"github\.com[:/]([^/\s]+)/([^/\s]+?)(?:\.git)?/?$")


def github_repository(remote: str) -> tuple[str, str] | None:
    """(owner, repository) of a GitHub remote URL, or None for any other remote."""
    match = REMOTE.search(remote.strip())
    return (match.group(1), match.group(2)) if match else None


def badge_target(owner: str, repository: str) -> str:
    return f"https://mybinder.org/v2/gh/{owner}/{repository}/HEAD"


def main(argv: list[str]) -> int:
    try:
        remote = subprocess.run(
            ["git", "remote", "get-url", "origin"], cwd=ROOT, capture_output=True, text=True,
            check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        remote = ""
    repository = github_repository(remote)
    if repository is None:
        print(
            "no GitHub remote 'origin': the README's Binder badge keeps its placeholder; "
            "git remote add origin https://github.com/OWNER/REPO.git, then make binder-badge"
        )
        return 0
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    target = badge_target(*repository)
    current = BADGE.search(text)
    if current is None:
        print("README.md has no Binder badge", file=sys.stderr)
        return 1
    if current.group(0) == target:
        print(f"Binder badge: {target}")
        return 0
    if "--check" in argv:
        print(
            f"Binder badge {current.group(0)} != {target}: run make binder-badge", file=sys.stderr
        )
        return 1
    readme.write_text(BADGE.sub(target, text), encoding="utf-8")
    print(f"Binder badge now {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
