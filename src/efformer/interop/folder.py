"""Reading a Hugging Face model folder: ``config.json`` plus one safetensors file or an index of shards.

Only safetensors are read (never pickle); every problem with the folder is a ``CheckpointError``
naming the file and the fix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from efformer.errors import CheckpointError

CONFIG, SINGLE, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
_CONVERT = (
    "convert it to safetensors in an environment you trust: `model.save_pretrained(dir, safe_serialization=True)` "
    "with transformers, or `safetensors.torch.save_file(torch.load(path, weights_only=True), "
    "'model.safetensors')` (efformer never unpickles a user's file)"
)


def read_json(path: Path, what: str) -> dict:
    """The JSON object in ``path``; a CheckpointError naming the file if it is missing or malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {what}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path} ({e}); restore the file from the model's source") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); restore the file from the "
                              "model's source") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} must hold a JSON object {{...}}; restore the file from the model's source")
    return obj


def hf_folder(path: str | os.PathLike) -> Path:
    """``path`` as a folder holding ``config.json``; a CheckpointError that says what a folder needs."""
    if not isinstance(path, str | os.PathLike) or str(path) == "":
        raise CheckpointError(f"{path!r} is not a folder path; pass the folder holding config.json and "
                              "model.safetensors")
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; pass a folder written by efformer.save (or "
                              "save_pretrained) or a local Hugging Face model folder (config.json + "
                              "model.safetensors; efformer never downloads)")
    return folder


class Weights:
    """Lazy access to the tensors of a folder's safetensors file(s): ``name -> Tensor`` on request."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.where = self._locate(folder)  # tensor name -> file
        self._open: dict[Path, object] = {}

    @staticmethod
    def _locate(folder: Path) -> dict[str, Path]:
        single, index = folder / SINGLE, folder / INDEX
        if index.exists():
            weight_map = read_json(index, "the shard index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no 'weight_map' of tensor name -> shard file; re-save the model "
                                      "with save_pretrained")
            where = {}
            for name, shard in weight_map.items():
                file = folder / str(shard)
                if not file.is_file():
                    raise CheckpointError(f"{index} names the shard {shard!r} (for tensor {name!r}) but {file} is "
                                          "missing; copy every shard the index lists into the folder")
                where[name] = file
            return where
        if single.exists():
            return dict.fromkeys(_keys(single), single)
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise CheckpointError(f"{folder} holds only pickle weights ({', '.join(pickles[:3])}), which efformer "
                                  f"does not load; {_CONVERT}")
        raise CheckpointError(f"{folder} has no {SINGLE} or {INDEX}; put the model's safetensors weights there")

    def names(self) -> set[str]:
        """Every tensor name in the folder."""
        return set(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` without reading it."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` (read now)."""
        try:
            return self._handle(name).get_tensor(name)
        except Exception as e:  # a shard cut short after its header reads past the end of the file
            raise CheckpointError(f"{self.where[name]}: cannot read tensor {name!r} ({type(e).__name__}: {e}); the "
                                  "file is truncated or corrupt: copy it again from the model's source") from None

    def _handle(self, name: str):
        file = self.where[name]
        if file not in self._open:
            self._open[file] = _safe_open(file)
        return self._open[file]


def _safe_open(file: Path):
    try:
        handle = safe_open(str(file), framework="pt")
    except Exception as e:  # the parser's error types are no documented contract: any failure is bad bytes
        raise CheckpointError(f"{file} is truncated or corrupt ({type(e).__name__}: {e}); copy it again from the "
                              "model's source") from None
    size = file.stat().st_size
    # safe_open maps the file lazily: a shard cut inside its data only fails when a tensor is read, so
    # compare the header's promised data end with the file size up front.
    end = _data_end(file)
    if end > size:
        raise CheckpointError(f"{file} is truncated: its header describes {end} bytes but the file has {size}; "
                              "copy it again from the model's source")
    return handle


def _data_end(file: Path) -> int:
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    offsets = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(offsets, default=0)


def _keys(file: Path) -> list[str]:
    with _safe_open(file) as f:
        return list(f.keys())
