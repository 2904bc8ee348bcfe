"""Readers for the Long Range Arena files, with the original pipeline's preprocessing (reference §1.2-1.3).

Every reader returns datasets in the trainer's format: a Sequence of example dicts of torch tensors,
  classifier: {"input_ids": LongTensor(n), "label": LongTensor()}
  retrieval:  {"ids1": LongTensor(n1), "ids2": LongTensor(n2), "label": LongTensor()}
Tokens are stored compactly (numpy, concatenated) and become tensors on access. Sequences are
truncated to the task's max length and never padded (the trainer pads). A missing or malformed file
raises DataError naming the file and line (or record) and what was expected.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from efformer.data.listops import HEADER
from efformer.data.png import decode_png
from efformer.errors import ConfigError, DataError

# ListOps ids: 0 = pad, 1..15 the symbols (']' is renamed 'X' by the pipeline), 16 = out of vocabulary.
# The original built its vocabulary from the first ~1000 validation rows; a fixed table gives the same
# 15 symbols a stable numbering, whatever file is read first.
LISTOPS_SYMBOLS = tuple(str(d) for d in range(10)) + ("[MIN", "[MAX", "[MED", "[SM", "X")
LISTOPS_IDS = {s: i + 1 for i, s in enumerate(LISTOPS_SYMBOLS)}
LISTOPS_OOV = len(LISTOPS_SYMBOLS) + 1
LISTOPS_VOCAB_SIZE = LISTOPS_OOV + 1  # 17
BYTE_VOCAB_SIZE = 257  # byte b -> id b + 1, 0 = pad (tfds ByteTextEncoder)
PIXEL_VOCAB_SIZE = 256  # 8-bit intensities are the tokens
AAN_DOC_BYTES = 10_000  # each AAN document is cut to this many bytes before encoding


class TokenDataset(Sequence):
    """Variable-length token sequences with integer labels: items {"input_ids": (n,), "label": ()}."""

    def __init__(self, seqs: list[np.ndarray], labels: Sequence[int]):
        if len(seqs) != len(labels):
            raise DataError(f"{len(seqs)} sequences but {len(labels)} labels")
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.tokens = np.concatenate(seqs).astype(np.int16) if seqs else np.zeros(0, np.int16)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def sequence(self, i: int) -> np.ndarray:
        """Token ids of example i as a numpy array."""
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return {"input_ids": torch.from_numpy(self.sequence(i).astype(np.int64)),
                "label": torch.tensor(int(self.labels[i]))}


class PairDataset(Sequence):
    """Pairs of token sequences with labels: items {"ids1": (n1,), "ids2": (n2,), "label": ()}."""

    def __init__(self, first: TokenDataset, second: TokenDataset):
        if len(first) != len(second):
            raise DataError(f"pair halves differ in length: {len(first)} vs {len(second)}")
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        a, b = self.first[i], self.second[i]
        return {"ids1": a["input_ids"], "ids2": b["input_ids"], "label": a["label"]}


def subset(ds: TokenDataset, start: int, stop: int) -> TokenDataset:
    """Examples start..stop-1 of a TokenDataset as a new TokenDataset."""
    return TokenDataset([ds.sequence(i) for i in range(start, stop)], ds.labels[start:stop].tolist())


def _as_path(path, name: str = "path") -> Path:
    if not isinstance(path, str | os.PathLike):
        raise ConfigError(name, path, "a file or folder path (str or pathlib.Path)")
    return Path(path)


def _require(path: Path, what: str, folder: bool = False) -> Path:
    if not path.exists():
        raise DataError(f"{path}: not found; expected {what}")
    if folder and not path.is_dir():
        raise DataError(f"{path}: is a file, not a folder; expected {what}")
    if not folder and not path.is_file():
        raise DataError(f"{path}: is a folder, not a file; expected {what}")
    return path


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, line without its line ending) of a file, streamed; a read failure is a DataError."""
    try:
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                yield n, line.rstrip(b"\r\n")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _check_max_len(max_len: int) -> None:
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
        raise ConfigError("max_len", max_len, "an integer >= 1 (sequences are cut to this many tokens)")


def _text_line(path: Path, n: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                        "expected a ListOps TSV (is this a binary file?)") from None


# ---- ListOps -----------------------------------------------------------------------------------
def listops_tokenize(source: str) -> np.ndarray:
    """Token ids of a ListOps expression: ']' -> 'X', parentheses dropped, split on whitespace."""
    if not isinstance(source, str):
        raise ConfigError("source", source, "a ListOps expression string such as '[MAX 2 9 ]'")
    words = source.replace("]", "X").replace("(", "").replace(")", "").split()
    return np.array([LISTOPS_IDS.get(w, LISTOPS_OOV) for w in words], dtype=np.int16)


