"""The CFG losses on a 2-D toy whose guided scores are known exactly: python toy.py [--out toy/]

Each class is a mixture of isotropic Gaussians, so its noised density is one too, and the exact E[eps | z_t, c]
and E[eps | z_t] are closed-form (Tweedie). Wrapped as an eps_model, they let diffusion.ddim_sample draw exact
classifier-free guidance, up to DDIM's discretisation: the oracle. Small MLPs trained with losses.standard_loss,
losses.aligned_loss and losses.guidance_free_loss are sampled at equal effective guidance (w_eff = (w - w_t) /
(1 + w_t) for aligned, README "Reading the comparison"; a guidance-free model at w = 0 has w_eff = W) and measured
against the oracle at that w_eff: sliced W1 distance, out-of-distribution rate, class fidelity. Writes results.md,
results.csv and toy.png to --out; progress lines go to stderr.
"""
import copy
import csv
import io
import math
import os
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffusion import Schedule, ddim_sample
from flags import number, numbers, output_dir, parser
from losses import aligned_loss, guidance_free_loss, standard_loss
from runtime import write_atomic

K = 3  # classes; label K is the null class
_ANGLE = torch.arange(K, dtype=torch.float64) * 2 * math.pi / K + math.pi / 2
# class c: a mode of its own at radius 2, and a broad component near the centre that overlaps the other classes'
# (guidance only acts where classes share mass), pointing between class c and class c + 1
MEANS = torch.stack([2.0 * torch.stack([_ANGLE.cos(), _ANGLE.sin()], -1),
                     0.6 * torch.stack([(_ANGLE + math.pi / K).cos(), (_ANGLE + math.pi / K).sin()], -1)], 1)  # [K, M, 2]
STDS = torch.tensor([[0.35, 0.5]] * K, dtype=torch.float64)  # [K, M]
WEIGHTS = torch.tensor([[0.6, 0.4]] * K, dtype=torch.float64)  # [K, M], each row sums to 1
# linear, not cosine: at t = 1 the cosine schedule has alpha = 4.5e-5, and DDIM's first step x0 = (z - sigma eps) / alpha
# then multiplies a trained model's error by 2e4; image models survive it by clipping x0, the toy's data cannot be clipped
SCHEDULE = Schedule("linear")


def sample_data(y, generator=None):
    """x ~ p(x | c) for each label c in y: a component drawn by its weight, plus its isotropic Gaussian noise."""
    k = torch.multinomial(WEIGHTS[y], 1, generator=generator).squeeze(1)
    noise = torch.randn(len(y), 2, dtype=torch.float64, generator=generator)
    return (MEANS[y, k] + STDS[y, k, None] * noise).float()


def log_components(z, alpha, sigma):
    """log(pi_ck N(z; alpha mu_ck, v_ck I)) [B, K, M] and (z - alpha mu_ck) / v_ck [B, K, M, 2], in float64.

    z_t = alpha x + sigma eps maps each component N(mu, s^2 I) of the data to N(alpha mu, (alpha^2 s^2 + sigma^2) I),
    so every noised class density p_t(z | c) is again a Gaussian mixture, with variances v = alpha^2 s^2 + sigma^2."""
    alpha, sigma = (torch.as_tensor(v, dtype=torch.float64).reshape(-1, 1, 1) for v in (alpha, sigma))
    var = alpha**2 * STDS**2 + sigma**2
    diff = z.double()[:, None, None, :] - alpha[..., None] * MEANS
    log_p = WEIGHTS.log() - (diff**2).sum(-1) / (2 * var) - torch.log(2 * math.pi * var)
    return log_p, diff / var[..., None]


def _given(log_p, y):
    """The components of p(z | y): class y's, or for the null label y = K all of them, each class weighted 1/K."""
    keep = (torch.arange(K) == y[:, None]) | (y == K)[:, None]
    prior = torch.where(y == K, -math.log(K), 0.0).to(log_p)[:, None, None]
    return torch.where(keep[..., None], log_p + prior, -math.inf)


def log_density(z, alpha, sigma, y):
    """Exact log p_t(z | y), with y = K (null) the unconditional log p_t(z); alpha = 1, sigma = 0 is the data."""
    return _given(log_components(z, alpha, sigma)[0], y).logsumexp((1, 2))


def oracle(z, t, y):
    """The exact eps_model: E[eps | z_t, y] = -sigma grad log p_t(z | y) (Tweedie), E[eps | z_t] for y = K (null).

    grad log p_t = -sum_k r_k (z - alpha mu_k) / v_k with r_k the posterior of component k given z and y."""
    alpha, sigma = SCHEDULE.alpha_sigma(t.double())
    log_p, scaled = log_components(z, alpha, sigma)
    r = _given(log_p, y).flatten(1).softmax(1).view_as(log_p)
    return (sigma[:, None] * (r[..., None] * scaled).sum((1, 2))).to(z.dtype)


