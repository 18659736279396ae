"""A number must not depend on what the user did not choose (the engine issue, items 2 and 3).

- **Rows on their own steps:** a row's log-likelihood is the same alone, in a batch of 7 and in a
  batch of 256, and ``dataset_nll`` does not depend on ``batch_size``. The tolerance is 1e-12
  relative (float64): the steps of a row are its own, so only the field's arithmetic on batches of
  other sizes may differ (matrix products of other shapes round differently, ~1e-16 per
  operation, carried through ~100 evaluations).
- **The same bits every time:** the same call returns identical tensors, call after call (the
  divergence strategy chosen by a rule of sizes, never by timing), process after process, with ``adjoint=`` on or
  off, for an ``MLPField``, a field loaded from a checkpoint and a diffusers UNet.
- **The adjoint is a replay of the same steps:** gradients equal direct backpropagation to
  rounding, and no solve calls torchdiffeq.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import cnftools
from cnftools import SolverConfig
from cnftools.nll import Execution, dataset_nll

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]
REL = 1e-12


def _mlp(dim: int = 2, seed: int = 0) -> cnftools.MLPField:
    torch.manual_seed(seed)
    return cnftools.MLPField(dim, hidden=[32, 32]).double()


def _data(n: int, dim: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _log_prob(field, x: torch.Tensor, **options: object) -> torch.Tensor:
    """``log_likelihood(...).log_prob``: the number these tests compare."""
    return cnftools.log_likelihood(field, x, **options).log_prob


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp(min=1e-300)).max())


# ----------------------------------------------------------------------------------------------
# Rows on their own steps


@pytest.fixture(scope="module")
def batch_of_256() -> tuple[cnftools.MLPField, torch.Tensor, torch.Tensor]:
    field, x = _mlp(), _data(256)
    return field, x, _log_prob(field, x, rtol=1e-8, atol=1e-8)


def test_a_row_is_the_same_in_a_batch_of_7_and_of_256(batch_of_256) -> None:
    field, x, full = batch_of_256
    sevens = torch.cat(
        [_log_prob(field, x[i : i + 7], rtol=1e-8, atol=1e-8) for i in range(0, 63, 7)]
    )
    assert _relative(sevens, full[:63]) <= REL


@pytest.mark.parametrize("row", [0, 5, 200])
def test_a_row_is_the_same_alone_and_in_a_batch(batch_of_256, row: int) -> None:
    field, x, full = batch_of_256
    alone = _log_prob(field, x[row : row + 1], rtol=1e-8, atol=1e-8)
    assert _relative(alone, full[row : row + 1]) <= REL


def test_a_row_does_not_depend_on_a_stiff_neighbour() -> None:
    """A row far out (where the field changes fast) in the batch changes nothing for the others:
    they keep their own steps (with a shared step size they would all be solved more finely)."""
    field, x = _mlp(), _data(8)
    calm = _log_prob(field, x, rtol=1e-7, atol=1e-7)
    stirred = x.clone()
    stirred[0] = 40.0
    with_outlier = _log_prob(field, stirred, rtol=1e-7, atol=1e-7)
    assert _relative(with_outlier[1:], calm[1:]) <= REL


def test_dataset_nll_does_not_depend_on_batch_size() -> None:
    field, x = _mlp(), _data(30)
    settings = {"rtol": 1e-8, "atol": 1e-8}
    small = dataset_nll(field, x, execution=Execution(batch_size=4, progress=False), **settings)
    large = dataset_nll(field, x, execution=Execution(batch_size=30, progress=False), **settings)
    assert (
        _relative(
            torch.tensor(small["log_prob"].to_numpy()), torch.tensor(large["log_prob"].to_numpy())
        )
        <= REL
    )


# ----------------------------------------------------------------------------------------------
# The same bits every time


def test_the_same_call_gives_the_same_bits_call_after_call() -> None:
    field, x = _mlp(dim=16), _data(64, dim=16)
    first = _log_prob(field, x, rtol=1e-8, atol=1e-8)
    second = _log_prob(field, x, rtol=1e-8, atol=1e-8)
    assert torch.equal(first, second)


def test_the_divergence_strategy_is_not_chosen_by_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control for the rule: a clock that makes every timing different changes nothing."""
    import time

    field, x = _mlp(dim=8), _data(32, dim=8)
    before = _log_prob(field, x, rtol=1e-7, atol=1e-7)
    ticks = iter(range(10**9))
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(ticks)) ** 1.5)
    monkeypatch.setattr(time, "monotonic", lambda: float(next(ticks)) ** 1.5)
    assert torch.equal(_log_prob(field, x, rtol=1e-7, atol=1e-7), before)


def test_adjoint_does_not_change_the_numbers() -> None:
    """The replay's forward solve is the graph-free solve, bit for bit; direct backpropagation
    takes the same steps but builds the divergence with ``create_graph=True``, whose arithmetic
    may differ in the last bits (1e-12 relative)."""
    field, x = _mlp(), _data(16)
    tight = SolverConfig(rtol=1e-8, atol=1e-8)
    free = _log_prob(field, x, config=tight)
    replayed = _log_prob(field, x, config=tight.replace(adjoint=True), grad=True)
    direct = _log_prob(field, x, config=tight, grad=True)
    assert torch.equal(free, replayed.detach())
    assert _relative(direct.detach(), free) <= REL


