"""Readers of the released LRA files: tiny files in each format are read; malformed ones name file and line."""

import numpy as np
import pytest
import torch

from efformer.data.loaders import (
    CIFAR_RECORD,
    LISTOPS_VOCAB_SIZE,
    cifar_grayscale,
    read_aan_tsv,
    read_cifar10,
    read_cifar10_bin,
    read_imdb,
    read_listops_tsv,
    read_pathfinder,
)
from efformer.data.png import decode_png, encode_png, write_png
from efformer.errors import DataError


def test_listops_tokenization_as_original(tmp_path):
    f = tmp_path / "basic_val.tsv"
    f.write_text("Source\tTarget\n( ( ( [MAX 2 ) 9 ) ] )\t9\r\n( ( ( [FIRST 1 ) 3 ) ] )\t1\n")
    ds = read_listops_tsv(f, max_len=3)
    ex = ds[0]
    assert ex["input_ids"].dtype == torch.long and ex["label"].shape == () and int(ex["label"]) == 9
    assert ex["input_ids"].tolist() == [12, 3, 10]  # [MAX 2 9 ] truncated to 3 tokens
    assert int(ds[1]["input_ids"][0]) == LISTOPS_VOCAB_SIZE - 1  # [FIRST is out of vocabulary


@pytest.mark.parametrize("text,line,msg", [
    ("Src\tTarget\n", 1, "header"), ("Source\tTarget\n( [MAX 2 ] )\t11\n", 2, "label"),
    ("Source\tTarget\n( [MAX 2 ] )\n", 2, "label"), ("", None, "empty"),
])
def test_listops_malformed(tmp_path, text, line, msg):
    f = tmp_path / "x.tsv"
    f.write_text(text)
    with pytest.raises(DataError, match=msg) as e:
        read_listops_tsv(f)
    assert str(f) in str(e.value) and (line is None or f"{f}:{line}:" in str(e.value))


def test_missing_file_says_what_is_expected(tmp_path):
    with pytest.raises(DataError, match="Source"):
        read_listops_tsv(tmp_path / "nope.tsv")


def test_imdb_bytes(tmp_path):
    for split in ("train", "test"):
        for sub, text in (("pos", "Great film é"), ("neg", "Bad")):
            (tmp_path / "aclImdb" / split / sub).mkdir(parents=True)
            (tmp_path / "aclImdb" / split / sub / "0_7.txt").write_text(text, encoding="utf-8")
    ds = read_imdb(tmp_path, "train", max_len=20)
    assert [int(ds[i]["label"]) for i in range(2)] == [0, 1]
    assert ds[0]["input_ids"].tolist() == [b + 1 for b in b"Bad"]
    assert ds[1]["input_ids"].tolist() == [b + 1 for b in "Great film é".encode()]  # 2 bytes for é
    assert len(read_imdb(tmp_path / "aclImdb", "test", max_len=4)[1]["input_ids"]) == 4
    (tmp_path / "aclImdb" / "test" / "pos" / "1_9.txt").write_text("")
    with pytest.raises(DataError, match="1_9.txt:1: empty"):
        read_imdb(tmp_path, "test")
    with pytest.raises(DataError, match="aclImdb"):
        read_imdb(tmp_path / "aclImdb" / "train", "train")


def test_aan_pairs(tmp_path):
    f = tmp_path / "new_aan_pairs.train.tsv"
    f.write_bytes(b"1.0\tA1\tB1\tfirst doc\tsecond\n0\tA2\tB2\tx\ty z\n")
    ds = read_aan_tsv(f, max_len=5)
    ex = ds[0]
    assert set(ex) == {"ids1", "ids2", "label"} and int(ex["label"]) == 1 and int(ds[1]["label"]) == 0
    assert ex["ids1"].tolist() == [b + 1 for b in b"first"] and ex["ids2"].tolist() == [b + 1 for b in b"secon"]
    f.write_bytes(b"1.0\tA1\tB1\tfirst doc\tsecond\n1\tA2\tonly four\tfields\n")
    with pytest.raises(DataError, match=r"train.tsv:2: expected 5"):
        read_aan_tsv(f)
    f.write_bytes(b"yes\ta\tb\tc\td\n")
    with pytest.raises(DataError, match=r"train.tsv:1: label"):
        read_aan_tsv(f)


def _cifar_file(path, labels, rng):
    recs = np.concatenate([np.array(labels, np.uint8)[:, None],
                           rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)], 1)
    path.write_bytes(recs.tobytes())
    return recs