class MLP(torch.nn.Module):
    """eps(z, t, y): z and a sinusoidal embedding of t, plus a learned class embedding (row K = null), SiLU layers."""

    def __init__(self, width=64, depth=3):
        super().__init__()
        # frequencies 1 to 1000: the slowest spans t in [0, 1] without wrapping, the fastest resolves far below DDIM's 0.02
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(1000), 16)))
        self.embed = torch.nn.Embedding(K + 1, width)
        self.inp = torch.nn.Linear(2 + 32, width)
        hidden = [m for _ in range(depth) for m in (torch.nn.SiLU(), torch.nn.Linear(width, width))]
        self.net = torch.nn.Sequential(*hidden, torch.nn.SiLU(), torch.nn.Linear(width, 2))

    def forward(self, z, t, y):
        angles = t[:, None] * self.freqs
        return self.net(self.inp(torch.cat([z, angles.sin(), angles.cos()], 1)) + self.embed(y))


def train(loss, *, w=None, steps=3000, batch=512, width=64, lr=5e-3, p_uncond=0.1, seed=0, ema_decay=0.99, gf_start=0.3):
    """An MLP trained with losses.standard_loss (loss="standard"), losses.aligned_loss at w (loss="aligned") or
    losses.guidance_free_loss at W = w (loss="guidance-free"), whose teacher is an EMA of the model (ema_decay) and
    whose guidance term starts after the first gf_start share of the steps, when the teacher is a sensible model.

    The seed fixes the initial weights and every draw (labels, data, t, eps, dropout), so the losses see the same data."""
    torch.manual_seed(seed)
    model = MLP(width)
    teacher = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)  # linear to 0: settles in few steps
    for step in range(steps):
        y = torch.randint(0, K, (batch,))
        x = sample_data(y)
        if loss == "standard":
            value = standard_loss(model, SCHEDULE, x, y, p_uncond=p_uncond, null_class=K)
        elif loss == "aligned":
            value = aligned_loss(model, SCHEDULE, x, y, w=w, p_uncond=p_uncond, null_class=K)
        else:
            value = guidance_free_loss(model, teacher, SCHEDULE, x, y, w=w, p_uncond=p_uncond, null_class=K,
                                       guide=step >= gf_start * steps)
        opt.zero_grad()
        value.backward()
        opt.step()
        decay.step()
        if loss == "guidance-free":
            torch._foreach_lerp_(list(teacher.parameters()), list(model.parameters()), 1 - ema_decay)
    return model.eval()


def sample(eps_model, w, steps, n, seed):
    """n points by guided DDIM (Ho & Salimans eq. 6: (1 + w) eps(z, c) - w eps(z, null)), labels 0, 1, .., K-1, 0, .."""
    y = torch.arange(n) % K
    x = ddim_sample(eps_model, SCHEDULE, y, (n, 2), w=w, steps=steps, null_class=K,
                    generator=torch.Generator().manual_seed(seed), clip_x0=False)  # no clip: data are not in [-1, 1]
    return x, y


def sliced_w1(a, b, y):
    """Sliced Wasserstein-1 between two sets with the same labels y, averaged over the classes: the 1-D W1 (the
    mean gap between sorted projections, for equal sizes) averaged over 128 directions evenly spaced in angle,
    which in 2-D covers the half circle more evenly than random directions would."""
    angle = torch.arange(128) * math.pi / 128
    d = torch.stack([angle.cos(), angle.sin()])
    gaps = [((a[y == c] @ d).sort(0).values - (b[y == c] @ d).sort(0).values).abs().mean() for c in range(K)]
    return torch.stack(gaps).mean().item()


def class_log_likelihoods(x):
    """Exact log p(x | c) of the data for every class c, [B, K]."""
    return log_components(x, 1.0, 0.0)[0].logsumexp(2)


def ood_thresholds(n=100_000, seed=12345):
    """Per class, the 1% quantile of log p(x | c) over true class-c data: below it a point is out of distribution."""
    y = torch.arange(n) % K
    log_p = class_log_likelihoods(sample_data(y, torch.Generator().manual_seed(seed))).gather(1, y[:, None])[:, 0]
    return torch.stack([log_p[y == c].quantile(0.01) for c in range(K)])


