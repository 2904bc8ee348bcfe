"""``save``/``load``: a model folder is ``config.json`` + ``model.safetensors`` + ``manifest.json``.

On disk, and why (``save(model, "runs/m")``):

* The whole folder is written under a hidden sibling ``runs/.m.tmp-<id>``: ``config.json``, then
  ``model.safetensors``, then ``manifest.json`` (format, version, size and SHA-256 of both files),
  each fsynced; only a complete folder is ever put in place, by renames, so a process killed at any
  moment leaves ``runs/m`` holding the old model or the new one, never a mix.
* A first save is one rename ``.m.tmp-<id> -> m``. Replacing a model is two renames,
  ``m -> .m.old-<id>`` then ``.m.tmp-<id> -> m``, after which the old folder is deleted. Between the
  two renames ``m`` is absent: ``load`` then reads ``.m.old-<id>`` (the old model), but only while
  its partner ``.m.tmp-<id>`` still exists, because that pair marks exactly an interrupted swap; a
  leftover ``.old`` whose partner was renamed into place is stale and never read.
* Saves into one parent folder hold an advisory lock on it (``flock``, where the OS has it), so one
  save never deletes another's temporaries. A save that raises removes its temporary folder (and
  puts the old folder back if it had moved it); every successful save then deletes the leftovers
  (``.m.tmp-*``, ``.m.old-*``) of earlier killed saves to the same folder.
* ``save`` replaces the whole folder, so it refuses a folder holding anything but a saved model.

Load policy: with ``manifest.json``, both files must match their recorded size and SHA-256, so a
flipped bit or an edit after saving is refused, naming the file. A folder without a manifest (made
by hand, or by efformer before manifests existed) is still loaded, after the structural checks only
(valid JSON config, parseable safetensors, exactly the right tensor names and shapes): it has no
integrity check. Anything wrong with the folder raises ``CheckpointError``; a bad argument raises
``ConfigError``. Files honour the umask (``0o666 & ~umask``, folders ``0o777 & ~umask``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file
from torch import nn

from efformer.durable import fsync_dir, fsync_file
from efformer.errors import CheckpointError, ConfigError, EfformerError
from efformer.models.block_transformer import BlockTransformerLM
from efformer.models.config import ModelConfig, build_config
from efformer.models.factory import MODEL_CLASSES, model_class
from efformer.models.vision import VisionConfig, build_vision_config

try:
    import fcntl
except ImportError:  # Windows: no flock; concurrent saves to one folder are then the caller's problem
    fcntl = None

CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE = "config.json", "model.safetensors", "manifest.json"
FORMAT, VERSION = "efformer-model", 1
PAYLOAD = (CONFIG_FILE, WEIGHTS_FILE)
# Files a folder may carry beside the model, written by ``save(..., extra=...)``: the text tokenizer.
EXTRA_FILES = ("tokenizer.json",)
_TMP, _OLD = ".tmp-", ".old-"
_RESAVE = "re-save the model with efformer.save"
# Extra sections of config.json, written from the model attribute of the same name and applied on load
# before the weights are read (e.g. "quantization": compress/ swaps in its quantized linears).
CONFIG_SECTIONS: dict[str, Callable[[nn.Module, dict, Path], None]] = {}


# ---- save ------------------------------------------------------------------------------------
def save(model: nn.Module, directory: str | os.PathLike, extra: dict[str, bytes] | None = None) -> Path:
    """Write ``model`` as the folder ``directory`` (with the ``extra`` files, named from EXTRA_FILES); a kill
    at any moment leaves the old or the new model."""
    cfg = _check_model(model)
    out = _check_save_target(directory)
    extra = dict(extra or {})
    unknown = sorted(n for n in extra if n not in EXTRA_FILES)
    if unknown:
        raise ConfigError("extra", unknown, f"file names among {', '.join(EXTRA_FILES)}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    sections = {k: getattr(model, k) for k in CONFIG_SECTIONS if getattr(model, k, None)}

    def write(tmp: Path) -> None:
        for name, data in extra.items():
            _write_bytes(tmp / name, data)
        _write_folder(tmp, cfg, tensors, sections)  # fsyncs the folder last

    return publish_folder(out, write, "save")


def publish_folder(out: Path, write: Callable[[Path], None], verb: str) -> Path:
    """Run ``write(tmp)`` on a fresh hidden sibling of ``out``, then swap it into place (see the module
    docstring); any failure leaves ``out`` as it was and removes the temporary folder."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the folder {out.parent} ({e.strerror}); {verb} to a writable folder") \
            from None
    with _locked(out.parent):
        had_old, tmp = out.is_dir(), None
        try:
            if had_old:  # a complete folder is in place, so leftovers of killed writes are garbage now
                _remove_leftovers(out)
            tmp = _make_temp_dir(out)
            write(tmp)
            _install(tmp, out)
        except BaseException as e:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError | SafetensorError) and not isinstance(e, EfformerError):
                kept = f"the model already at {out} is unchanged" if had_old else "nothing was written"
                raise CheckpointError(f"could not {verb} to {out} ({e}); {kept}") from None
            raise
        _remove_leftovers(out)
        fsync_dir(out.parent)
    return out


