"""Image datasets for the image models: arrays (.npy/.npz), PNG folders, pixel-token datasets
(Pathfinder, LRA's grey CIFAR-10) seen as images, and scikit-learn's bundled handwritten digits.

Every dataset yields ``{"images": (C, H, W) float32 in [0, 1], "label": ()}``, which the trainer
batches into ``{"images": (b, C, H, W), "label": (b,)}``. Nothing is unpickled (``allow_pickle=False``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from efformer.data.loaders import TokenDataset
from efformer.data.png import read_png
from efformer.errors import DataError


class ImageDataset(Sequence):
    """Images (N, C, H, W) with integer labels (N,): items {"images": (C, H, W) float32, "label": ()}.

    ``images`` may be uint8 (scaled by 1/255) or float already in [0, 1]; (N, H, W) is one channel and
    (N, H, W, C) with C in (1, 3, 4) is channels-last.
    """

    def __init__(self, images: np.ndarray | torch.Tensor, labels, name: str = "images"):
        x = torch.as_tensor(np.asarray(images))
        y = torch.as_tensor(np.asarray(labels))
        if x.dim() == 3:
            x = x[:, None]
        elif x.dim() == 4 and x.shape[1] not in (1, 3, 4) and x.shape[-1] in (1, 3, 4):
            x = x.permute(0, 3, 1, 2)
        if x.dim() != 4 or x.shape[0] == 0:
            raise DataError(f"{name}: images must be (N, H, W), (N, C, H, W) or (N, H, W, C) with N >= 1, got "
                            f"{tuple(x.shape)}")
        if y.dim() != 1 or len(y) != len(x) or y.is_floating_point() or y.dtype == torch.bool:
            raise DataError(f"{name}: labels must be N={len(x)} integers, got {y.dtype} {tuple(y.shape)}")
        if int(y.min()) < 0:
            raise DataError(f"{name}: label {int(y.min())} is negative; labels are class ids 0..n_classes-1")
        if x.dtype == torch.uint8:
            x = x.float() / 255
        elif x.is_floating_point():
            x = x.float()
            if float(x.min()) < 0 or float(x.max()) > 1:
                raise DataError(f"{name}: float images must lie in [0, 1], got [{float(x.min()):.3g}, "
                                f"{float(x.max()):.3g}]; give uint8 pixels or scale them")
        else:
            raise DataError(f"{name}: images must be uint8 or float, got {x.dtype}")
        self.images, self.labels = x.contiguous(), y.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return {"images": self.images[i], "label": self.labels[i]}

    @property
    def n_classes(self) -> int:
        """1 + the largest label."""
        return int(self.labels.max()) + 1

    def resized(self, size: int) -> ImageDataset:
        """The same images resized to size x size (nearest for upscaling by an integer, else bilinear)."""
        h = self.images.shape[-1]
        mode = "nearest" if size % h == 0 else "bilinear"
        out = F.interpolate(self.images, size=(size, size), mode=mode).clamp(0, 1)
        return ImageDataset(out, self.labels)

    def split(self, fraction: float, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
        """A seeded shuffle cut into (first ``fraction``, rest)."""
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        cut = int(round(fraction * len(self)))
        a, b = perm[:cut], perm[cut:]
        return ImageDataset(self.images[a], self.labels[a]), ImageDataset(self.images[b], self.labels[b])


def read_image_arrays(path: str | Path, images_key: str = "images", labels_key: str = "labels") -> ImageDataset:
    """An .npz holding ``images_key`` and ``labels_key`` arrays, or an images .npy with a labels .npy beside it
    (``<stem>_labels.npy``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; give an .npz with '{images_key}' and '{labels_key}' arrays, or "
                        f"X.npy with X_labels.npy beside it")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in (images_key, labels_key) if k not in z.files]
                if missing:
                    raise DataError(f"{path}: arrays {missing} missing (has {z.files}); name them or pass "
                                    "images_key / labels_key")
                return ImageDataset(z[images_key], z[labels_key], str(path))
        labels = path.with_name(f"{path.stem}_labels.npy")
        if not labels.is_file():
            raise DataError(f"{path}: labels file {labels.name} not found beside it")
        return ImageDataset(np.load(path, allow_pickle=False), np.load(labels, allow_pickle=False), str(path))
    except (ValueError, OSError) as e:  # pickled object arrays, truncated or foreign files
        raise DataError(f"{path}: not a readable numpy file without pickles ({e})") from None


def read_image_folder(root: str | Path) -> tuple[ImageDataset, list[str]]:
    """root/<class>/*.png (classes in sorted order) -> (dataset, class names); all images one size."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classes:
        raise DataError(f"{root}: expected one sub-folder of PNG images per class (root/<class>/*.png)")
    images, labels, shape = [], [], None
    for label, name in enumerate(classes):
        for f in sorted((root / name).glob("*.png")):
            pix = read_png(f)
            pix = pix[..., None] if pix.ndim == 2 else pix
            if shape is None:
                shape = pix.shape
            elif pix.shape != shape:
                raise DataError(f"{f}: size {pix.shape} differs from the first image's {shape}; resize them to one")
            images.append(pix)
            labels.append(label)
    if not images:
        raise DataError(f"{root}: no .png files in the class folders {classes}")
    return ImageDataset(np.stack(images), labels, str(root)), classes


def token_images(ds: TokenDataset, height: int, width: int | None = None) -> ImageDataset:
    """A pixel-token dataset (Pathfinder, grey CIFAR-10: ids = 8-bit intensities) as (1, H, W) images."""
    width = width or height
    lengths = np.diff(ds.offsets)
    if len(ds) == 0 or (lengths != height * width).any():
        raise DataError(f"pixel sequences must all hold {height}x{width}={height * width} tokens, got lengths "
                        f"{sorted(set(lengths.tolist()))[:5]}")
    pix = ds.tokens.reshape(len(ds), height, width).astype(np.uint8)
    return ImageDataset(pix, ds.labels)


def digits(size: int = 32) -> ImageDataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), scaled to [0, 1] and resized."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - the test/bench extra installs it
        raise DataError("the digits images come with scikit-learn: pip install 'efformer[vision]'") from None
    d = load_digits()
    ds = ImageDataset((d.images / 16.0).astype(np.float32), d.target)
    return ds if size == 8 else ds.resized(size)


__all__ = ["ImageDataset", "digits", "read_image_arrays", "read_image_folder", "token_images"]