def test_cifar_grayscale_and_splits(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    recs = [_cifar_file(root / f"data_batch_{i}.bin", [i, 9, 0, 3], rng) for i in range(1, 6)]
    _cifar_file(root / "test_batch.bin", [1, 2], rng)
    gray, labels = read_cifar10_bin(root / "data_batch_1.bin")
    r, g, b = (recs[0][0, 1 + 1024 * c:1 + 1024 * (c + 1)].astype(np.float64) for c in range(3))
    expect = np.floor((0.2989 * r + 0.5870 * g + 0.1140 * b) / 255 * 255.5)
    assert np.abs(gray[0].astype(int) - expect).max() <= 1 and labels.tolist() == [1, 9, 0, 3]
    white = cifar_grayscale(np.full((1, 3, 1024), 255, np.uint8))
    assert white.max() == 255 and cifar_grayscale(np.zeros((1, 3, 1024), np.uint8)).max() == 0
    train, val, test = read_cifar10(tmp_path)
    assert (len(train), len(val), len(test)) == (18, 2, 2) and len(train[0]["input_ids"]) == 1024
    (root / "data_batch_2.bin").write_bytes(recs[1].tobytes()[:-5])
    with pytest.raises(DataError, match="data_batch_2.bin: record 4 is truncated"):
        read_cifar10(tmp_path)
    bad = recs[1].copy()
    bad[2, 0] = 12
    (root / "data_batch_2.bin").write_bytes(bad.tobytes())
    with pytest.raises(DataError, match="record 3 has label 12"):
        read_cifar10_bin(root / "data_batch_2.bin")
    assert CIFAR_RECORD == 3073


def test_png_codec_roundtrip_and_filters():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    assert np.array_equal(decode_png(encode_png(img)), img)
    # a PNG using the Sub, Up, Average and Paeth filters (rows 0-3), built by hand
    import struct
    import zlib

    def filt(f, cur, prev):
        out = []
        for x in range(len(cur)):
            a = int(cur[x - 1]) if x else 0
            b = int(prev[x])
            c = int(prev[x - 1]) if x else 0
            p = a + b - c
            pred = [0, a, b, (a + b) // 2,
                    a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c) else (b if abs(p - b) <= abs(p - c)
                                                                                  else c)][f]
            out.append((int(cur[x]) - pred) % 256)
        return bytes([f] + out)

    img4 = rng.integers(0, 256, (4, 6), dtype=np.uint8)
    raw = b"".join(filt(f, img4[y], img4[y - 1] if y else np.zeros(6, np.uint8)) for y, f in enumerate([1, 2, 3, 4]))

    def chunk(k, d):
        return struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d))
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 6, 4, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    assert np.array_equal(decode_png(data), img4)
    with pytest.raises(DataError, match="CRC"):
        decode_png(data[:40] + bytes([data[40] ^ 1]) + data[41:], "x.png")
    rgb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 6, 4, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    with pytest.raises(DataError, match="grayscale"):
        decode_png(rgb, "x.png")


def test_pathfinder_release_layout_empty_images_and_errors(tmp_path):
    root = tmp_path / "pathfinder32" / "curv_baseline"
    (root / "imgs" / "0").mkdir(parents=True)
    (root / "metadata").mkdir()
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (32, 32), dtype=np.uint8) for _ in range(3)]
    for i, im in enumerate(imgs):
        write_png(root / "imgs" / "0" / f"sample_{i}.png", im)
    (root / "imgs" / "0" / "sample_3.png").write_bytes(b"")  # the released archive has one empty image
    meta = "".join(f"imgs/0 sample_{i} {i} {i % 2} 1.0 6 2 2 0.5 1 1\n".replace(f"sample_{i} ", f"sample_{i}.png ")
                   for i in range(4))
    (root / "metadata" / "0.npy").write_text(meta)
    ds, empty = read_pathfinder(root)
    assert len(ds) == 3 and empty == 1
    assert np.array_equal(ds[2]["input_ids"].numpy(), imgs[2].reshape(-1)) and int(ds[1]["label"]) == 1
    (root / "metadata" / "0.npy").write_text(meta + "imgs/0 sample_9.png 9 1 1.0\n")
    with pytest.raises(DataError, match=r"0.npy:5: image .*sample_9.png not found"):
        read_pathfinder(root)
    (root / "metadata" / "0.npy").write_text(meta + "imgs/0 sample_0.png\n")
    with pytest.raises(DataError, match=r"0.npy:5: expected"):
        read_pathfinder(root)
    (root / "imgs" / "0" / "sample_1.png").write_bytes(b"not a png")
    (root / "metadata" / "0.npy").write_text(meta)
    with pytest.raises(DataError, match=r"sample_1.png \(listed at .*0.npy:2\): not a PNG"):
        read_pathfinder(root)
    with pytest.raises(DataError, match="metadata"):
        read_pathfinder(tmp_path)
