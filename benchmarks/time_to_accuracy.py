"""Time to accuracy: how long each library takes to give log p_1(x) right to 1e-4, 1e-6, 1e-8 nats.

The field is the closed-form OT marginal field of a Gaussian q = N(m, S) (sigma_min = 0.1, random
SPD S with eigenvalues in [0.2, 2]): along x_t = t x_1 + (1 - 0.9 t) eps, p_t = N(t m, t^2 S +
s_t^2 I) and

    v(x, t) = m + U diag((t l + s_t s_t') / (t^2 l + s_t^2)) U^T (x - t m),   S = U diag(l) U^T,

so log p_1 = log N(x; m, S + 0.01 I) is known exactly. Every library gets the same opaque
``nn.Module`` (no closed-form divergence hook, so everyone pays for the autograd divergence) and
its own adaptive dopri5, with tolerances rtol = atol = tol swept 1e-3 ... 1e-11:

- flow_matching 1.0.10: ``ODESolver.compute_likelihood(exact_divergence=True)``;
- zuko: ``FreeFormJacobianTransform(exact=True).inv.call_and_ladj`` (its own Dormand-Prince);
- torchdyn 1.0.6: ``NeuralODE`` on the augmented state [x, log-det] with ``autograd_trace``;
- torchode 1.0.1: per-row dopri5 with its PID controller, the exact divergence in batched chunks
  of 16 VJPs (``torchode_runner``);
- cnftools: ``log_likelihood`` (default dopri5), the same with ``method="dopri8"``, and the
  accuracy knob ``log_likelihood(v, x, accuracy=target)`` (its self-check's cost included).

For each d in {2, 16, 64} (B = 256, float64) the table gives, per library, the fastest time at
which the max error over the batch is <= 1e-4, 1e-6, 1e-8, and the ratio best peer / cnftools.
Each (library, tolerance) runs ``--rounds`` times, interleaved with the others (a load spike hits
all alike), and the minimum counts. Peers missing from the environment are skipped
(``pip install "cnftools[bench]"``).

Run: ``python benchmarks/time_to_accuracy.py`` (``--quick`` for a smoke run; ``--threads N``;
``--device cuda``; ``--per-decade 4`` sweeps four tolerances per factor 10, so that where a
library's error curve crosses a target matters less). Memory: ``--memory`` prints peak memory of the default, no_grad,
direct-gradient and adjoint calls (B = 512, d = 64, 20 midpoint steps, a 3x128 SiLU MLP).
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

import cnftools

try:
    from flow_matching.solver import ODESolver
except ImportError:  # pragma: no cover - optional peer
    ODESolver = None
try:
    import zuko
except ImportError:  # pragma: no cover - optional peer
    zuko = None
try:
    import torchode
except ImportError:  # pragma: no cover - optional peer
    torchode = None
try:
    from torchdyn.core import NeuralODE
    from torchdyn.models.cnf import autograd_trace
except ImportError:  # pragma: no cover - optional peer
    NeuralODE = None

F64 = torch.float64
SIGMA_MIN = 0.1
MEMORY_LIMIT_GIB = 8
TARGETS = (1e-4, 1e-6, 1e-8)


class GaussianOTField(nn.Module):
    """The OT marginal field of N(m, S) as an opaque module: ``forward(x, t)``, t scalar or (B,)."""

    def __init__(self, m: Tensor, S: Tensor) -> None:
        super().__init__()
        lam, U = torch.linalg.eigh(S)
        self.register_buffer("m", m)
        self.register_buffer("U", U)
        self.register_buffer("lam", lam)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = t.reshape(-1, 1) if t.dim() > 0 else t
        s = 1 - (1 - SIGMA_MIN) * t
        ds = -(1 - SIGMA_MIN)
        rate = (t * self.lam + s * ds) / (t * t * self.lam + s * s)
        centred = (x - t * self.m) @ self.U
        return self.m + (rate * centred) @ self.U.T


def gaussian_case(d: int, batch: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    lam = 0.2 + 1.8 * torch.rand(d, generator=g, dtype=F64)
    S = Q @ torch.diag(lam) @ Q.T
    S = (S + S.T) / 2
    m = torch.randn(d, generator=g, dtype=F64)
    cov1 = S + SIGMA_MIN**2 * torch.eye(d, dtype=F64)
    target = torch.distributions.MultivariateNormal(m, cov1)
    x = target.sample((batch,)) if seed is None else _draw(target, batch, g)
    exact = target.log_prob(x)
    field = GaussianOTField(m, S).to(device)
    return field, x.to(device), exact.to(device)


def _draw(dist: torch.distributions.MultivariateNormal, n: int, g: torch.Generator) -> Tensor:
    eps = torch.randn(n, dist.loc.shape[0], generator=g, dtype=F64)
    return dist.loc + eps @ dist.scale_tril.T


def std_normal_log_prob(z: Tensor) -> Tensor:
    return -0.5 * z.pow(2).sum(dim=1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------------
# One call per library: f(tol) -> log p_1(x), (B,)


EVALUATIONS: dict[tuple[str, float], tuple[int, int]] = {}
"""cnftools' evaluations per (setting, tolerance or target): ``(forward, estimate)`` of
``result.nfe`` (``accuracy=``: the first solve counts as ``estimate``, the check and the rounds
as ``forward``)."""


def _counted(name: str, arg: float, result: cnftools.LikelihoodResult) -> Tensor:
    EVALUATIONS[(name, arg)] = (result.nfe.forward, result.nfe.estimate)
    return result.log_prob


def runners(field: nn.Module, x: Tensor) -> dict[str, Callable[[float], Tensor]]:
    out: dict[str, Callable[[float], Tensor]] = {}

    def cnf(tol: float) -> Tensor:
        result = cnftools.log_likelihood(field, x, rtol=tol, atol=tol)
        return _counted("cnftools dopri5", tol, result)

    def cnf8(tol: float) -> Tensor:
        result = cnftools.log_likelihood(field, x, method="dopri8", rtol=tol, atol=tol)
        return _counted("cnftools dopri8", tol, result)

    out["cnftools dopri5"] = cnf
    out["cnftools dopri8"] = cnf8
    if ODESolver is not None:
        solver = ODESolver(velocity_model=field)
        grid = torch.tensor([1.0, 0.0], dtype=F64, device=x.device)

        def fm(tol: float) -> Tensor:
            _, lp = solver.compute_likelihood(
                x_1=x,
                log_p0=std_normal_log_prob,
                step_size=None,
                method="dopri5",
                atol=tol,
                rtol=tol,
                time_grid=grid,
                exact_divergence=True,
            )
            return lp

        out["flow_matching"] = fm
    if zuko is not None:

        def zk(tol: float) -> Tensor:
            transform = zuko.transforms.FreeFormJacobianTransform(
                f=lambda t, z: field(z, t), t0=0.0, t1=1.0, atol=tol, rtol=tol, exact=True
            )
            z0, ladj = transform.inv.call_and_ladj(x)
            return std_normal_log_prob(z0) + ladj

        out["zuko"] = zk
    if NeuralODE is not None:

        class Augmented(nn.Module):
            def forward(self, t: Tensor, y: Tensor, args: object = None) -> Tensor:
                with torch.enable_grad():
                    z = y[:, 1:].requires_grad_(True)
                    dz = field(z, t)
                    trace = autograd_trace(dz, z)
                return torch.cat([trace[:, None], dz], dim=1)

        span = torch.tensor([1.0, 0.0], dtype=F64, device=x.device)

        def td(tol: float) -> Tensor:
            ode = NeuralODE(Augmented(), solver="dopri5", atol=tol, rtol=tol, return_t_eval=False)
            y0 = torch.cat([x.new_zeros(x.shape[0], 1), x], dim=1)
            y1 = ode(y0, span)[-1]
            # the first column integrates div from t = 1 down to 0: -∫_0^1 div
            return std_normal_log_prob(y1[:, 1:]) + y1[:, 0]

        out["torchdyn"] = td
    if torchode is not None:
        out["torchode"] = torchode_runner(field, x)
    return out


def chunked_trace(dz: Tensor, z: Tensor, chunk: int = 16) -> Tensor:
    """tr(dz/dz) by batched VJPs, ``chunk`` basis vectors per backward pass (the peer's own)."""
    batch, dim = dz.shape
    total = dz.new_zeros(batch)
    eye = torch.eye(dim, dtype=dz.dtype, device=dz.device)
    for start in range(0, dim, chunk):
        basis = eye[start : start + chunk]
        cotangents = basis[:, None, :].expand(basis.shape[0], batch, dim)
        (g,) = torch.autograd.grad(dz, z, cotangents, retain_graph=True, is_grads_batched=True)
        total = total + torch.einsum("kbk->b", g[:, :, start : start + chunk])
    return total


def torchode_runner(field: nn.Module, x: Tensor) -> Callable[[float], Tensor]:
    """torchode 1.0.1: per-sample dopri5 with its PID controller (solve_ivp's default gains 0.2,
    0.5, 0), from t = 1 down to 0, the exact divergence in batched chunks of 16 VJPs."""

    def dynamics(t: Tensor, y: Tensor) -> Tensor:
        with torch.enable_grad():
            z = y[:, 1:].detach().requires_grad_(True)
            dz = field(z, t)
            trace = chunked_trace(dz, z)
        return torch.cat([trace[:, None], dz.detach()], dim=1)

    term = torchode.ODETerm(dynamics)
    t_eval = torch.tensor([1.0, 0.0], dtype=x.dtype, device=x.device).expand(x.shape[0], 2)

    def run(tol: float) -> Tensor:
        controller = torchode.PIDController(
            atol=tol, rtol=tol, pcoeff=0.2, icoeff=0.5, dcoeff=0.0, term=term
        )
        solver = torchode.AutoDiffAdjoint(torchode.Dopri5(term=term), controller)
        y0 = torch.cat([x.new_zeros(x.shape[0], 1), x], dim=1)
        y1 = solver.solve(torchode.InitialValueProblem(y0=y0, t_eval=t_eval)).ys[:, -1]
        return std_normal_log_prob(y1[:, 1:]) + y1[:, 0]

    return run


def accuracy_runner(field: nn.Module, x: Tensor) -> Callable[[float], Tensor]:
    def run(target: float) -> Tensor:
        result = cnftools.log_likelihood(field, x, accuracy=target)
        return _counted("cnftools accuracy=", target, result)

    return run


def timed(fn: Callable[[float], Tensor], arg: float) -> tuple[float, Tensor]:
    start = time.perf_counter()
    with torch.no_grad():
        out = fn(arg)
    if out.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def sweep(d: int, batch: int, tols: list[float], rounds: int, device: torch.device) -> dict:
    field, x, exact = gaussian_case(d, batch, device)
    libs = runners(field, x)
    knob = accuracy_runner(field, x)
    best: dict[tuple[str, float], float] = {}
    errors: dict[tuple[str, float], float] = {}
    for _ in range(rounds):
        for tol in tols:
            for name, fn in libs.items():
                key = (name, tol)
                if errors.get(key, 0.0) > 1 or best.get(key, 0.0) > 60:
                    continue  # failed or too slow: not worth repeating
                try:
                    seconds, lp = timed(fn, tol)
                except Exception as error:  # a peer failing at a tolerance is a result too
                    print(f"  {name} tol={tol:g}: {type(error).__name__}: {str(error)[:80]}")
                    errors[key] = math.inf
                    best[key] = math.inf
                    continue
                errors[key] = float((lp - exact).abs().max())
                best[key] = min(best.get(key, math.inf), seconds)
        for target in TARGETS:
            key = ("cnftools accuracy=", target)
            seconds, lp = timed(knob, target)
            errors[key] = float((lp - exact).abs().max())
            best[key] = min(best.get(key, math.inf), seconds)
    table: dict[str, dict[float, float]] = {}
    for (name, arg), seconds in best.items():
        row = table.setdefault(name, {})
        for target in TARGETS:
            if name == "cnftools accuracy=":
                ok = arg == target and errors[(name, arg)] <= target
            else:
                ok = errors[(name, arg)] <= target
            if ok:
                row[target] = min(row.get(target, math.inf), seconds)
    return {"table": table, "errors": errors, "best": best}


def report(d: int, batch: int, result: dict) -> None:
    table = result["table"]
    print(f"\nd = {d}, B = {batch}: fastest seconds to max error <= target (- : never reached)")
    print(f"{'library':22s}" + "".join(f"{f'<= {t:g}':>12s}" for t in TARGETS))
    for name, row in sorted(table.items()):
        cells = "".join(f"{row.get(t, math.inf):12.4f}" for t in TARGETS)
        print(f"{name:22s}{cells.replace('inf', '  -')}")
    peers = [n for n in table if not n.startswith("cnftools")]
    ours = [n for n in table if n.startswith("cnftools") and "accuracy" not in n]
    line = "ratio best peer / cnftools (best tolerance-swept setting)"
    print(f"{line}:" + "".join(f"  {_ratio(table, peers, ours, t)}" for t in TARGETS))
    knob = ["cnftools accuracy="]
    line = "ratio best peer / cnftools accuracy= (self-check included)"
    print(f"{line}:" + "".join(f"  {_ratio(table, peers, knob, t)}" for t in TARGETS))
    print("cnftools evaluations (forward + estimate) at the fastest setting per target:")
    for name in ("cnftools dopri5", "cnftools dopri8", "cnftools accuracy="):
        cells = []
        for target in TARGETS:
            reached = [
                (seconds, arg)
                for (n, arg), seconds in result["best"].items()
                if n == name
                and result["errors"][(n, arg)] <= target
                and (arg == target or "accuracy" not in n)
            ]
            if reached:
                arg = min(reached)[1]
                forward, estimate = EVALUATIONS.get((name, arg), (0, 0))
                error = result["errors"][(name, arg)]
                cells.append(f"{target:g}: {forward}+{estimate} (at {arg:.3g}, error {error:.1e})")
        print(f"  {name:22s} " + "; ".join(cells))
    print("max error per tolerance:")
    for name in sorted({n for n, _ in result["errors"]}):
        cells = [
            f"{arg:g}:{err:.1e}"
            for (n, arg), err in sorted(result["errors"].items(), key=lambda kv: -kv[0][1])
            if n == name
        ]
        print(f"  {name:22s} " + " ".join(cells))


def _ratio(table: dict, peers: list[str], ours: list[str], target: float) -> str:
    peer = min((table[n].get(target, math.inf) for n in peers), default=math.inf)
    mine = min((table[n].get(target, math.inf) for n in ours), default=math.inf)
    if math.isinf(mine) or math.isinf(peer):
        return f"{target:g}: n/a"
    return f"{target:g}: {peer / mine:.2f}x"


# ---------------------------------------------------------------------------------------------
# Memory of the default call (issue: a trainable module outside no_grad)


def memory_report(device: torch.device) -> None:
    import resource
    import subprocess
    import sys

    print("\npeak memory, B = 512, d = 64, 20 midpoint steps, 3x128 SiLU MLP (fresh process each)")
    for mode in ("default", "no_grad", "direct-gradient", "adjoint"):
        code = _MEMORY_CHILD.format(mode=mode, device=device.type, limit=MEMORY_LIMIT_GIB)
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=False
        )
        text = out.stdout.strip() or out.stderr.strip()[-120:]
        if "memory" in text.lower() and not out.stdout.strip():
            text = f"over the {MEMORY_LIMIT_GIB} GiB address-space cap ({text.splitlines()[-1]})"
        print(f"  {mode:16s} {text}")
    del resource


