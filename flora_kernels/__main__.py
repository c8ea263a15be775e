"""``python -m flora_kernels info`` (versions, device, backends) and ``... bench`` (= flora-bench)."""

import sys

from .cli import main

sys.exit(main())
