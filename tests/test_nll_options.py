"""Tests of cnftools.nll.options (DataOptions, Output, Execution) and of how dataset_nll takes them.

Each option object validates itself on construction, so a bad option fails before any data is
read; each error names the field as ``Group(field=...)``.
"""

from __future__ import annotations

import os

import pytest
import torch
from _dist_worker import make_case

from cnftools import ClosedForm, Exact, Hutchinson, SolverConfig
from cnftools.data import Dequantization
from cnftools.nll import DataOptions, Execution, Output, dataset_nll

FAST = SolverConfig("rk4", steps=4)
MISSING = "no-such-file.npy"  # data that would fail with FileNotFoundError if it were read


# ----------------------------------------------------------------------------------------------
# construction errors


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"columns": "a"}, TypeError, r"DataOptions\(columns=\.\.\.\) must be a list of column"),
        ({"columns": ["a", 1]}, TypeError, r"DataOptions\(columns=\.\.\.\)"),
        ({"columns": 3}, TypeError, r"DataOptions\(columns=\.\.\.\)"),
        ({"extras": [("y", 1)]}, TypeError, r"DataOptions\(extras=\.\.\.\) must be a dict"),
        ({"dequantization": 17}, TypeError, r"DataOptions\(dequantization=\.\.\.\) must be a"),
        ({"bpd_dims": 0}, ValueError, r"DataOptions\(bpd_dims=\.\.\.\) must be an int >= 1"),
        ({"bpd_dims": 2.5}, ValueError, r"DataOptions\(bpd_dims=\.\.\.\) must be an int >= 1"),
        (
            {"bpd_dims": 4, "dequantization": Dequantization(4)},
            ValueError,
            "DataOptions: bpd_dims is for continuous data",
        ),
    ],
    ids=[
        "columns-str",
        "columns-int",
        "columns-number",
        "extras",
        "deq",
        "bpd-0",
        "bpd-float",
        "bpd-and-deq",
    ],
)
def test_data_options_errors(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        DataOptions(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"path": 3}, TypeError, r"Output\(path=\.\.\.\) must be a path to a \.parquet file"),
        ({"path": None}, TypeError, r"Output\(path=\.\.\.\)"),
        ({"path": "r.parquet", "resume": 1}, TypeError, r"Output\(resume=\.\.\.\) must be a bool"),
        ({"path": "r.parquet", "overwrite": "yes"}, TypeError, r"Output\(overwrite=\.\.\.\)"),
        ({"path": "r.parquet", "keep_chunks": None}, TypeError, r"Output\(keep_chunks=\.\.\.\)"),
        (
            {"path": "r.parquet", "resume": True, "overwrite": True},
            ValueError,
            "contradict each other",
        ),
        ({"path": "r.parquet", "run_id": ""}, TypeError, r"Output\(run_id=\.\.\.\) must be a non"),
        ({"path": "r.parquet", "run_id": 7}, TypeError, r"Output\(run_id=\.\.\.\)"),
    ],
    ids=[
        "path-int",
        "path-none",
        "resume",
        "overwrite",
        "keep-chunks",
        "contradict",
        "run-id-empty",
        "run-id-int",
    ],
)
def test_output_errors(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        Output(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_size": 0}, ValueError, r"Execution\(batch_size=\.\.\.\) must be an int >= 1"),
        ({"batch_size": 2.0}, ValueError, r"Execution\(batch_size=\.\.\.\)"),
        ({"batch_size": True}, ValueError, r"Execution\(batch_size=\.\.\.\)"),
        ({"seed": -1}, ValueError, r"Execution\(seed=\.\.\.\) must be an int >= 0"),
        ({"max_probes": 0}, ValueError, r"Execution\(max_probes=\.\.\.\) must be an int >= 1"),
        ({"num_threads": 0}, ValueError, r"Execution\(num_threads=\.\.\.\) must be from 1 to"),
        ({"num_threads": 10**6}, ValueError, r"Execution\(num_threads=\.\.\.\) must be from 1"),
        ({"num_threads": "2"}, TypeError, r"Execution\(num_threads=\.\.\.\) must be an integer"),
        ({"dtype": torch.int64}, TypeError, r"Execution\(dtype=\.\.\.\) must be a floating"),
        ({"dtype": "float64"}, TypeError, r"Execution\(dtype=\.\.\.\) must be a floating"),
        ({"progress": 1}, TypeError, r"Execution\(progress=\.\.\.\) must be True, False or None"),
        ({"target_stderr": 0.0}, ValueError, r"Execution\(target_stderr=\.\.\.\) must be a finite"),
        ({"target_stderr": -1}, ValueError, r"Execution\(target_stderr=\.\.\.\)"),
        ({"target_stderr": float("inf")}, ValueError, r"Execution\(target_stderr=\.\.\.\)"),
        ({"target_stderr": float("nan")}, ValueError, r"Execution\(target_stderr=\.\.\.\)"),
        ({"target_stderr": True}, ValueError, r"Execution\(target_stderr=\.\.\.\)"),
        ({"target_stderr": "0.1"}, ValueError, r"Execution\(target_stderr=\.\.\.\)"),
    ],
    ids=lambda value: str(value)[:30] if isinstance(value, dict) else None,
)
def test_execution_errors(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        Execution(**kwargs)


@pytest.mark.parametrize("device", ["garbage", "meta"])
def test_execution_refuses_a_device_that_cannot_compute(device: str) -> None:
    with pytest.raises(ValueError, match="device"):
        Execution(device=device)


def test_execution_device_error_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"Execution\(device=\.\.\.\)"):
        Execution(device="garbage")


