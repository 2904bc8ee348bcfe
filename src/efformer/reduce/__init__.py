"""Token reduction between the blocks of any encoder: ToMe, PiToMe, Zero-TPrune, MCTF, Token Transforming."""

from efformer.reduce.api import apply, remove
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
from efformer.reduce.methods import MCTF, METHODS, Method, PiToMe, TokenTransforming, ToMe, ZeroTPrune, get_method

__all__ = [
    "MCTF", "METHODS", "Assignment", "LogSizeBias", "Method", "PiToMe", "ReduceError", "Reducer", "Schedule",
    "ToMe", "TokenTransforming", "Tokens", "ZeroTPrune", "apply", "combine", "get_method", "remove",
    "transform_tokens", "unmerge",
]
