"""Training checkpoints without pickle: one safetensors file (model, optimizer moments, RNG states)
plus a JSON manifest (step, data position, optimizer hyper-parameters, file sizes and SHA-256).

Each checkpoint is a folder ``step_00000042`` written under a temporary name and renamed into place,
so a crash mid-write never leaves a half-written checkpoint; a damaged one is refused on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from efformer.durable import fsync_file
from efformer.errors import CheckpointError

FORMAT, VERSION = "efformer-train-checkpoint", 1
TENSORS, MANIFEST = "tensors.safetensors", "state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


# ---- optimizer and RNG state <-> (tensors, JSON) ---------------------------------------------
def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an FQN-keyed optimizer state dict into tensors ``optim/<param>/<key>`` and JSON metadata."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, Tensor):
                tensors[f"optim/{name}/{key}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(name), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer`."""
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            name, _, sub = key[len("optim/") :].rpartition("/")
            state.setdefault(name, {})[sub] = value
    for name, values in meta["scalars"].items():
        state.setdefault(name, {}).update(values)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Current torch (CPU and CUDA), NumPy and Python RNG states as tensors + JSON."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(keys.astype(np.int64))
    py = random.getstate()
    return tensors, {"python": [py[0], list(py[1]), py[2]], "numpy": [kind, int(pos), int(has_gauss), float(gauss)]}


def set_rng_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Restore the RNG states saved by :func:`rng_state`."""
    torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng/cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    v, st, g = meta["python"]
    random.setstate((v, tuple(st), g))


# ---- writing and reading checkpoint folders --------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(root: str | os.PathLike, step: int, tensors: dict[str, Tensor], meta: dict[str, Any],
                    keep_last: int = 3) -> Path:
    """Write ``root/step_<step>`` atomically (temp folder, then rename) and keep the last ``keep_last``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step_{step:08d}.", suffix=".tmp"))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS),
                  metadata={"format": FORMAT})
        fsync_file(tmp / TENSORS)
        manifest = {"format": FORMAT, "version": VERSION, "step": step, **meta,
                    "files": {TENSORS: {"size": (tmp / TENSORS).stat().st_size, "sha256": _sha256(tmp / TENSORS)}}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        fsync_file(tmp / MANIFEST)
        if final.exists():  # re-saving a step (e.g. after a resume) replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Checkpoint folders under ``root`` in step order (temporary folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a checkpoint folder, a checkpoints folder or a run folder (latest)."""
    p = Path(path)
    if (p / MANIFEST).exists():
        return p
    for root in (p / "checkpoints", p):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise CheckpointError(f"no checkpoint found at {p}; give a step_* folder, its checkpoints folder or a run folder")


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, manifest) of a checkpoint; refuses missing, truncated or corrupt files with CheckpointError."""
    ckpt = resolve_checkpoint(path)
    man_path = ckpt / MANIFEST
    try:
        manifest = json.loads(man_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{man_path} is missing; {ckpt} is not a complete checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{man_path} is corrupt ({e}); delete {ckpt} and resume from an earlier one") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{man_path} is not an efformer training checkpoint manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{man_path} has version {manifest.get('version')}, this efformer reads {VERSION}")
    t_path = ckpt / TENSORS
    expect = manifest["files"][TENSORS]
    if not t_path.is_file():
        raise CheckpointError(f"{t_path} is missing; delete {ckpt} and resume from an earlier checkpoint")
    size = t_path.stat().st_size
    if size != expect["size"]:
        raise CheckpointError(f"{t_path} is truncated or padded: {size} bytes, the manifest says {expect['size']}; "
                              f"delete {ckpt} and resume from an earlier checkpoint")
    if _sha256(t_path) != expect["sha256"]:
        raise CheckpointError(f"{t_path} is corrupt (SHA-256 mismatch); delete {ckpt} and resume from an earlier one")
    try:
        tensors = load_file(str(t_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{t_path} cannot be read ({e})") from None
    return tensors, manifest


def model_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The model weights (FQN -> tensor) inside a checkpoint's tensors."""
    return {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