def test_execution_keeps_a_valid_device_as_a_torch_device() -> None:
    assert Execution(device="cpu").device == torch.device("cpu")


def test_defaults() -> None:
    assert Execution() == Execution(256, None, None, None, None, 0, None, 1024)
    assert DataOptions() == DataOptions(None, None, None, None)
    output = Output("r.parquet")
    assert (output.resume, output.overwrite, output.keep_chunks, output.run_id) == (
        False,
        False,
        False,
        None,
    )


# ----------------------------------------------------------------------------------------------
# Output.checked_path: three refusals, at the start of a run


def test_checked_path_accepts_a_new_file(tmp_path) -> None:
    path = tmp_path / "r.parquet"
    assert Output(path).checked_path() == path
    assert Output(os.fspath(path)).checked_path() == path  # a string works alike


def test_checked_path_refuses_a_directory(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"is a directory; give a \.parquet file name"):
        Output(tmp_path).checked_path()


def test_checked_path_refuses_a_chunks_path_that_is_a_file(tmp_path) -> None:
    (tmp_path / "r.parquet.chunks").write_text("not cnftools'")
    with pytest.raises(ValueError, match=r"r\.parquet\.chunks'?, where the chunks .* is a file"):
        Output(tmp_path / "r.parquet").checked_path()


def test_checked_path_refuses_a_lock_that_is_a_directory(tmp_path) -> None:
    (tmp_path / "r.parquet.lock").mkdir()
    with pytest.raises(ValueError, match=r"r\.parquet\.lock'?, the lock file .* is a directory"):
        Output(tmp_path / "r.parquet").checked_path()


def test_construction_does_not_touch_the_file_system(tmp_path) -> None:
    """The refusals come when the run starts (checked_path), not at construction: an Output for
    a path that is a directory can be built, and building it creates nothing."""
    Output(tmp_path / "r.parquet", resume=True, keep_chunks=True, run_id="a")
    Output(tmp_path)
    assert not list(tmp_path.iterdir())


def test_dataset_nll_checks_the_output_before_reading_data(tmp_path) -> None:
    field, _ = make_case(4)
    with pytest.raises(ValueError, match="is a directory"):
        dataset_nll(field, MISSING, config=FAST, output=Output(tmp_path))


