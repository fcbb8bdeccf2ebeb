"""Images from disk: CIFAR-10 (downloaded, md5-checked, safely extracted), image folders and ADM-style .npz files.
Every reader returns uint8 [N, H, W, 3]; a bad file raises ValueError or OSError with a one-line message naming it."""
import hashlib
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def file_md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download(url, md5, path):
    """Fetch url to path unless a file with this md5 is there already; a wrong md5 raises and leaves no file."""
    if os.path.exists(path) and file_md5(path) == md5:
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.part"
    print(f"downloading {url} to {path}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
        if (got := file_md5(tmp)) != md5:
            raise ValueError(f"{url} has md5 {got}, expected {md5}: download refused")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def extract_tar(archive, dest):
    """Extract archive into dest, refusing it whole if any member is not a plain file or folder inside dest."""
    root = os.path.realpath(dest)
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for m in members:
            target = os.path.realpath(os.path.join(root, m.name))
            if not (m.isfile() or m.isdir()) or os.path.commonpath([root, target]) != root:
                raise ValueError(f"{archive}: refusing member {m.name!r}, which is not a plain file or folder inside {dest}")
        # the "data" filter (Python >= 3.10.12) repeats these checks and also drops odd permissions
        tar.extractall(root, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))


def load_cifar10(split="train", data_dir="data", url=CIFAR10_URL, md5=CIFAR10_MD5):
    """CIFAR-10 `split` ("train" or "test") as uint8 images [N, 32, 32, 3], int64 labels [N] and the 10 class names.

    The first call downloads cifar-10-python.tar.gz into data_dir, checks its md5 and extracts it to
    data_dir/cifar-10-batches-py; later calls read that folder. No augmentation.
    """
    if split not in CIFAR10_BATCHES:
        raise ValueError(f"unknown CIFAR-10 split {split!r}: use 'train' or 'test'")
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    if not os.path.isdir(folder):
        archive = download(url, md5, os.path.join(data_dir, "cifar-10-python.tar.gz"))
        tmp = tempfile.mkdtemp(dir=data_dir, prefix=".extract-")
        try:  # extract beside the target and rename, so an interrupted extraction is never mistaken for a complete one
            extract_tar(archive, tmp)
            os.replace(os.path.join(tmp, "cifar-10-batches-py"), folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    images, labels = [], []
    for name in CIFAR10_BATCHES[split]:
        with open(os.path.join(folder, name), "rb") as f:
            batch = pickle.load(f, encoding="bytes")  # Python 2 pickles; the archive's md5 vouches for them
        images.append(batch[b"data"])
        labels.append(batch[b"labels"])
    with open(os.path.join(folder, "batches.meta"), "rb") as f:
        class_names = [n.decode() for n in pickle.load(f, encoding="bytes")[b"label_names"]]
    images = np.concatenate(images).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows are CHW planes
    return np.ascontiguousarray(images, dtype=np.uint8), np.concatenate(labels).astype(np.int64), class_names


def resize(im, img_size):
    """A PIL image resized so its short side is img_size and centre-cropped to img_size x img_size. Bicubic, which
    PIL filters over the whole footprint when it shrinks: 32 -> 16 averages, it does not drop every other pixel."""
    scale = img_size / min(im.size)  # at scale 1 PIL's resize is a copy
    im = im.resize((max(img_size, round(im.width * scale)), max(img_size, round(im.height * scale))),
                   Image.Resampling.BICUBIC)
    left, top = (im.width - img_size) // 2, (im.height - img_size) // 2
    return im.crop((left, top, left + img_size, top + img_size))


def resize_images(images, img_size):
    """uint8 [N, H, W, 3] -> [N, img_size, img_size, 3], each image as resize() makes it (unchanged if it fits)."""
    if images.shape[1:3] == (img_size, img_size):
        return images
    return np.stack([np.asarray(resize(Image.fromarray(im), img_size)) for im in images])


def read_image(path, img_size=None):
    """One image as RGB uint8 [H, W, 3]; with img_size, as resize() makes it."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    return np.asarray(im if img_size is None else resize(im, img_size))


def load_image_folder(root, img_size=None, labelled=True):
    """The images under root, searched recursively in sorted order, as uint8 [N, H, W, 3].

    labelled: root holds one sub-folder per class (sorted folder names give the class ids); returns
    (images, int64 labels, class names). Otherwise returns the images alone. With img_size every image is
    resized and centre-cropped to img_size x img_size; without it they must all have one size already.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    class_names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")) if labelled else [""]
    images, labels = [], []
    for label, name in enumerate(class_names):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        images += [read_image(p, img_size) for p in files]
        labels += [label] * len(files)
    if not images:
        raise ValueError(f"{root} holds no images {'in class sub-folders ' * labelled}({', '.join(IMAGE_EXTENSIONS)})")
    sizes = sorted({im.shape[:2] for im in images})
    if len(sizes) > 1:
        raise ValueError(f"images under {root} have different sizes ({sizes[0]} and {sizes[-1]}, ...): resize them first")
    return (np.stack(images), np.array(labels, dtype=np.int64), class_names) if labelled else np.stack(images)


def open_npz(path):
    try:
        f = np.load(path)
    except Exception as e:  # OSError, ValueError, BadZipFile (truncated), EOFError (empty), pickle's errors...
        raise ValueError(f"cannot read {path} as a .npz file: {str(e).strip() or type(e).__name__}") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"cannot read {path} as a .npz file: it holds one .npy array")
    return f


def load_npz_images(path):
    """arr_0 of an ADM-style .npz (OpenAI's evaluation format), checked to be uint8 [N, H, W, 3]."""
    with open_npz(path) as f:
        if "arr_0" not in f:
            raise ValueError(f"{path} holds no images (arr_0)")
        images = f["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    return images