def measure(x, y, ref, thresholds):
    """Sliced W1 to the reference set, the share of points below their class's 1% log-likelihood quantile, and the
    class fidelity: the mean exact posterior p(c | x) of the requested class c, under the uniform class prior."""
    log_p = class_log_likelihoods(x)
    own = log_p.gather(1, y[:, None])[:, 0]
    return {"sw1": sliced_w1(x, ref, y), "ood": (own < thresholds[y]).double().mean().item(),
            "fidelity": log_p.softmax(1).gather(1, y[:, None]).mean().item()}


def methods(models, w_eff):
    """(row name, eps model, sampling w) of each method at effective guidance w_eff; a new loss is one more row.

    The oracle and a standard model have w_eff = w. An aligned model trained at w_t has w_eff = (w - w_t) / (1 + w_t),
    so it is sampled at w = w_t + w_eff (1 + w_t), and, as the naive comparison, at w = w_eff. A guidance-free model
    trained at W appears where w_eff = W, sampled at w = 0. The network evaluations
    per sample step follow from w: ddim_sample makes one pass at w = 0, else one on a doubled batch (2 evaluations)."""
    rows = [("oracle (2nd seed: its sw1 is the noise floor)", oracle, w_eff), ("standard @ w = w_eff", models["standard"], w_eff)]
    for wt, model in models["aligned"].items():
        rows += [(f"aligned w_t={wt:g} @ w = {wt:g} + {1 + wt:g} w_eff", model, wt + w_eff * (1 + wt)),
                 (f"aligned w_t={wt:g} @ w = w_eff (naive)", model, w_eff)]
    # a guidance-free model trained at W samples w_eff = W at w = 0, with one network evaluation a step
    return rows + [(f"guidance-free W={W:g} @ w = 0", model, 0.0) for W, model in models["guidance-free"].items() if W == w_eff]


