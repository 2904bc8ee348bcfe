"""Hugging Face interop: import (``from_hf``), export (``to_hf``), either-folder loading (``from_pretrained``),
and conversion of attention to efficient mixers (``convert``, LightTransfer's ``stream_convert``)."""

from efformer.interop.convert import Conversion, attention_mass, convert, stream_convert
from efformer.interop.heads import FirstTokenClassifier, MaskedLM
from efformer.interop.hf import from_hf, from_pretrained, to_hf

__all__ = ["Conversion", "FirstTokenClassifier", "MaskedLM", "attention_mass", "convert", "from_hf", "from_pretrained",
           "stream_convert", "to_hf"]
