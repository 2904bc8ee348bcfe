"""Hugging Face interop: import (``from_hf``), export (``to_hf``) and either-folder loading (``from_pretrained``)."""

from efformer.interop.heads import FirstTokenClassifier, MaskedLM
from efformer.interop.hf import from_hf, from_pretrained, to_hf

__all__ = ["FirstTokenClassifier", "MaskedLM", "from_hf", "from_pretrained", "to_hf"]
