"""Tests for cfg-aligned. CPU only, tiny widths, few steps: the whole file runs in under 3 minutes on 2 cores."""
import math

import pytest
import torch

from diffusion import Schedule, add_noise, ddim_sample
from losses import aligned_loss, standard_loss
from model import UNet

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


# ---- the project's skeleton ----


def test_ci_runs_the_readme_test_command():
    from pathlib import Path
    here = Path(__file__).parent
    command = (here / ".ci/run").read_text().strip().splitlines()[-1]
    assert "pytest" in command and "    " + command + "\n" in (here / "README.md").read_text()
