"""Run the dermfs command line as ``python -m dermfs``."""

from dermfs.cli import main

raise SystemExit(main())