def draw(panels, names, w_effs, path, size=96, lim=4.0):
    """2-D histograms (rows: methods, columns: w_eff) on [-lim, lim]^2, one colour per class, drawn with Pillow."""
    colours = np.array([[214, 39, 40], [31, 119, 180], [44, 160, 44]], dtype=np.float64)
    left, top = 230, 16
    img = Image.new("RGB", (left + size * len(w_effs), top + size * len(names)), "white")
    pen = ImageDraw.Draw(img)
    for j, w_eff in enumerate(w_effs):
        pen.text((left + j * size + 4, 2), f"w_eff={w_eff:g}", fill="black")
    for i, name in enumerate(names):
        pen.text((4, top + i * size + size // 2 - 6), name.split(" (")[0], fill="black")
        for j, w_eff in enumerate(w_effs):
            if (name, w_eff) not in panels:  # a guidance-free model exists at w_eff = W only
                continue
            x, y = panels[name, w_eff]
            h = np.stack([np.histogram2d(x[y == c, 1].numpy(), x[y == c, 0].numpy(), bins=size,
                                         range=[[-lim, lim]] * 2)[0][::-1] for c in range(K)])
            ink = np.sqrt(h / max(h.max(), 1))  # sqrt: the thin tails stay visible beside the modes
            rgb = 255 - np.einsum("khw,kc->hwc", ink, 255 - colours)
            tile = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
            img.paste(tile, (left + j * size, top + i * size))
            pen.rectangle([left + j * size, top + i * size, left + (j + 1) * size - 1, top + (i + 1) * size - 1], outline="grey")
    write_atomic(path, lambda f: img.save(f, format="PNG"))


def tables(rows, header):
    """results.md: one table per metric, methods as rows, (DDIM steps, w_eff) cells as columns."""
    cells = list(dict.fromkeys((r["steps"], r["w_eff"]) for r in rows))
    names = list(dict.fromkeys(r["method"] for r in rows))
    value = {(r["method"], r["steps"], r["w_eff"]): r for r in rows}
    out = [header]
    for key, title, fmt in [("sw1", "Sliced W1 to the oracle at the same w_eff (lower is better)", "{:.3f}"),
                            ("ood", "Out-of-distribution rate: log p(x | c) below true data's 1% quantile", "{:.2%}"),
                            ("fidelity", "Class fidelity: mean exact p(c | x) of the requested class", "{:.3f}")]:
        out += [f"## {title}", "", "| method | " + " | ".join(f"w_eff={w:g}, {s} steps" for s, w in cells) + " |",
                "|---" * (len(cells) + 1) + "|"]
        out += ["| " + name + " | " + " | ".join(fmt.format(value[name, s, w][key]) if (name, s, w) in value else ""
                                                  for s, w in cells) + " |" for name in names]
        out.append("")
    return "\n".join(out)


def get_parser():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--out", type=output_dir, default="toy", help="output folder")
    p.add_argument("--steps", type=number(int, lo=1), default=3000, help="training steps of each model (>= 1)")
    p.add_argument("--batch", type=number(int, lo=1), default=512, help="training batch (>= 1)")
    p.add_argument("--width", type=number(int, lo=1), default=64, help="MLP width (>= 1)")
    p.add_argument("--lr", type=number(float, lo=0, lo_open=True), default=5e-3, help="Adam's learning rate (> 0), "
                   "decayed linearly to 0")
    p.add_argument("--p-uncond", type=number(float, 0, 1, hi_open=True), default=0.1, help="label dropout in [0, 1), "
                   "the same for every loss")
    p.add_argument("--w-train", type=numbers(float, lo=0), default=[2.0], help="comma list of w_t (>= 0): one aligned "
                   "model each")
    p.add_argument("--gf-w", type=numbers(float, empty_ok=True, lo=0), default=[1.0, 2.0], help="comma list of W (>= 0): one "
                   "guidance-free model each, sampled at w = 0 where w_eff = W ('' for none)")
    p.add_argument("--w-eff", type=numbers(float, lo=-1), default=[-0.5, 0, 0.5, 1, 2, 4], help="effective guidance "
                   "(each >= -1), at --ddim-steps")
    p.add_argument("--ddim-steps", type=number(int, lo=1), default=50, help="DDIM steps of every sample set (>= 1)")
    p.add_argument("--few-steps", type=number(int, lo=0), default=10, help="also sample w_eff 0 and 2 at this many "
                   "steps (>= 0; 0: no)")
    p.add_argument("--n", type=number(int, lo=2 * K), default=10_000, help=f"points per sample set (>= {2 * K})")
    p.add_argument("--seed", type=number(int, lo=0), default=0, help="seed of the training and of every sample set (>= 0)")
    return p


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {args.out}: cannot make a folder there ({e.strerror or e})")
    start = time.time()
    log = lambda text: print(f"[{time.time() - start:5.1f}s] {text}", file=sys.stderr, flush=True)
    torch.set_num_threads(1)  # matrices this small gain little from a second thread, and lose 3x when cores are shared
    kw = dict(steps=args.steps, batch=args.batch, width=args.width, lr=args.lr, p_uncond=args.p_uncond, seed=args.seed)
    models = {"standard": train("standard", **kw), "aligned": {}}
    log(f"trained standard ({args.steps} steps)")
    for wt in args.w_train:
        models["aligned"][wt] = train("aligned", w=wt, **kw)
        log(f"trained aligned at w_t={wt:g}")
    models["guidance-free"] = {W: train("guidance-free", w=W, **kw) for W in args.gf_w}
    log(f"trained guidance-free at W={','.join(f'{W:g}' for W in args.gf_w)}")
    thresholds = ood_thresholds()
    cells = [(args.ddim_steps, w) for w in args.w_eff] + [(args.few_steps, w) for w in (0.0, 2.0) if args.few_steps]
    rows, panels = [], {}
    for steps, w_eff in cells:
        first = len(rows)
        ref, y = sample(oracle, w_eff, steps, args.n, args.seed)
        for name, model, w in methods(models, w_eff):
            x, _ = sample(model, w, steps, args.n, args.seed + 1)  # every method from the same noise, not ref's
            rows.append({"method": name, "w": w, "w_eff": w_eff, "steps": steps, "nfe_per_step": 1 if w == 0 else 2,
                         "n": args.n, **measure(x, y, ref, thresholds)})
            if steps == args.ddim_steps:
                panels[name, w_eff] = (x, y)
        log(f"sampled w_eff={w_eff:g} at {steps} DDIM steps: " + ", ".join(f"{r['sw1']:.3f}" for r in rows[first:]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(os.path.join(args.out, "results.csv"), lambda f: f.write(buf.getvalue().encode()))
    command = " ".join(["python toy.py", *(sys.argv[1:] if argv is None else argv)])
    header = (f"# Toy with exact scores\n\n`{command}`: "
              f"{args.steps} training steps of each model (batch {args.batch}, p_uncond {args.p_uncond:g}, MLP width "
              f"{args.width}), {args.n} points per sample set, DDIM eta = 0. Network evaluations per sample step: 1 where the "
              "sampling w is 0, else 2 (one pass on a doubled batch); `results.csv` gives each row's w. The oracle row is "
              "an independent oracle set: its sliced W1 is the noise floor. True data: 1% OOD by construction.\n")
    write_atomic(os.path.join(args.out, "results.md"), lambda f: f.write(tables(rows, header).encode()))
    draw(panels, list(dict.fromkeys(name for name, _ in panels)), args.w_eff, os.path.join(args.out, "toy.png"))
    log(f"wrote results.md, results.csv and toy.png to {args.out}")


if __name__ == "__main__":
    main()
