"""What FID mixes into one number, measured apart: KID, improved precision and recall, density and coverage.

kid() and prdc() take two feature arrays [N, D] (in this project fid.py's 2048-d Inception pool3 features), the samples
first and the reference (the real data) second, and compute their metrics as the published implementations named in
their docstrings do. Distances are Euclidean, computed as those implementations do in float32, |a|^2 + |b|^2 - 2 a.b,
one block of `chunk` rows against the whole other set at a time: no N x N matrix is ever held, and a block against
50,000 features is 1,000 x 50,000 float32, 200 MB (README gives the measured peak and times).
"""
import numpy as np
import torch

CHUNK = 1000


def _float32(*arrays, device="cpu"):
    return [torch.as_tensor(np.asarray(a), dtype=torch.float32, device=device) for a in arrays]


def kid(samples, reference, subsets=100, subset_size=1000, seed=2020, device="cpu"):
    """Kernel Inception Distance (Binkowski et al. 2018, Demystifying MMD GANs) as torch-fidelity computes it: mean and
    standard deviation (numpy's, ddof 0) over `subsets` estimates, each on `subset_size` rows of each input drawn
    without replacement, samples then reference, from one numpy RandomState(seed) (torch-fidelity's draws; 2020 is its
    default seed). Each estimate is the unbiased MMD^2 of Gretton et al. 2012 (Lemma 6) with k(x, y) = (x.y / D + 1)^3:

        sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2

    Its expectation does not depend on m, unlike FID's, so it is the distance to trust at small sample counts; being
    unbiased, it comes out below 0 when the two inputs are alike.
    """
    n1, n2 = len(samples), len(reference)
    if not 2 <= subset_size <= min(n1, n2):
        raise ValueError(f"a KID subset of {subset_size} features needs that many in each input, got {n1} and {n2}")
    x, y = _float32(samples, reference, device=device)
    m, d = subset_size, x.shape[1]
    rng = np.random.RandomState(seed)
    draw = lambda n: torch.from_numpy(rng.choice(n, m, replace=False)).to(x.device)
    mmds = []
    for _ in range(subsets):
        a, b = x[draw(n1)], y[draw(n2)]
        kxx, kyy, kxy = (((p @ q.T).double() / d + 1) ** 3 for p, q in ((a, a), (b, b), (a, b)))
        within = kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()
        mmds.append((within / (m * (m - 1)) - 2 * kxy.mean()).item())
    return float(np.mean(mmds)), float(np.std(mmds))


def squared_distances(a, b, chunk=CHUNK):
    """(rows, squared distances [len(rows), len(b)] of a[rows] to every row of b) for blocks of `chunk` rows of a.
    Squared distances order points as distances do, so every comparison below is made on them, as the ADM evaluator
    makes it. Rounding can leave a point's squared distance to itself a little off 0, below 0 even: still the
    smallest of its row, unless a duplicate of the point ties with it."""
    b2 = (b * b).sum(1)
    for i in range(0, len(a), chunk):
        block = a[i:i + chunk]
        # |a|^2 + |b|^2 first, then one fused -2 a.b: the same pair gives the same bits whichever side it is on
        yield slice(i, i + len(block)), ((block * block).sum(1, keepdim=True) + b2).addmm_(block, b.T, alpha=-2)


def knn_radii(x, k, chunk=CHUNK):
    """[N, k + 1]: column j holds each row's squared distance to its j-th nearest neighbour in x (column 0: itself), so
    column k is the squared radius of its k-NN ball."""
    if len(x) <= k:
        raise ValueError(f"{k}-nearest-neighbour balls need more than {k} features, got {len(x)}")
    return torch.cat([d.topk(k + 1, dim=1, largest=False).values for _, d in squared_distances(x, x, chunk)])


def prdc(samples, reference, k_pr=3, k_dc=5, chunk=CHUNK, device="cpu"):
    """Improved precision and recall (Kynkaanniemi et al. 2019) as the ADM evaluator and torch-fidelity compute them,
    and density and coverage (Naeem et al. 2020) as their prdc package computes them: each set's k-NN radii, then one
    pass over the sample-reference distances for all four.

    Each set's manifold is the union of balls around its points, each of radius the distance to its k-th nearest
    neighbour in its own set: k = k_pr = 3 for precision and recall (the paper's and both implementations' choice),
    k = k_dc = 5 for density and coverage (Naeem et al.'s recommendation), which use the reference's balls only.

    - precision: the fraction of samples inside the reference's manifold (fidelity: samples that look real);
    - recall: the fraction of reference points inside the samples' manifold (diversity: real data the samples reach);
      inside means distance <= radius, as both implementations compare;
    - density: sum_j #{i : |x_j - y_i| < r_i} / (k M) over the M samples x_j, the reference balls a sample falls in,
      over k: a sample in the large ball of one outlying reference point counts 1/k, not 1 as in precision. Samples
      distributed like the reference give 1 in expectation; it can exceed 1;
    - coverage: the fraction of reference points whose nearest sample lies inside their own ball: recall's question
      asked from the reference's side, where an outlying sample's large ball cannot cover what it does not reach;
      inside means distance < radius here, as prdc compares.
    """
    x, y = _float32(samples, reference, device=device)
    r_x, r_y = knn_radii(x, k_pr, chunk)[:, k_pr], knn_radii(y, max(k_pr, k_dc), chunk)
    r_pr, r_dc = r_y[:, k_pr], r_y[:, k_dc]
    precise, inside = 0, 0
    recalled = torch.zeros(len(y), dtype=torch.bool, device=y.device)
    nearest = torch.full((len(y),), float("inf"), device=y.device)
    for rows, d in squared_distances(x, y, chunk):
        precise += (d <= r_pr).any(1).sum().item()  # samples in some reference ball
        recalled |= (d <= r_x[rows, None]).any(0)  # reference points in some sample's ball
        inside += (d < r_dc).sum().item()  # (sample, reference ball) pairs
        nearest = torch.minimum(nearest, d.min(0).values)  # each reference point's nearest sample
    return {"precision": precise / len(x), "recall": recalled.double().mean().item(),
            "density": inside / (k_dc * len(x)), "coverage": (nearest < r_dc).double().mean().item()}
