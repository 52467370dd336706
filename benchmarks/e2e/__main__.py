"""``python -m benchmarks.e2e`` (from the repository root)."""

import sys

from .harness import main

sys.exit(main())