def save_pretrained(self: nn.Module, directory: str | os.PathLike) -> Path:
    """``efformer.save(model, directory)`` in Hugging Face's spelling; ``efformer.from_pretrained`` reads it back."""
    return save(self, directory)


# Every model class gets the method here, beside ``save``: the class modules cannot import this one,
# which imports them (through the factory).
for _cls in (*MODEL_CLASSES.values(), BlockTransformerLM):
    _cls.save_pretrained = save_pretrained


def _check_model(model: object) -> ModelConfig:
    """The config of an efformer model; refuses anything else before a byte is written."""
    cfg = getattr(model, "cfg", None)
    cls = model_class(cfg) if isinstance(cfg, ModelConfig | VisionConfig) else None
    if cls is None or not isinstance(model, cls):
        raise ConfigError("model", type(model).__name__,
                          "save takes an efformer model (from efformer.create_model or efformer.load); "
                          "unwrap DDP/FSDP (.module) or torch.compile (._orig_mod) first")
    return cfg


def _as_path(directory: object) -> Path:
    """``directory`` as an absolute path with symlinks resolved (so the swap happens where the files are)."""
    if not isinstance(directory, str | os.PathLike) or str(directory) == "":
        raise ConfigError("directory", directory, "a folder path (str or os.PathLike)")
    out = Path(os.path.realpath(directory))
    if out.name == "":
        raise ConfigError("directory", str(directory), "a folder below the file-system root")
    return out


def _is_model_entry(name: str) -> bool:
    """Files a model folder may hold; ``.X.*.tmp`` are leftovers of efformer's older per-file writes."""
    if name in (*PAYLOAD, MANIFEST_FILE, *EXTRA_FILES):
        return True
    return any(name.startswith(f".{f}.") and name.endswith(".tmp") for f in PAYLOAD)


def _check_save_target(directory: object) -> Path:
    """Refuse, before writing, a target that is a file, lies under a file, or holds other files."""
    out = _as_path(directory)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"cannot save to {out}: it is a file, not a folder; pass a folder path "
                              "(a new one, or one that holds a saved model)")
    for above in out.parents:
        if above.exists():
            if not above.is_dir():
                raise CheckpointError(f"cannot save to {out}: {above} is a file, not a folder; "
                                      "choose a path whose parents are folders")
            break
    if out.is_dir():
        try:
            others = sorted(n for n in os.listdir(out) if not _is_model_entry(n))
        except OSError as e:
            raise CheckpointError(f"cannot read the folder {out} ({e.strerror})") from None
        if others:
            raise CheckpointError(
                f"cannot save to {out}: it holds files that are not part of a saved model ({', '.join(others[:5])}); "
                "save replaces the whole folder, so pick a new or empty folder or move those files away"
            )
    return out


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``folder`` (released by the OS even on SIGKILL); best effort."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; go on without the lock
        fd = None
    try:
        if fd is not None and fcntl is not None:
            with contextlib.suppress(OSError):  # e.g. NFS without lock support
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _make_temp_dir(out: Path) -> Path:
    """A fresh ``.NAME.tmp-<id>`` next to ``out``, made by mkdir so its mode honours the umask (mkdtemp: 0o700)."""
    while True:
        token = secrets.token_hex(6)
        tmp, old = _sibling(out, _TMP, token), _sibling(out, _OLD, token)
        if old.exists():
            continue
        with contextlib.suppress(FileExistsError):
            os.mkdir(tmp, 0o777)
            return tmp


def _sibling(out: Path, kind: str, token: str) -> Path:
    return out.with_name(f".{out.name}{kind}{token}")


