"""The comparison: FID (with --kid --prdc also KID, precision, recall, density and coverage) over guidance scale and
sampling steps for several checkpoints.

    python sweep.py --ckpt runs/standard/ckpt.pt runs/aligned-w2/ckpt.pt --w 0,0.5,1,2,3,5 --steps 10,25,50 --n 10000

Every cell (checkpoint x steps x w) draws the same n labels with the same per-image seeds, so cells differ
only by the model and the sampler. Results go to results.csv (one row per cell, appended as each cell
finishes; cells already there, with the figures asked for, are skipped, so an interrupted sweep resumes), results.md
and, with matplotlib installed, results.png.
"""
import csv
import io
import os
import re
import sys
import time

import numpy as np

import fid
from distributed import init_distributed, rank_and_world
from flags import AMP, existing_file, interval, number, numbers, output_dir, parser
from inception import FIDError
from runtime import CleanStop, fast_path, pick_device, progress, save_class_grid, speed_line, write_atomic
from sample import CheckpointError, balanced_labels, effective_to_sampling_w, effective_w, load_checkpoint, sample_checkpoint

METRICS = ["kid", "kid_std", "precision", "recall", "density", "coverage"]  # empty unless --kid, --prdc asked for them
HEADER = ["checkpoint", "loss", "w_train", "p_uncond", "w", "w_eff", "steps", "eta", "n", "ref", "fid", "seconds",
          "sampler", "v", "interval", *METRICS]


def run_name(path):
    """A short name for a checkpoint: its run folder for .../<run>/ckpt.pt, <run>@<step> for train.py --keep-every's
    .../<run>/ckpt-<step>.pt, else the file's stem."""
    head, stem = os.path.split(os.path.splitext(os.path.normpath(path))[0])
    kept = re.fullmatch(r"ckpt(?:-(\d+))?", stem) if head else None  # the names train.py writes
    return stem if kept is None else os.path.basename(head) + (f"@{int(kept[1])}" if kept[1] else "")


def read_results(path):
    """The rows of results.csv; rows from before the sampler columns existed were DDIM over every step, rows from
    before the metrics columns have none of those figures."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [{"sampler": "ddim", "v": "", "interval": "", **dict.fromkeys(METRICS, ""),
                 **{k: v for k, v in r.items() if v is not None}} for r in csv.DictReader(f)]


def cell_key(row):
    """What makes a cell: a rerun skips the cells whose key is already in results.csv."""
    return (row["checkpoint"], float(row["w"]), int(row["steps"]), float(row["eta"]), int(row["n"]), row["ref"],
            row["sampler"], row["v"], row["interval"])


def sampler_text(sampler, v, guidance_interval):
    """The sampler's three columns: v only for ancestral, the interval as (lo, hi] or empty for every step."""
    return {"sampler": sampler, "v": repr(float(v)) if sampler == "ancestral" else "",
            "interval": "" if guidance_interval is None else "(%g, %g]" % guidance_interval}


def label(row, name=str):
    """A row's method: name(its checkpoint), and the sampler unless it is DDIM over every step."""
    extra = ([f"ancestral v={float(row['v']):g}"] if row["sampler"] == "ancestral" else []) + \
        ([f"guidance in {row['interval']}"] if row["interval"] else [])
    return name(row["checkpoint"]) + (f" ({', '.join(extra)})" if extra else "")


def write_results(path, rows):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HEADER, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, lambda f: f.write(buf.getvalue().encode()))


# results.md's tables: (title, column, format, whether a row's lowest value is its best, shown in bold)
TABLES = [("FID", "fid", "%.2f", True), ("KID", "kid", "%.5f", True), ("precision", "precision", "%.3f", False),
          ("recall", "recall", "%.3f", False), ("density", "density", "%.3f", False),
          ("coverage", "coverage", "%.3f", False)]


