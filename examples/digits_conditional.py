"""A class-conditional convolutional CNF on scikit-learn's digits, scored in bits per dimension.

The digits are 1x8x8 images with L = 17 grey levels. Training (conditional flow matching, OT path)
dequantizes every batch afresh, y = 2(x + u)/17 - 1 with u ~ U[0, 1), and passes each image's label
to a ``cnftools.ConvField(1, num_classes=10)`` through ``train_cfm(..., extras=...)`` (here a
sampler returns ``(y, {"y": labels})``). Scoring computes the exact conditional likelihood
log p(x | label) of every held-out digit by ``cnftools.log_likelihood`` (exact divergence, 64
vector-Jacobian products per evaluation) and reports

* conditional bits/dim, -log2 p(x | label) / 64, beside class-conditional baselines (a Gaussian
  and a per-pixel histogram fitted per class), and
* an upper bound on the unconditional bits/dim, -log2 p(x) / 64 <= (-log2 p(x | label)
  - log2 p(label)) / 64, since p(x) = sum_c p(c) p(x | c) >= p(label) p(x | label), beside the
  unconditional baselines of ``cnftools.nll``.

The split is the one ``cnftools train/nll --dataset digits`` use (a fixed permutation, seed 0;
1438 train, 359 test). Needs scikit-learn. Measured numbers: docs/guide/images.md.

Run:
    python examples/digits_conditional.py                  # about 6 minutes on one CPU core
    python examples/digits_conditional.py --steps 200      # a quick look
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import cnftools
from cnftools.data import DIGITS_LEVELS, bits_per_dim, dequantization_log_det, dequantize
from cnftools.nll import gaussian_baseline_nll, histogram_baseline_nll

NUM_CLASSES = 10
SPLIT_SEED = 0  # the permutation of cnftools.cli.common.digits_split
TEST_FRACTION = 0.2


def load_split() -> dict[str, torch.Tensor]:
    """Digits as ``(N, 1, 8, 8)`` integers ``0..16`` with their labels, split 80/20 (seed 0)."""
    from sklearn.datasets import load_digits

    images = cnftools.data.load_digits(images=True)
    labels = torch.as_tensor(load_digits().target, dtype=torch.long)
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = round(TEST_FRACTION * images.shape[0])
    test, train = order[:n_test].sort().values, order[n_test:].sort().values
    return {
        "train_x": images[train],
        "train_y": labels[train],
        "test_x": images[test],
        "test_y": labels[test],
    }


def build_field(hidden: tuple[int, ...] = (32, 32, 32), seed: int = 0) -> cnftools.ConvField:
    """A class-conditional ConvField for 1x8x8 images, float32."""
    torch.manual_seed(seed)
    return cnftools.ConvField(1, hidden=hidden, num_classes=NUM_CLASSES)


def train(
    field: cnftools.ConvField,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
) -> cnftools.training.TrainResult:
    """Conditional flow matching on freshly dequantized batches, labels passed as extras."""

    def sampler(n: int, generator: torch.Generator):
        rows = torch.randint(images.shape[0], (n,), generator=generator)
        y = dequantize(images[rows], DIGITS_LEVELS, generator, centered=True)
        return y, {"y": labels[rows]}

    return cnftools.train_cfm(
        field,
        cnftools.OTPath(0.0),
        sampler,
        steps=steps,
        batches=cnftools.Batches(size=batch_size, seed=seed),
        optimization=cnftools.Optimization(lr=lr, lr_schedule="cosine"),
    )


def conditional_nll(
    field: cnftools.ConvField,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    seed: int = 0,
) -> tuple[torch.Tensor, int]:
    """-log p(x | label) in nats per image (K = 1 dequantization bound) and the total NFE.

    Each class is solved as one batch with the field's label bound to it (the same label for
    every row the field is called with), so any batching the likelihood engine does keeps the
    label right.
    """
    gen = torch.Generator().manual_seed(seed)
    y = dequantize(images, DIGITS_LEVELS, gen, centered=True)
    log_det = dequantization_log_det(images[0].numel(), DIGITS_LEVELS, centered=True)
    nll = torch.empty(images.shape[0], dtype=torch.float64)
    nfe = 0
    field.eval()
    for label in range(NUM_CLASSES):
        rows = (labels == label).nonzero().flatten()
        if rows.numel() == 0:
            continue

        def bound(x, t, label=label):
            return field(x, t, y=torch.full((x.shape[0],), label, device=x.device))

        with torch.no_grad():  # no graph for gradients through the solve (memory grows with NFE)
            result = cnftools.log_likelihood(bound, y[rows], rtol=rtol, atol=atol)
        nll[rows] = -(result.log_prob.double() + log_det)
        nfe += result.nfe.forward
    return nll, nfe


def baselines(split: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Test NLLs (nats per image) of the unconditional and class-conditional baselines."""
    deq = cnftools.Dequantization(DIGITS_LEVELS, samples=1, centered=True)
    train_x, train_y, test_x, test_y = (
        split[k] for k in ("train_x", "train_y", "test_x", "test_y")
    )
    out = {
        "gaussian": gaussian_baseline_nll(train_x, test_x, deq),
        "histogram": histogram_baseline_nll(train_x, test_x, DIGITS_LEVELS),
        "gaussian | label": torch.empty(test_x.shape[0], dtype=torch.float64),
        "histogram | label": torch.empty(test_x.shape[0], dtype=torch.float64),
    }
    for label in range(NUM_CLASSES):
        tr, te = train_x[train_y == label], (test_y == label).nonzero().flatten()
        if te.numel() == 0:
            continue
        out["gaussian | label"][te] = gaussian_baseline_nll(tr, test_x[te], deq)
        out["histogram | label"][te] = histogram_baseline_nll(tr, test_x[te], DIGITS_LEVELS)
    return out


