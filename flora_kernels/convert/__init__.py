"""Importers of adapters saved by other FLoRA implementations into flora_kernels layers.

- ``paper``: the public reference code of the paper (``param_G``, ``param_0`` .. ``param_{N-1}``).
"""

from .paper import PAPER_CORE, from_paper_reference, load_paper_reference, paper_to_ours

__all__ = ["PAPER_CORE", "from_paper_reference", "load_paper_reference", "paper_to_ours"]