def markdown(rows, column):
    """One table per metric present and step count: checkpoints (and samplers) as rows, `column` (w or w_eff) as
    columns; each row's best FID and KID in bold (KID with its std over subsets). Precision and recall, density and
    coverage trade against each other along w, so none of their values is marked best."""
    out = []
    for title, key, fmt, lowest in TABLES:
        for steps in sorted({int(r["steps"]) for r in rows if r[key] != ""}):
            cells = [r for r in rows if int(r["steps"]) == steps and r[key] != ""]
            cols = sorted({float(r[column]) for r in cells})
            out += [f"## {steps} sampling steps: {title} by {column}", "",
                    "| checkpoint | " + " | ".join(f"{column}={c:g}" for c in cols) + " |",
                    "| --- |" + " ---: |" * len(cols)]
            for ckpt in dict.fromkeys(label(r, run_name) for r in cells):
                mine = {float(r[column]): r for r in cells if label(r, run_name) == ckpt}
                best = min(float(r[key]) for r in mine.values()) if lowest else None
                text = lambda r: (f"**{fmt}**" if float(r[key]) == best else fmt) % float(r[key]) + \
                    (" ± " + fmt % float(r["kid_std"]) if key == "kid" else "")
                out.append(f"| {ckpt} | " + " | ".join(text(mine[c]) if c in mine else "" for c in cols) + " |")
            out.append("")
    return "\n".join(out)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None where matplotlib (optional) is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(rows, column, path):
    """FID against `column`, one line per checkpoint, sampler and step count, and beside it, for the rows with them,
    precision against recall, points labelled by w_eff: the fidelity/diversity trade-off that guidance moves along.
    False when matplotlib is missing."""
    if (plt := pyplot()) is None:  # an optional dependency: the CSV and markdown are the results, the figure shows them
        return False
    pr = [r for r in rows if r["precision"] != ""]
    fig, axes = plt.subplots(1, 2 if pr else 1, figsize=(13 if pr else 7, 4.5), squeeze=False)
    curve = lambda r: (label(r, run_name), int(r["steps"]))
    for key in dict.fromkeys(map(curve, rows)):
        cells = sorted((float(r[column]), float(r["fid"])) for r in rows if curve(r) == key)
        axes[0, 0].plot(*zip(*cells), marker="o", label=f"{key[0]}, {key[1]} steps")
    axes[0, 0].set(xlabel=column, ylabel="FID", title="FID by guidance scale")
    for key in dict.fromkeys(map(curve, pr)):
        cells = sorted((float(r["w_eff"]), float(r["recall"]), float(r["precision"])) for r in pr if curve(r) == key)
        axes[0, 1].plot([c[1] for c in cells], [c[2] for c in cells], marker="o", label=f"{key[0]}, {key[1]} steps")
        for w_eff, recall, precision in cells:
            axes[0, 1].annotate(f"{w_eff:g}", (recall, precision), xytext=(4, 4), textcoords="offset points", fontsize=7)
    if pr:
        axes[0, 1].set(xlabel="recall (diversity)", ylabel="precision (fidelity)",
                       title="precision against recall, points labelled by w_eff")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return True