def label_log_prior(train_labels: torch.Tensor, test_labels: torch.Tensor) -> torch.Tensor:
    """log p(label) of each test image, with p the train split's class frequencies."""
    counts = torch.bincount(train_labels, minlength=NUM_CLASSES).double()
    return torch.log(counts / counts.sum())[test_labels]


def report(nll: dict[str, torch.Tensor], dim: int) -> list[tuple[str, float, float]]:
    """(name, mean bits/dim, standard error over images) for each NLL column."""
    rows = []
    for name, values in nll.items():
        bpd = bits_per_dim(values, dim)
        rows.append((name, float(bpd.mean()), float(bpd.std() / math.sqrt(bpd.numel()))))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--hidden", default="32,32,32")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # small convs: one thread is fastest on a shared CPU
    split = load_split()
    field = build_field(tuple(int(h) for h in args.hidden.split(",")))
    start = time.perf_counter()
    result = train(
        field, split["train_x"], split["train_y"], steps=args.steps, batch_size=args.batch_size
    )
    train_s = time.perf_counter() - start
    tail = result.history["loss"].tail(100).mean()
    print(
        f"trained {args.steps} steps in {train_s:.0f} s; mean CFM loss of the last 100: {tail:.2f}"
    )
    start = time.perf_counter()
    cond, nfe = conditional_nll(field, split["test_x"], split["test_y"])
    nll_s = time.perf_counter() - start
    print(f"conditional NLL of {split['test_x'].shape[0]} test images: {nll_s:.0f} s, {nfe} NFE")
    columns = {"CNF | label": cond}
    columns["CNF, bound on unconditional"] = cond - label_log_prior(
        split["train_y"], split["test_y"]
    )
    columns.update(baselines(split))
    print(f"{'model':<30} {'test bits/dim':>14} {'± s.e.':>8}")
    for name, mean, stderr in report(columns, 64):
        print(f"{name:<30} {mean:>14.4f} {stderr:>8.4f}")
    print(f"{'uniform on the cube':<30} {math.log2(DIGITS_LEVELS):>14.4f}")


if __name__ == "__main__":
    main()
