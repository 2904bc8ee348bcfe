"""Hugging Face interop: import (``from_hf``), export (``to_hf``), either-folder loading (``from_pretrained``),
conversion of attention to efficient mixers (``convert``, LightTransfer's ``stream_convert``) and distillation
of a converted model from its original (``distill``)."""

from efformer.interop.convert import Conversion, attention_mass, convert, stream_convert
from efformer.interop.distill import Distilled, distill
from efformer.interop.heads import FirstTokenClassifier, MaskedLM
from efformer.interop.hf import from_hf, from_pretrained, to_hf

__all__ = ["Conversion", "Distilled", "FirstTokenClassifier", "MaskedLM", "attention_mass", "convert", "distill",
           "from_hf", "from_pretrained", "stream_convert", "to_hf"]
