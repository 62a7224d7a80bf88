"""``python -m edkit.cli``."""

from edkit.cli import main

raise SystemExit(main())
