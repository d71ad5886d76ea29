"""``python -m overlaycache`` runs the command line."""

import sys

from overlaycache.cli import main

sys.exit(main())
