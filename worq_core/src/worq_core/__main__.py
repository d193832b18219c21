"""``python -m worq_core``: the ``worq`` command line."""

from worq_core.cli import main

main()