def _write_folder(folder: Path, cfg: ModelConfig, tensors: dict[str, torch.Tensor], sections: dict | None = None) \
        -> None:
    """Config (plus extra sections), weights, then the manifest that vouches for both; each fsynced, then the folder."""
    text = cfg.to_json() if not sections else json.dumps({**cfg.model_dump(), **sections}, indent=2, sort_keys=True)
    cfg_bytes = text.encode("utf-8")
    _write_bytes(folder / CONFIG_FILE, cfg_bytes)
    # open() gave config.json 0o666 & ~umask; safetensors writes 0o600, so copy the mode over.
    mode = stat.S_IMODE(os.stat(folder / CONFIG_FILE).st_mode)
    weights = folder / WEIGHTS_FILE
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with contextlib.suppress(OSError):  # some file systems (FAT, some mounts) refuse chmod; the mode is a nicety
        os.chmod(weights, mode)
    fsync_file(weights)
    files = {CONFIG_FILE: _digest(cfg_bytes), WEIGHTS_FILE: _file_digest(weights)}
    manifest = {"format": FORMAT, "version": VERSION, "files": files}
    _write_bytes(folder / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8"))
    fsync_dir(folder)


def _install(tmp: Path, out: Path) -> None:
    """Put the complete folder ``tmp`` at ``out``; see the module docstring for the leftover states."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = _sibling(out, _OLD, tmp.name.rpartition(_TMP)[2])
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)  # put the old model back: a failed save changes nothing
        raise
    shutil.rmtree(old, ignore_errors=True)  # whatever survives is removed by the next save


def _leftovers(out: Path, kind: str) -> list[Path]:
    """The ``.NAME<kind>*`` siblings of ``out`` (listdir, not glob: NAME may hold glob characters)."""
    prefix = f".{out.name}{kind}"
    try:
        return sorted(out.parent / n for n in os.listdir(out.parent) if n.startswith(prefix))
    except OSError:
        return []


def _remove_leftovers(out: Path) -> None:
    """Delete ``.NAME.tmp-*`` then ``.NAME.old-*`` (tmp first, so no old/tmp pair outlives its meaning)."""
    for kind in (_TMP, _OLD):
        for p in _leftovers(out, kind):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):  # whatever survives is removed by the next save
                    p.unlink()


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _digest(data: bytes) -> dict[str, object]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _file_digest(path: Path) -> dict[str, object]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


# ---- load ------------------------------------------------------------------------------------
def load(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save`; refuses missing, corrupt or mismatched files with CheckpointError."""
    device = _check_device(map_location)
    out = _as_path(directory)
    # A save finishing meanwhile may delete the folder we opened; a second look finds the new one.
    for attempt in (0, 1):
        folder = _folder_to_read(out)
        try:
            files = _read_folder(folder)
            break
        except FileNotFoundError:
            if attempt:
                raise CheckpointError(f"{out} changed while it was read; try again") from None
    for name in PAYLOAD:
        if files[name] is None:
            raise CheckpointError(f"{folder / name} is missing; a saved model is a folder with {CONFIG_FILE} "
                                  f"and {WEIGHTS_FILE} (made by efformer.save)")
    if files[MANIFEST_FILE] is not None:
        _verify(folder, files)
    cfg, sections = _parse_config(folder / CONFIG_FILE, files[CONFIG_FILE])
    model = model_class(cfg)(cfg)
    for key, section in sections.items():
        CONFIG_SECTIONS[key](model, section, folder / CONFIG_FILE)
    _load_weights(model, folder / WEIGHTS_FILE, files[WEIGHTS_FILE], folder / CONFIG_FILE)
    return model.to(device)


def _check_device(map_location: object) -> torch.device:
    """``map_location`` as a device this machine has, or a ConfigError naming it."""
    try:
        dev = torch.device(map_location)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError("map_location", map_location, "'cpu', 'cuda', 'cuda:N', 'mps' or a torch.device") \
            from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError("map_location", map_location, "CUDA is not available on this machine; use 'cpu'")
        if dev.index is not None and dev.index >= n:
            raise ConfigError("map_location", map_location,
                              f"this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
        return dev
    backend = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type, None)
    if not callable(getattr(backend, "is_available", None)) or not backend.is_available():
        raise ConfigError("map_location", map_location, f"device type {dev.type!r} is not available here; use 'cpu'")
    return dev


def _folder_to_read(out: Path) -> Path:
    """``out``, or the old folder of a swap interrupted between its two renames (see the module docstring)."""
    if out.is_dir():
        return out
    if out.exists():
        raise CheckpointError(f"{out} is a file, not a model folder; pass the folder that efformer.save wrote")
    for old in _leftovers(out, _OLD):
        if old.is_dir() and _sibling(out, _TMP, old.name.rpartition(_OLD)[2]).is_dir():
            return old
    raise CheckpointError(f"{out} is missing; pass a folder made by efformer.save")


def _read_folder(folder: Path) -> dict[str, bytes | None]:
    """The bytes of the payload and the manifest (None if absent), all read through one open folder handle
    where the OS allows, so that a concurrent save's renames cannot mix files of two folders."""
    names = (*PAYLOAD, MANIFEST_FILE)
    dir_fd = None
    if os.open in os.supports_dir_fd:
        try:
            dir_fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError as e:
            if isinstance(e, FileNotFoundError):
                raise  # renamed away since we looked: the caller looks again
            raise CheckpointError(f"cannot open the folder {folder} ({e.strerror})") from None
    try:
        out: dict[str, bytes | None] = {}
        for name in names:
            try:
                fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd) if dir_fd is not None \
                    else os.open(folder / name, os.O_RDONLY)
                with os.fdopen(fd, "rb") as f:
                    out[name] = f.read()
            except FileNotFoundError:
                out[name] = None
            except OSError as e:  # e.g. no permission, or a folder named config.json
                raise CheckpointError(f"cannot read {folder / name} ({e.strerror})") from None
        if dir_fd is not None and any(out[n] is None for n in PAYLOAD) and not _same_dir(dir_fd, folder):
            raise FileNotFoundError(folder)  # swapped away and emptied while we read: the caller looks again
        return out
    finally:
        if dir_fd is not None:
            os.close(dir_fd)


