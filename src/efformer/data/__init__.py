"""Long Range Arena data: seeded generators (ListOps, Pathfinder) and readers for the released files."""

from efformer.data.listops import ListOpsConfig
from efformer.data.loaders import (
    PairDataset,
    TokenDataset,
    read_aan_tsv,
    read_cifar10,
    read_cifar10_bin,
    read_imdb,
    read_listops_tsv,
    read_pathfinder,
)
from efformer.data.pathfinder import params_for

__all__ = ["ListOpsConfig", "PairDataset", "TokenDataset", "params_for", "read_aan_tsv", "read_cifar10",
           "read_cifar10_bin", "read_imdb", "read_listops_tsv", "read_pathfinder"]
