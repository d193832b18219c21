"""A module that fails while being imported, for the CLI's error message."""

from __future__ import annotations

raise RuntimeError("this module is broken on purpose")
