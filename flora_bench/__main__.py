"""``python -m flora_bench ...``: the same as ``flora-bench``."""

import sys

from .cli import main

sys.exit(main())