# ----------------------------------------------------------------------------------------------
# dataset_nll: what it refuses of the groups and the estimator, before any data is read


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"estimator": Hutchinson(2, generator=torch.Generator().manual_seed(0))},
            ValueError,
            r"seeded from Execution\(seed=\.\.\.\) .* without generator= or probes=",
        ),
        (
            {"estimator": Hutchinson(probes=torch.ones(1, 4, 2, dtype=torch.float64))},
            ValueError,
            "without generator= or probes=",
        ),
        (
            {"execution": Execution(target_stderr=0.1)},
            ValueError,
            r"Execution\(target_stderr=\.\.\.\) applies to estimator=Hutchinson",
        ),
        (
            {"estimator": Exact(), "execution": Execution(target_stderr=0.1)},
            ValueError,
            r"Execution\(target_stderr=\.\.\.\) applies to estimator=Hutchinson",
        ),
        (
            {"estimator": ClosedForm(), "execution": Execution(target_stderr=0.1)},
            ValueError,
            r"Execution\(target_stderr=\.\.\.\) applies to estimator=Hutchinson",
        ),
        (
            {"estimator": Hutchinson(1), "execution": Execution(target_stderr=0.1)},
            ValueError,
            r"Execution\(target_stderr=\.\.\.\) needs Hutchinson\(n_probes >= 2\)",
        ),
        (
            {"estimator": Hutchinson(8), "execution": Execution(target_stderr=0.1, max_probes=4)},
            ValueError,
            r"Execution\(max_probes=4\) must be >= Hutchinson\(n_probes=8\)",
        ),
        (
            {"execution": {"batch_size": 4}},
            TypeError,
            r"execution must be a cnftools\.nll\.Execution\(\.\.\.\) or None, got dict",
        ),
        (
            {"data_options": {"columns": ["a"]}},
            TypeError,
            r"data_options must be a cnftools\.nll\.DataOptions\(\.\.\.\) or None, got dict",
        ),
        (
            {"output": {"path": "r.parquet"}},
            TypeError,
            r"output must be a cnftools\.nll\.Output\(\.\.\.\) or None, got dict",
        ),
        ({"output": "r.parquet"}, TypeError, r"output must be a cnftools\.nll\.Output"),
        ({"estimator": "hutchinson"}, TypeError, r"write estimator=cnftools\.Hutchinson\(\)"),
    ],
    ids=[
        "generator",
        "probes",
        "target-default",
        "target-exact",
        "target-closed",
        "target-1",
        "max-probes",
        "execution-dict",
        "data-options-dict",
        "output-dict",
        "output-str",
        "estimator-str",
    ],
)
def test_dataset_nll_refuses_before_reading_data(kwargs: dict, error: type, match: str) -> None:
    """The data is a file that does not exist: had it been read, the error would be a
    FileNotFoundError."""
    field, _ = make_case(4)
    with pytest.raises(error, match=match):
        dataset_nll(field, MISSING, config=FAST, **kwargs)


@pytest.mark.parametrize(
    "gone",
    [
        {"batch_size": 4},
        {"out": "r.parquet"},
        {"resume": True},
        {"divergence": "hutchinson"},
        {"n_probes": 2},
        {"solver_options": {"noise": "gaussian"}},
        {"steps": 4},
        {"step_size": 0.25},
        {"progress": False},
    ],
    ids=lambda kw: next(iter(kw)),
)
def test_dataset_nll_refuses_the_0_1_keywords(gone: dict) -> None:
    field, x = make_case(4)
    with pytest.raises(TypeError, match=next(iter(gone))):
        dataset_nll(field, x, **gone)


def test_the_groups_reach_the_run() -> None:
    """A positive control for the refusals above: the same groups, well formed, run, and the
    frame records them."""
    field, x = make_case(6)
    frame = dataset_nll(
        field,
        x,
        estimator=Hutchinson(2, "gaussian"),
        config=FAST,
        data_options=DataOptions(bpd_dims=2),
        execution=Execution(batch_size=3, seed=5, target_stderr=10.0, max_probes=4, progress=False),
    )
    run = frame.attrs["run"]
    assert (run["batch_size"], run["seed"], run["divergence"], run["n_probes"]) == (
        3,
        5,
        "hutchinson",
        2,
    )
    assert run["target_stderr"] == 10.0 and run["solver"]["steps"] == 4
    assert "bpd" in frame.columns and len(frame) == 6
