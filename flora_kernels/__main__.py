"""``python -m flora_kernels info``: versions, device, backends."""

import sys

from .cli import main

sys.exit(main())
