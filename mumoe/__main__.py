"""``python -m mumoe``: the command line (see :mod:`mumoe.cli`)."""

from mumoe.cli import main

raise SystemExit(main())
