"""Converters between flora_kernels adapters and other formats.

- ``paper``: the public reference code of the paper (``param_G``, ``param_0`` .. ``param_{N-1}``).
- ``peft``: PEFT LoRA export (core folded into the factors) and exact import.
- ``lycoris``: LyCORIS LoCon import (plain and Tucker ``lora_mid``) and kohya/LyCORIS export.
- ``extract``: FLoRA adapters from full fine-tunes (``extract_flora``, CLI ``flora-extract``) and
  re-ranking of adapters (``rerank_flora``).

None of these imports the other library: the formats are read and written directly.
"""

from .extract import ExtractionReport, LayerReport, extract_flora, rerank_flora
from .lycoris import KOHYA_PREFIXES, LYCORIS_PREFIX, export_lycoris, import_lycoris, plan_lycoris, to_lycoris
from .paper import PAPER_CORE, from_paper_reference, load_paper_reference, paper_to_ours
from .peft import export_peft, import_peft, plan_peft, to_peft

__all__ = [
    "KOHYA_PREFIXES",
    "LYCORIS_PREFIX",
    "PAPER_CORE",
    "ExtractionReport",
    "LayerReport",
    "export_lycoris",
    "export_peft",
    "extract_flora",
    "from_paper_reference",
    "import_lycoris",
    "import_peft",
    "load_paper_reference",
    "paper_to_ours",
    "plan_lycoris",
    "plan_peft",
    "rerank_flora",
    "to_lycoris",
    "to_peft",
]
