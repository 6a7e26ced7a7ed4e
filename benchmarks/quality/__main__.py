"""``python -m benchmarks.quality``: the quality benchmark from a source checkout."""
import sys

from .run import main

sys.exit(main())
