"""Entry point: ``python -m benchmarks [--quick] [--json FILE]``."""

from benchmarks.run import main

raise SystemExit(main())