def read_listops_tsv(path: str | Path, max_len: int = 2000) -> TokenDataset:
    """A released-format ListOps TSV (header `Source<TAB>Target`, label 0-9) as a classifier dataset."""
    _check_max_len(max_len)
    path = _require(_as_path(path), "a ListOps TSV with header 'Source\\tTarget' (e.g. listops-1000/basic_train.tsv)")
    seqs, labels, n = [], [], 0
    for n, raw in _lines(path):
        line = _text_line(path, n, raw)
        if n == 1:
            if line != HEADER:
                raise DataError(f"{path}:1: expected the header 'Source\\tTarget', got {line[:60]!r}")
            continue
        if not line:
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not re.fullmatch(r"\s*[0-9]\s*", parts[1]):
            raise DataError(f"{path}:{n}: expected '<expression>\\t<label 0-9>', got {line[:60]!r}")
        ids = listops_tokenize(parts[0])
        if len(ids) == 0:
            raise DataError(f"{path}:{n}: empty expression")
        seqs.append(ids[:max_len])
        labels.append(int(parts[1]))
    if n == 0:
        raise DataError(f"{path}: empty file; expected the header 'Source\\tTarget' and rows")
    if not labels:
        raise DataError(f"{path}: no examples after the header; expected '<expression>\\t<label 0-9>' rows")
    return TokenDataset(seqs, labels)


# ---- IMDb (byte-level text classification) ------------------------------------------------------
def encode_bytes(data: bytes, max_len: int) -> np.ndarray:
    """Byte-level ids (byte + 1; 0 is pad), truncated to max_len."""
    return np.frombuffer(data[:max_len], np.uint8).astype(np.int16) + 1


def _imdb_root(data_dir: Path) -> Path:
    for cand in (data_dir, data_dir / "aclImdb"):
        if (cand / "train" / "pos").is_dir():
            return cand
    raise DataError(f"{data_dir}: no IMDb files; expected aclImdb/{{train,test}}/{{pos,neg}}/*.txt under it")


def read_imdb(data_dir: str | Path, split: str, max_len: int = 4000) -> TokenDataset:
    """IMDb reviews of one split ('train' or 'test') as byte tokens; label 1 = pos, 0 = neg."""
    _check_max_len(max_len)
    if split not in ("train", "test"):
        raise ConfigError("split", split, "'train' or 'test' (IMDb has no other split)")
    root = _imdb_root(_as_path(data_dir, "data_dir"))
    seqs, labels = [], []
    for label, sub in ((0, "neg"), (1, "pos")):
        folder = _require(root / split / sub, f"a folder of IMDb reviews aclImdb/{split}/{sub}/*.txt", folder=True)
        files = sorted(folder.glob("*.txt"))
        if not files:
            raise DataError(f"{folder}: no *.txt reviews found")
        for p in files:
            data = _read_bytes(p)
            if not data.strip():
                raise DataError(f"{p}:1: empty review")
            seqs.append(encode_bytes(data, max_len))
            labels.append(label)
    return TokenDataset(seqs, labels)


# ---- AAN (byte-level document matching) ----------------------------------------------------------
def read_aan_tsv(path: str | Path, max_len: int = 4000) -> PairDataset:
    """An AAN pairs TSV (no header; label, id1, id2, text1, text2; label 0/1 as a float) as a dual dataset."""
    _check_max_len(max_len)
    path = _require(_as_path(path), "an AAN TSV such as tsv_data/new_aan_pairs.train.tsv")
    a, b, labels = [], [], []
    for n, line in _lines(path):
        if not line:
            continue
        parts = line.split(b"\t")
        if len(parts) != 5:
            raise DataError(f"{path}:{n}: expected 5 tab-separated fields (label, id1, id2, text1, text2), "
                            f"got {len(parts)}")
        try:
            label = float(parts[0])
        except ValueError:
            label = -1.0
        if label not in (0.0, 1.0):
            raise DataError(f"{path}:{n}: label must be 0 or 1, got {parts[0][:20]!r}")
        a.append(encode_bytes(parts[3][:AAN_DOC_BYTES], max_len))
        b.append(encode_bytes(parts[4][:AAN_DOC_BYTES], max_len))
        labels.append(int(label))
    if not labels:
        raise DataError(f"{path}: no rows; expected label, id1, id2, text1, text2 per line")
    return PairDataset(TokenDataset(a, labels), TokenDataset(b, labels))


# ---- CIFAR-10 (sequential grayscale image) -------------------------------------------------------
CIFAR_RECORD = 1 + 3 * 32 * 32


def cifar_grayscale(rgb: np.ndarray) -> np.ndarray:
    """(n, 3, 1024) uint8 -> (n, 1024) uint8, as tf.image.rgb_to_grayscale (ITU-R 601) on uint8 input.

    TF converts to float in [0, 1], weights 0.2989 / 0.5870 / 0.1140, and converts back by scaling with
    255.5 and truncating; the LRA pipeline then casts to int32.
    """
    x = rgb.astype(np.float32) / np.float32(255)
    gray = np.float32(0.2989) * x[:, 0] + np.float32(0.5870) * x[:, 1] + np.float32(0.1140) * x[:, 2]
    return np.clip(np.floor(gray * np.float32(255.5)), 0, 255).astype(np.uint8)