def _same_dir(dir_fd: int, path: Path) -> bool:
    """Whether ``path`` still names the folder open as ``dir_fd``."""
    try:
        a, b = os.fstat(dir_fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _verify(folder: Path, files: dict[str, bytes | None]) -> None:
    """Every payload file matches the size and SHA-256 in the manifest, or a CheckpointError naming it."""
    man_path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(files[MANIFEST_FILE].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{man_path} is corrupt ({e}); {_RESAVE}") from None
    entries = manifest.get("files") if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None
    if not isinstance(entries, dict) or sorted(entries) != sorted(PAYLOAD) or \
            not all(isinstance(e, dict) for e in entries.values()):
        raise CheckpointError(f"{man_path} is not an efformer model manifest (it must list {CONFIG_FILE} and "
                              f"{WEIGHTS_FILE}); {_RESAVE}")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{man_path} has version {manifest.get('version')!r}; this efformer reads "
                              f"version {VERSION}: {_RESAVE} with a matching efformer")
    for name in PAYLOAD:
        data, want = files[name], entries[name]
        if len(data) != want.get("size"):
            raise CheckpointError(
                f"{folder / name} has {len(data)} bytes but {MANIFEST_FILE} records {want.get('size')!r}: it was "
                f"truncated or changed after saving; {_RESAVE} (or delete {MANIFEST_FILE} to load an edited folder "
                "without the integrity check)"
            )
        if hashlib.sha256(data).hexdigest() != want.get("sha256"):
            raise CheckpointError(
                f"{folder / name} is corrupt: its SHA-256 does not match {MANIFEST_FILE} (a flipped bit or an edit "
                f"after saving); {_RESAVE} or restore the folder from a copy (or delete {MANIFEST_FILE} to load an "
                "edited folder without the integrity check)"
            )


_JSON_KIND = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
              type(None): "null"}


def _parse_config(path: Path, data: bytes) -> tuple[ModelConfig, dict]:
    """The validated config in ``config.json`` and its extra sections; every problem is a CheckpointError naming
    the file."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); {_RESAVE}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                              f"{_RESAVE}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds {_JSON_KIND.get(type(obj), 'a JSON value')} ({text.strip()[:40]!r}) "
                              f"but a model config is a JSON object {{...}}; {_RESAVE}")
    sections = {k: obj.pop(k) for k in list(obj) if k in CONFIG_SECTIONS}
    try:
        return (build_vision_config(obj) if obj.get("task") == "image" else build_config(obj)), sections
    except EfformerError as e:
        raise CheckpointError(f"{path} is not a valid model config: {e}; fix that field or {_RESAVE}") from None


def _load_weights(model: nn.Module, path: Path, data: bytes, cfg_path: Path) -> None:
    """Parse ``data`` and copy it into ``model``, refusing missing, unexpected or wrongly shaped tensors."""
    try:
        tensors = load_bytes(data)
    except Exception as e:  # the parser's error types are no documented contract: any failure is bad bytes
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); {_RESAVE}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match {cfg_path}: {len(missing)} missing tensors {missing[:5]}, {len(unexpected)} "
            f"unexpected tensors {unexpected[:5]}; {_RESAVE} or restore the {CONFIG_FILE} that belongs to it"
        )
    for k, want in expected.items():  # in the model's order, so the first misfit named is stable
        if tensors[k].shape != want.shape:
            raise CheckpointError(
                f"{path}: tensor {k!r} has shape {tuple(tensors[k].shape)} but {cfg_path} needs {tuple(want.shape)}; "
                f"{_RESAVE} or restore the {CONFIG_FILE} that belongs to it"
            )
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f"{path} cannot be loaded into the model of {cfg_path} ({e}); {_RESAVE}") from None
