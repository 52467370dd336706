"""``python -m netra_actors`` runs the ``netra-actors`` command."""

import sys

from ._cli import main

sys.exit(main())