_MEMORY_CHILD = """
import resource, time, torch, cnftools
# a shared machine: cap the address space so the direct-gradient graph fails instead of swapping
cap = {limit} * 2**30
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
torch.manual_seed(0)
dev = torch.device("{device}")
v = cnftools.MLPField(64, (128, 128, 128), dtype=torch.float64).to(dev)
x = torch.randn(512, 64, dtype=torch.float64, device=dev)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
start = time.perf_counter()
midpoint = cnftools.SolverConfig("midpoint", steps=20)
if "{mode}" == "default":
    lp = cnftools.log_likelihood(v, x, config=midpoint).log_prob
elif "{mode}" == "no_grad":
    with torch.no_grad():
        lp = cnftools.log_likelihood(v, x, config=midpoint).log_prob
elif "{mode}" == "direct-gradient":
    cnftools.log_likelihood(v, x, config=midpoint, grad=True).log_prob.mean().backward()
else:
    adjoint = midpoint.replace(adjoint=True)
    cnftools.log_likelihood(v, x, config=adjoint).log_prob.mean().backward()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
gpu = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else float("nan")
print(f"peak RSS +{{(peak - base) / 1024:8.1f}} MiB  (cuda peak {{gpu:.1f}} MiB)  {{seconds:6.2f}} s")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="d in {2, 16}, fewer tolerances")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dims", type=int, nargs="*", default=None, help="none: no sweep")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--memory", action="store_true", help="also the peak-memory rows")
    parser.add_argument(
        "--per-decade",
        type=int,
        default=1,
        help="tolerances per factor 10 (1: 1e-3, 1e-4, ...; 4: also 10^-3.25, 10^-3.5, ...)",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dims = args.dims if args.dims is not None else ([2, 16] if args.quick else [2, 16, 64])
    if args.quick:
        tols = [10.0**-k for k in range(3, 12, 2)]
    else:  # 1e-3 ... 1e-11, --per-decade values per factor 10 (1: the sweep)
        steps = args.per_decade
        tols = [10.0 ** -(3 + j / steps) for j in range(8 * steps + 1)]
    rounds = 1 if args.quick else args.rounds
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, device {device}; peers: "
        f"flow_matching={'yes' if ODESolver else 'no'}, zuko={'yes' if zuko else 'no'}, "
        f"torchdyn={'yes' if NeuralODE else 'no'}, torchode={'yes' if torchode else 'no'}"
    )
    for d in dims:
        report(d, args.batch, sweep(d, args.batch, tols, rounds, device))
    if args.memory:
        memory_report(device)


if __name__ == "__main__":
    main()
