"""``python -m tropfast``: the ``tropfast`` command (also ``torchrun -m tropfast ...``)."""
import sys

from .cli import main

sys.exit(main())
