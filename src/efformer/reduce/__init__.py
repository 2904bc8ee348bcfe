"""Token reduction in any encoder: ToMe, PiToMe, Zero-TPrune, MCTF, Token Transforming; windowed merging in
Swin stages; Expediting-ViT's token clustering and reconstruction; trainable LTM and IA-RED² (reduce.learned)
and the CLCA plug-in head (reduce.cache)."""

from efformer.reduce.api import apply, cluster_apply, remove
from efformer.reduce.cache import CLCA
from efformer.reduce.cluster import ClusterOptions, cluster_tokens, reconstruct, relation
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
    "CLCA", "IARED2", "LTM", "MCTF", "METHODS", "Assignment", "ClusterOptions", "LogSizeBias", "Method", "PiToMe",
    "ReduceError", "Reducer", "Schedule", "ToMe", "TokenTransforming", "Tokens", "ZeroTPrune", "apply",
    "cluster_apply", "cluster_tokens", "combine", "get_method", "reconstruct", "relation", "remove", "train_loss",
    "transform_tokens", "unmerge",
]
