"""``python -m fastssl`` runs the ``fastssl`` command."""
import sys

from .cli import main

sys.exit(main())