def test_a_checkpoint_loaded_field_gives_the_same_bits(tmp_path: Path) -> None:
    field, x = _mlp(dim=4), _data(32, dim=4)
    cnftools.save_checkpoint(tmp_path / "model.pt", field)
    loaded = cnftools.load_checkpoint(tmp_path / "model.pt").field
    original = _log_prob(field, x, rtol=1e-8, atol=1e-8)
    first = _log_prob(loaded, x, rtol=1e-8, atol=1e-8)
    again = _log_prob(loaded, x, rtol=1e-8, atol=1e-8)
    assert torch.equal(first, again) and torch.equal(first, original)


def test_a_diffusers_unet_gives_the_same_bits() -> None:
    diffusers = pytest.importorskip("diffusers")
    from test_interop import _tiny_unet  # the one tiny random UNet of the tests

    unet = _tiny_unet()
    field, _ = cnftools.interop.from_diffusers(unet, diffusers.DDPMScheduler())
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    first = _log_prob(field, x, config=SolverConfig("rk4", steps=2))
    second = _log_prob(field, x, config=SolverConfig("rk4", steps=2))
    assert torch.equal(first, second)


_PROCESS_SCRIPT = """
import torch, cnftools
torch.set_num_threads(1)
torch.manual_seed(0)
field = cnftools.MLPField(8, hidden=[32, 32]).double()
x = torch.randn(48, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
log_prob = cnftools.log_likelihood(field, x, rtol=1e-8, atol=1e-8).log_prob
print(" ".join(v.hex() for v in log_prob.tolist()))
"""


def test_the_same_call_gives_the_same_bits_process_after_process() -> None:
    outputs = [
        subprocess.run(
            [sys.executable, "-c", textwrap.dedent(_PROCESS_SCRIPT)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        for _ in range(2)
    ]
    assert outputs[0] and outputs[0] == outputs[1]


# ----------------------------------------------------------------------------------------------
# One loop for every solve; the adjoint replays it


@pytest.mark.parametrize(
    "solver", [SolverConfig(rtol=1e-9, atol=1e-9), SolverConfig("rk4", steps=20)], ids=str
)
def test_adjoint_gradients_equal_direct_backpropagation(solver: SolverConfig) -> None:
    """The replay differentiates the very steps of the forward solve: the gradients agree with
    direct backpropagation to rounding (1e-10 relative: the replay evaluates the field on the
    accepted rows only, whose products round differently, ~1e-16 per operation)."""
    field, x = _mlp(), _data(12)
    grads = []
    for adjoint in (False, True):
        field.zero_grad()
        x_in = x.clone().requires_grad_(True)
        config = solver.replace(adjoint=adjoint)
        loss = _log_prob(field, x_in, config=config, grad=True).sum()
        loss.backward()
        grads.append([x_in.grad.clone(), *(p.grad.clone() for p in field.parameters())])
    for direct, replayed in zip(*grads, strict=True):
        assert torch.allclose(replayed, direct, rtol=1e-10, atol=1e-12)


def test_no_solve_calls_torchdiffeq(monkeypatch: pytest.MonkeyPatch) -> None:
    torchdiffeq = pytest.importorskip("torchdiffeq")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cnftools solve called torchdiffeq")

    monkeypatch.setattr(torchdiffeq, "odeint", refuse)
    monkeypatch.setattr(torchdiffeq, "odeint_adjoint", refuse)
    field, x = _mlp(), _data(6)
    for solver in (SolverConfig(), SolverConfig("rk4", steps=4)):
        for adjoint in (False, True):
            config = solver.replace(adjoint=adjoint)
            out = _log_prob(field, x, config=config, grad=adjoint)
            if adjoint:
                out.sum().backward()
    result = cnftools.log_likelihood(field, x, config=SolverConfig(adjoint=True), grad=True)
    result.log_prob.sum().backward()
    assert result.nfe.backward > 0  # the backward pass ran on the replay


def test_no_module_imports_torchdiffeq_or_private_names() -> None:
    offenders = []
    for file in sorted((ROOT / "cnftools").rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                private = any(part.startswith("_") for part in name.split(".")[1:])
                if top == "torchdiffeq" or (top != "cnftools" and private):
                    offenders.append(f"{file.relative_to(ROOT)}: {name}")
    assert not offenders, offenders


def test_a_shared_table_of_b_rows_is_named_in_the_mixing_warning() -> None:
    """A lookup table passed in ``extras=`` that happens to have B rows is split with the rows
    (the documented rule), so the field's rows look mixed. Today's main warned only of BatchNorm
    or attention; the warning names the extra. The result is still the whole table's."""
    table = torch.rand(5, 2, dtype=F64) + 0.5
    x = _data(5)

    def field(x: torch.Tensor, t: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return -x * table.mean()

    with pytest.warns(RuntimeWarning, match=r"extras \['table'\] .*not per row"):
        got = _log_prob(field, x, extras={"table": table})
    expected = _log_prob(lambda x, t: -x * table.mean(), x)
    assert torch.equal(got, expected)


def test_a_field_that_mixes_rows_is_solved_whole_and_named() -> None:
    """A field whose rows change with their neighbours (BatchNorm in training mode) cannot have
    finished rows leave its batch: the solve keeps every row and warns that the result depends on
    the batch. Negative control: the same module in eval mode solves without a warning."""
    torch.manual_seed(0)

    class Normalised(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = torch.nn.BatchNorm1d(2).double()

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return -0.5 * self.norm(x) * (1 + t[:, None])

    field, x = Normalised(), _data(8)
    with pytest.warns(RuntimeWarning, match="rows are not independent"):
        mixed = _log_prob(field, x, rtol=1e-6, atol=1e-6)
    assert bool(torch.isfinite(mixed).all())
    field.eval()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        cnftools.log_likelihood(field, x, rtol=1e-6, atol=1e-6)
