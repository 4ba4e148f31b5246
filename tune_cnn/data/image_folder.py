"""Image folders: split/<class>/ images (subfolders included, as torchvision's ImageFolder finds them), decoded once
into arrays and cached."""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image, UnidentifiedImageError

from tune_cnn.data.arrays import Arrays, RawData
from tune_cnn.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def hidden(path: Path) -> bool:
    """Dot files and folders, and what macOS adds to archives: __MACOSX/ and AppleDouble ._name files."""
    return path.name.startswith(".") or path.name == "__MACOSX"


def read_image_folder_cached(root: Path, cache: Path) -> RawData:
    """Decode an image folder once into a file in `cache`; later loads read the decoded arrays (a second for CIFAR-10)."""
    files = {split: list_split(root, split) for split in ("train", "val", "test") if (root / split).is_dir()}
    classes = check_classes(root, files)
    key = _folder_key(root, files)
    cached = cache / f"{key}.npz"
    with FileLock(str(cached) + ".lock"):
        if not cached.exists():
            count = sum(len(paths) for listing in files.values() for paths in listing.values())
            print(f"decoding {count} images from {root} (once; later loads read {cached})", flush=True)
            arrays = _same_channels({split: decode_split(split_files, classes) for split, split_files in files.items()})
            _check_same_size(arrays, files)
            partial = cached.with_suffix(".partial.npz")
            np.savez(partial, classes=np.array(classes), **{f"{s}_{k}": getattr(a, k) for s, a in arrays.items() for k in ("x", "y")})
            partial.rename(cached)
    with np.load(cached) as stored:
        get = lambda split: Arrays(stored[f"{split}_x"], stored[f"{split}_y"]) if f"{split}_y" in stored else None  # noqa: E731
        return RawData(get("train"), get("test"), classes, get("val"))


def list_split(root: Path, split: str) -> dict[str, list[Path]]:
    """Image files of one split by class name; every class folder must hold at least one image."""
    folder = root / split
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and not hidden(d))
    if not class_dirs:
        raise DataError(f"{folder} has no class folders; put each class's images in {folder}/<class>/")
    listing = {}
    for d in class_dirs:
        images = class_images(d)
        if not images:
            raise DataError(f"class folder {d} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove the folder")
        broken = next((p for p in images if not p.exists()), None)
        if broken:
            raise DataError(f"{broken} is a link to nothing; remove it or restore what it points to")
        listing[d.name] = images
    return listing


def class_images(folder: Path) -> list[Path]:
    """The images in a class folder and in its subfolders, as torchvision's ImageFolder finds them, hidden ones left
    out, in the order of their paths below the folder (compared as strings, which is much faster than as Paths)."""
    found: list[tuple[str, Path]] = []
    _collect_images(folder, "", found)
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def _collect_images(folder: Path, below: str, found: list[tuple[str, Path]]) -> None:
    # The folder is read twice: scandir tells folders from files without a stat per file, and iterdir makes the
    # Paths; together faster than one scandir pass joining each name to the folder (benchmarks/README.md).
    with os.scandir(folder) as entries:
        subfolders = {entry.name for entry in entries if entry.is_dir()}
    for path in folder.iterdir():
        if hidden(path):
            continue
        if path.name in subfolders:
            _collect_images(path, f"{below}{path.name}/", found)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            found.append((below + path.name, path))


def check_classes(root: Path, files: dict[str, dict[str, list[Path]]]) -> tuple[str, ...]:
    classes = tuple(files["train"])
    if len(classes) < 2:
        raise DataError(f"{root / 'train'} has one class ({classes[0]}); a classifier needs two or more class folders")
    for split, listing in files.items():
        if tuple(listing) != classes:
            only_train = sorted(set(classes) - set(listing))
            only_split = sorted(set(listing) - set(classes))
            raise DataError(
                f"{root / split} classes differ from train: missing {only_train or 'none'}, extra {only_split or 'none'}; "
                f"every split needs the same class folders"
            )
    return classes


def decode_split(listing: dict[str, list[Path]], classes: tuple[str, ...]) -> Arrays:
    paths = [p for c in classes for p in listing[c]]
    labels = np.concatenate([np.full(len(listing[c]), i, dtype=np.int64) for i, c in enumerate(classes)])
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        images = list(pool.map(_decode_image, paths))
    mode = "RGB" if any(img.mode == "RGB" for img in images) else "L"
    first = images[0].size
    for path, img in zip(paths, images):
        if img.size != first:
            raise DataError(
                f"image sizes differ: {paths[0]} is {first[0]}x{first[1]}, {path} is {img.size[0]}x{img.size[1]}; "
                f"resize the data set to one size"
            )
    x = np.stack([_to_chw(img, mode) for img in images])
    return Arrays(x, labels)


def _decode_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return _eight_bit(img, path)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DataError(f"cannot read image {path} ({error}); remove or replace the file") from None


def _eight_bit(img: Image.Image, path: Path) -> Image.Image:
    """RGB or grayscale (L) at 8 bits a channel. 16-bit grayscale keeps its top 8 bits: PIL's convert would clip
    every value above 255 to white. Alpha is dropped; palette, CMYK and the like become RGB."""
    if img.mode in ("RGB", "L"):
        return img
    if img.mode.startswith("I"):  # 16-bit grayscale PNG and TIFF (I;16, or I in older Pillow)
        return Image.fromarray((np.asarray(img).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8), "L")
    if img.mode == "F":
        raise DataError(f"{path} holds floating-point pixels; convert the data set to 8-bit PNG or JPEG")
    return img.convert("L" if img.mode in ("1", "LA", "La") else "RGB")


def _to_chw(img: Image.Image, mode: str) -> np.ndarray:
    a = np.asarray(img if img.mode == mode else img.convert(mode))
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _same_channels(arrays: dict[str, Arrays]) -> dict[str, Arrays]:
    """A split of grayscale images beside RGB splits becomes RGB, as a grayscale image among RGB ones in a split does."""
    if {a.x.shape[1] for a in arrays.values()} != {1, 3}:
        return arrays
    return {split: Arrays(np.repeat(a.x, 3, axis=1), a.y) if a.x.shape[1] == 1 else a for split, a in arrays.items()}


def _check_same_size(arrays: dict[str, Arrays], files: dict[str, dict[str, list[Path]]]) -> None:
    shapes = {split: a.x.shape[1:] for split, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        detail = ", ".join(f"{split} {'x'.join(map(str, s))}" for split, s in shapes.items())
        raise DataError(f"image sizes or channels differ between splits ({detail}); use one size for the whole data set")


def _folder_key(root: Path, files: dict[str, dict[str, list[Path]]]) -> str:
    digest = hashlib.sha256(str(root.resolve()).encode())
    for split, listing in files.items():
        for c, paths in listing.items():
            for p in paths:
                st = p.stat()
                digest.update(f"{split}/{c}/{p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]