def read_cifar10_bin(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch -> (gray pixels (n, 1024) uint8, labels (n,))."""
    path = _require(_as_path(path), "a CIFAR-10 binary batch (cifar-10-batches-bin/data_batch_1.bin)")
    raw = np.frombuffer(_read_bytes(path), np.uint8)
    if raw.size == 0 or raw.size % CIFAR_RECORD:
        whole = raw.size // CIFAR_RECORD
        raise DataError(f"{path}: record {whole + 1} is truncated: size {raw.size} bytes is not a multiple of "
                        f"{CIFAR_RECORD} (1 label byte + 3072 pixel bytes per record)")
    recs = raw.reshape(-1, CIFAR_RECORD)
    bad = np.flatnonzero(recs[:, 0] > 9)
    if bad.size:
        raise DataError(f"{path}: record {bad[0] + 1} has label {recs[bad[0], 0]}, expected 0-9")
    return cifar_grayscale(recs[:, 1:].reshape(-1, 3, 1024)), recs[:, 0].astype(np.int64)


def read_cifar10(data_dir: str | Path) -> tuple[TokenDataset, TokenDataset, TokenDataset]:
    """CIFAR-10 binary batches -> train (first 90% of data_batch_1..5), val (last 10%), test (test_batch)."""
    data_dir = _as_path(data_dir, "data_dir")
    root = data_dir / "cifar-10-batches-bin" if (data_dir / "cifar-10-batches-bin").is_dir() else data_dir
    parts = [read_cifar10_bin(root / f"data_batch_{i}.bin") for i in range(1, 6)]
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    tx, ty = read_cifar10_bin(root / "test_batch.bin")
    cut = int(round(0.9 * len(y)))
    make = lambda xs, ys: TokenDataset(list(xs), ys.tolist())  # noqa: E731
    return make(x[:cut], y[:cut]), make(x[cut:], y[cut:]), make(tx, ty)


# ---- Pathfinder ---------------------------------------------------------------------------------
def read_pathfinder(root: str | Path) -> tuple[TokenDataset, int]:
    """One difficulty folder (metadata/*.npy text + imgs/) -> (dataset of flattened pixels, n empty skipped).

    Images are read in metadata order (batch files sorted numerically); zero-byte images are skipped and
    counted, as the original pipeline filters empty images.
    """
    root = _as_path(root, "root")
    meta_dir = _require(root / "metadata", "metadata/<batch>.npy text files beside imgs/ (released Pathfinder layout)",
                        folder=True)
    metas = sorted(meta_dir.glob("*.npy"), key=lambda p: (not p.stem.isdigit(), int(p.stem) if p.stem.isdigit()
                                                          else 0, p.stem))
    if not metas:
        raise DataError(f"{meta_dir}: no metadata/<batch>.npy files")
    seqs, labels, empty, shape = [], [], 0, None
    for meta in metas:
        for n, line in enumerate(_read_bytes(meta).decode("utf-8", errors="replace").splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 4 or fields[3] not in ("0", "1"):
                raise DataError(f"{meta}:{n}: expected 'subpath filename index label ...' with label 0/1, "
                                f"got {line[:80]!r}")
            img = root / fields[0] / fields[1]
            if not img.is_file():
                raise DataError(f"{meta}:{n}: image {img} not found")
            data = _read_bytes(img)
            if not data:
                empty += 1
                continue
            pix = decode_png(data, f"{img} (listed at {meta}:{n})")
            if shape is None:
                shape = pix.shape
            elif pix.shape != shape:
                raise DataError(f"{img} (listed at {meta}:{n}): size {pix.shape} differs from {shape}")
            seqs.append(pix.reshape(-1))
            labels.append(int(fields[3]))
    if not labels:
        raise DataError(f"{root}: no readable images listed in {meta_dir}")
    return TokenDataset(seqs, labels), empty


def split_80_10_10(ds: TokenDataset) -> tuple[TokenDataset, TokenDataset, TokenDataset]:
    """The Pathfinder split: first 80% train, next 10% validation, last 10% test."""
    n = len(ds)
    a, b = int(0.8 * n), int(0.9 * n)
    return subset(ds, 0, a), subset(ds, a, b), subset(ds, b, n)


__all__ = ["BYTE_VOCAB_SIZE", "LISTOPS_VOCAB_SIZE", "PIXEL_VOCAB_SIZE", "PairDataset", "TokenDataset",
           "cifar_grayscale", "encode_bytes", "listops_tokenize", "read_aan_tsv", "read_cifar10", "read_cifar10_bin",
           "read_imdb", "read_listops_tsv", "read_pathfinder", "split_80_10_10", "subset"]