def run_sweep(ckpts, steps_list, n, *, ws=None, w_effs=None, ref="cifar10-train", out="sweep", eta=0.0, seed=0,
              clip_x0=True, batch_size=None, device="cpu", amp="auto", fid_batch_size=50, data_dir="data", weights=None,
              sampler="ddim", v=0.3, guidance_interval=None, kid=False, prdc=False, kid_subsets=100,
              kid_subset_size=1000, on_cell=None, compile_inception=True):
    """Sample and score every checkpoint x steps x w cell not yet in out/results.csv with the figures asked for (a
    cell there without them is recomputed, and its row replaced); return all rows. Under torchrun each rank draws its
    block of every cell's images and rank 0 alone scores them and writes; there on_cell(done, total) runs once each
    cell is in results.csv."""
    ws = ws or [0.0] if w_effs is None else ws
    method = sampler_text(sampler, v, guidance_interval)
    fid.check_input(ref)  # every input is checked before any work
    if kid and n < kid_subset_size:
        raise FIDError(f"--kid-subset-size {kid_subset_size} is more than the --n {n} images of a cell: lower it to at "
                       f"most {n}")
    asked = METRICS[:2] * kid + METRICS[2:] * prdc
    csv_path = os.path.join(out, "results.csv")
    rows = read_results(csv_path)
    done = {cell_key(r) for r in rows if all(r[m] != "" for m in asked)}
    try:  # fail early on a bad file, not after hours of sampling; each model is loaded once, ~140 MB at the default size
        models = {path: load_checkpoint(path, device=device) for path in ckpts}
    except CheckpointError as e:
        raise FIDError(str(e)) from None
    if len(sizes := {model.img_size for model, _ in models.values()}) > 1:  # an image reference is resized to theirs
        raise FIDError(f"the checkpoints make images of {len(sizes)} sizes {sorted(sizes)}: sweep each size on its own")
    todo = []
    for path in ckpts:
        for steps in steps_list:
            for value in (ws if ws is not None else w_effs):
                w = value if ws is not None else effective_to_sampling_w(models[path][1], value)
                if w < -1:
                    raise FIDError(f"--w-eff {value:g} maps to w = {w:g} < -1 for {path}")
                if cell_key(dict(checkpoint=path, w=w, steps=steps, eta=eta, n=n, ref=ref, **method)) not in done:
                    todo.append((path, steps, w))
    main = rank_and_world()[0] == 0
    if todo and main:  # the other ranks only sample, and wait for rank 0 in the next cell's gather
        # compiled where the cells' images pay for it; the reference (unless cached) decides by its own count
        inception = fid.inception_for(len(todo) * n, weights, device, fid_batch_size, compile_inception)
        mu_ref, sigma_ref, n_ref, feats_ref = fid.input_statistics(ref, None, fid_batch_size, device, data_dir, weights,
                                                                   features=kid or prdc, img_size=sizes.pop(),
                                                                   may_compile=compile_inception)
        if kid and n_ref < kid_subset_size:
            raise FIDError(f"--kid-subset-size {kid_subset_size} is more than the {n_ref} images of {ref}: lower it to "
                           f"at most {n_ref}")
    os.makedirs(os.path.join(out, "grids"), exist_ok=True)
    if main:
        for line in sorted({speed_line(device, *fast_path(device, amp, ch=model.ch)) for model, _ in models.values()}):
            print(line, file=sys.stderr)
        print(f"sweep: {len(todo)} cells to compute, {len(done)} already in {csv_path}", file=sys.stderr)
    column = "w" if ws is not None else "w_eff"
    suffix = (f"_ancestral_v{v:g}" if sampler == "ancestral" else "") + \
        ("_interval%g-%g" % guidance_interval if guidance_interval else "")  # grid names; "" for DDIM over every step
    mine = lambda: [r for r in rows if (float(r["eta"]), int(r["n"]), r["ref"]) == (eta, n, ref)]
    cost = lambda cell: cell[1] * (1 if cell[2] == 0 else 2)  # network evaluations per image
    total, spent, start = sum(map(cost, todo)), 0, time.time()
    for i, (path, steps, w) in enumerate(todo):
        (model, config), t0 = models[path], time.time()
        images = sample_checkpoint(model, config, balanced_labels(n, config["unet"]["num_classes"]), w=w, steps=steps,
                                   eta=eta, clip_x0=clip_x0, seed=seed, batch_size=batch_size, device=device, amp=amp,
                                   sampler=sampler, v=v, guidance_interval=guidance_interval,
                                   progress=progress(prefix=f"[cell {i + 1}/{len(todo)}] {run_name(path)} steps={steps} "
                                                     f"w={w:g}: ", file=sys.stderr) if main else None)
        if images is None:  # under torchrun the other ranks only sample
            continue
        # NCHW in memory like one process's images: the Inception features' last bits depend on the layout
        images = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
        rate = n / (time.time() - t0)
        feats = fid.inception_features(inception, images, fid_batch_size, device)
        score = fid.frechet_distance(*fid.feature_statistics(feats), mu_ref, sigma_ref)
        scores = fid.feature_metrics(feats.astype(fid.FEATURES_DTYPE), feats_ref, kid, prdc, kid_subsets,
                                     kid_subset_size, device)
        seconds = time.time() - t0
        row = {"checkpoint": path, "loss": config["loss"], "w_train": "" if config["w"] is None else repr(config["w"]),
               "p_uncond": repr(config["p_uncond"]), "w": repr(float(w)), "w_eff": repr(float(effective_w(config, w))),
               "steps": steps, "eta": repr(float(eta)), "n": n, "ref": ref, "fid": repr(score), "seconds": repr(seconds),
               **method, **{m: repr(scores[m]) if m in scores else "" for m in METRICS}}
        rows = [r for r in rows if cell_key(r) != cell_key(row)] + [row]  # a cell recomputed for its metrics: one row
        save_class_grid(images, os.path.join(out, "grids", f"{run_name(path)}_steps{steps}_w{w:g}{suffix}.png"),
                        config["class_names"][:n], max_cols=8)  # fewer images than classes: fewer rows
        write_results(csv_path, rows)  # after the grid: a cell in results.csv, which a rerun skips, has its grid
        if on_cell is not None:
            on_cell(i + 1, len(todo))
        write_atomic(os.path.join(out, "results.md"), lambda f: f.write(markdown(mine(), column).encode()))
        spent += cost(todo[i])
        eta_s = (time.time() - start) / spent * (total - spent)
        extra = "".join(f", {m} {scores[m]:.4g}" for m in METRICS if m in scores and m != "kid_std")
        print(f"[cell {i + 1}/{len(todo)}] {run_name(path)} steps={steps} w={w:g}: FID {score:.4f}{extra} (n={n}) "
              f"{rate:.1f} img/s, {seconds:.1f} s; sweep ETA {eta_s / 60:.1f} min", file=sys.stderr)
    if main and mine() and not plot(mine(), column, os.path.join(out, "results.png")):
        print("sweep: matplotlib is not installed, so results.png was not drawn (pip install matplotlib)", file=sys.stderr)
    return rows


