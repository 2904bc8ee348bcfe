"""Token reduction between the blocks of any encoder: ToMe, PiToMe, Zero-TPrune, MCTF, Token Transforming;
trainable LTM and IA-RED² (reduce.learned) and the CLCA plug-in head (reduce.cache)."""

from efformer.reduce.api import apply, remove
from efformer.reduce.cache import CLCA
from efformer.reduce.hook import (
    Assignment,
    LogSizeBias,
    ReduceError,
    Reducer,
    Schedule,
    Tokens,
    combine,
    transform_tokens,
    unmerge,
)
from efformer.reduce.learned import IARED2, LTM, train_loss
from efformer.reduce.methods import MCTF, METHODS, Method, PiToMe, TokenTransforming, ToMe, ZeroTPrune, get_method

__all__ = [
    "CLCA", "IARED2", "LTM", "MCTF", "METHODS", "Assignment", "LogSizeBias", "Method", "PiToMe", "ReduceError",
    "Reducer", "Schedule", "ToMe", "TokenTransforming", "Tokens", "ZeroTPrune", "apply", "combine", "get_method",
    "remove", "train_loss", "transform_tokens", "unmerge",
]