def main(argv=None):
    p = parser("FID for every checkpoint x steps x w cell, with resume.")
    p.add_argument("--ckpt", nargs="+", type=existing_file, required=True, help="train.py checkpoints to compare")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--w", type=numbers(float, lo=-1), help="sampling guidance scales, e.g. 0,0.5,1,2 (each >= -1; None: 0)")
    g.add_argument("--w-eff", type=numbers(float), help="effective guidance scales instead of --w (finite; each must map "
                   "to a w >= -1; see README)")
    p.add_argument("--steps", type=numbers(int, lo=1), default=[50], help="sampling step counts, e.g. 10,25,50 (each >= 1)")
    p.add_argument("--sampler", choices=["ddim", "ancestral"], default="ddim", help="as in sample.py, for every cell")
    p.add_argument("--v", type=number(float, 0, 1), default=0.3, help="ancestral's variance interpolation (in [0, 1])")
    p.add_argument("--guidance-interval", type=interval, metavar="LO,HI", help="guide only where sigma/alpha is in "
                   "(LO, HI], as in sample.py; None: every step")
    p.add_argument("--n", type=number(int, lo=2), default=10000, help="images per cell (>= 2, for a covariance)")
    p.add_argument("--ref", default="cifar10-train", help="the reference input of fid.py: cifar10-train, cifar10-test, "
                   "an image folder or a .npz")
    p.add_argument("--out", type=output_dir, default="sweep", help="folder for results.csv, results.md and grids/")
    p.add_argument("--eta", type=number(float, 0, 1), default=0.0, help="DDIM eta (in [0, 1])")
    p.add_argument("--seed", type=number(int, lo=0), default=0, help="image i of every cell starts from seed + i")
    p.add_argument("--batch-size", type=number(int, lo=1), help="images per sampling batch (None: 1024 on CUDA, halved "
                   "on OOM; 8 on CPU)")
    p.add_argument("--amp", **AMP)
    p.add_argument("--no-clip", action="store_true", help="do not clamp the predicted clean image to [-1, 1]")
    p.add_argument("--fid-batch-size", type=number(int, lo=1), default=50, help="images per Inception forward pass")
    p.add_argument("--device", type=pick_device, default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:N")
    p.add_argument("--weights", type=existing_file, help="FID Inception weights (see fid.py --help)")
    p.add_argument("--data-dir", type=output_dir, default="data", help="where CIFAR-10 and its cached statistics live")
    p.add_argument("--no-compile-inception", action="store_true", help="keep Inception uncompiled (see fid.py --help)")
    p.add_argument("--kid", action="store_true", help="also KID on every row (the reference needs features: fid.py)")
    p.add_argument("--kid-subsets", type=number(int, lo=1), default=100, help="KID's random subsets (>= 1)")
    p.add_argument("--kid-subset-size", type=number(int, lo=2), default=1000, help="features of each input in a KID "
                   "subset (>= 2, at most --n and the reference's count)")
    p.add_argument("--prdc", action="store_true", help="also precision, recall (k = 3), density and coverage (k = 5)")
    args = p.parse_args(argv)
    device, rank = init_distributed(args.device), rank_and_world()[0]  # a plain run: (args.device, 0)
    csv_path = os.path.join(args.out, "results.csv")
    stop = CleanStop(f"before a cell was finished: {csv_path} is as it was", quiet=rank > 0)

    def on_cell(done, total):  # a stopped sweep keeps its finished cells, and a rerun skips them
        stop.finished = f"after {done} of {total} cells, kept in {csv_path}: run the same command for the rest"
    try:
        with stop:  # a signal or a failed write ends it with one line
            if rank == 0:  # the one writer under torchrun; it locks before results.csv is read, to be rewritten
                stop.hold(args.out)
            run_sweep(args.ckpt, args.steps, args.n, ws=args.w if args.w_eff is None else None, w_effs=args.w_eff,
                      ref=args.ref, out=args.out, eta=args.eta, seed=args.seed, clip_x0=not args.no_clip,
                      batch_size=args.batch_size, device=device, amp=args.amp, fid_batch_size=args.fid_batch_size,
                      data_dir=args.data_dir, weights=args.weights, sampler=args.sampler, v=args.v,
                      guidance_interval=args.guidance_interval, kid=args.kid, prdc=args.prdc,
                      kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size, on_cell=on_cell,
                      compile_inception=not args.no_compile_inception)
    except FIDError as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
