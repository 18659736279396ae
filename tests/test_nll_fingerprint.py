"""Content fingerprints (cnftools/nll/fingerprint.py): everything a call of the field can read.

The property test builds random object graphs (modules, plain and slotted objects, dataclasses,
partials, closures, paths, containers, shared references and cycles, NumPy and torch values),
changes one leaf reachable from the root, and requires the fingerprint to change (or the walk to
refuse: never the same fingerprint for other content). Rebuilt from the same recipe, a graph has
the same fingerprint (content, not identity).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from _dist_worker import make_case, make_mixture
from hypothesis import given
from hypothesis import strategies as st

import cnftools
from cnftools.nll import Unfingerprintable, fingerprint


def test_fingerprint_sees_weights_buffers_and_marginal_tensors():
    torch.manual_seed(0)
    a = torch.nn.Linear(2, 2)
    b = torch.nn.Linear(2, 2)
    assert fingerprint(a) != fingerprint(b)
    c = torch.nn.Linear(2, 2)
    c.load_state_dict(a.state_dict())
    assert fingerprint(a) == fingerprint(c)
    bn = torch.nn.BatchNorm1d(2)
    before = fingerprint(bn)
    bn.running_mean += 1  # a buffer
    assert fingerprint(bn) != before
    m1, _ = make_case()
    m2 = cnftools.GaussianMarginal(m1.path, m1.mean + 1e-12, m1.cov)
    assert fingerprint(m1) != fingerprint(m2)  # one ulp-level change of a tensor attribute
    assert fingerprint(m1.velocity) != fingerprint(m2.velocity)  # a bound method: its __self__
    assert fingerprint(m1.velocity) != fingerprint(m1.score)


def test_functions_are_fingerprinted_by_code_closure_defaults_and_globals():
    """Today's main refuses every function (so a module *holding* one was not even looked at)."""
    assert fingerprint(lambda x, t: -x) == fingerprint(lambda x, t: -x)  # the same code
    assert fingerprint(lambda x, t: -x) != fingerprint(lambda x, t: -3 * x)

    def scaled(scale):
        return lambda x, t: -scale * x

    assert fingerprint(scaled(1.0)) == fingerprint(scaled(1.0))
    assert fingerprint(scaled(1.0)) != fingerprint(scaled(2.0))  # a closure cell

    def with_default(x, t, scale=1.0):
        return -scale * x

    before = fingerprint(with_default)
    with_default.__defaults__ = (2.0,)
    assert fingerprint(with_default) != before  # a default
    path = cnftools.AffineGaussianPath(lambda t: t, lambda t: 1 - 0.9 * t)
    other = cnftools.AffineGaussianPath(lambda t: t, lambda t: 1 - 0.8 * t)
    assert fingerprint(path) != fingerprint(other)  # a path built from lambdas


_GLOBAL_SCALE = [1.0]


def _reads_a_global(x, t):
    return -_GLOBAL_SCALE[0] * x


def test_a_global_that_a_function_reads_is_part_of_its_fingerprint():
    before = fingerprint(_reads_a_global)
    _GLOBAL_SCALE[0] = 2.0
    try:
        assert fingerprint(_reads_a_global) != before
    finally:
        _GLOBAL_SCALE[0] = 1.0
    assert fingerprint(_reads_a_global) == before


def test_what_cannot_be_read_is_refused_and_named():
    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rows = (i for i in range(3))  # a generator: its state cannot be read

        def forward(self, x, t):
            return -x

    with pytest.raises(Unfingerprintable, match=r"v\.rows is a builtins\.generator"):
        fingerprint(Holder())
    with pytest.raises(Unfingerprintable, match=r"prior\[0\]"):
        fingerprint([(i for i in range(2))], name="prior")
    deep: list = []
    for _ in range(500):
        deep = [deep]
    with pytest.raises(Unfingerprintable, match="deeper"):
        fingerprint(deep)


def test_memoised_values_do_not_change_a_fingerprint():
    field, x = make_mixture(4)
    before = fingerprint(field)
    field(x, torch.full((4,), 0.5, dtype=torch.float64))  # fills the marginal's cache
    assert fingerprint(field) == before


def test_a_prior_is_fingerprinted_by_its_parameters():
    normal = torch.distributions.MultivariateNormal
    a = normal(torch.zeros(2), torch.eye(2))
    assert fingerprint(a) == fingerprint(normal(torch.zeros(2), torch.eye(2)))
    assert fingerprint(a) != fingerprint(normal(torch.zeros(2), 2 * torch.eye(2)))
    before = fingerprint(a)
    assert a.precision_matrix is not None  # lazily computed, stored on first use
    assert fingerprint(a) == before
    categorical = torch.distributions.Categorical
    p = torch.tensor([0.25, 0.75])
    assert fingerprint(categorical(probs=p)) != fingerprint(categorical(logits=p))


@pytest.mark.parametrize(
    "change",
    [
        "path-sigma",
        "tensor-attribute",
        "private-float",
        "list",
        "lambda",
        "partial",
        "as-velocity-path",
        "as-velocity-time",
        "numpy-extra",
        "dataclass",
        "slots",
        "forward-hook",
    ],
)
def test_each_reported_blind_spot_is_seen(change):
    """The issue's list: each of these fingerprinted alike on today's main."""

    @dataclasses.dataclass
    class Config:
        scale: float

    class Slotted:
        __slots__ = ("scale",)

        def __init__(self, scale):
            self.scale = scale

    class Field(torch.nn.Module):
        def __init__(self, **kw):
            super().__init__()
            self.path = kw.get("path", cnftools.OTPath(0.1))
            self.frequencies = kw.get("tensor", torch.ones(3))  # not a buffer
            self._scale = kw.get("private", 1.0)
            self.widths = kw.get("widths", [1, 2])
            self.time = kw.get("time", lambda t: t)
            self.config = kw.get("config", Config(1.0))
            self.slotted = kw.get("slotted", Slotted(1.0))

        def forward(self, x, t):
            return -x

    def velocity(x, t, scale):
        return -scale * x

    def model(x, tau):
        return -x

    big = np.zeros(2000)
    big_changed = big.copy()
    big_changed[1000] = 1e-300  # beyond what a truncated repr shows
    hooked = Field()
    hooked.register_forward_hook(lambda module, args, out: 2 * out)
    pairs: dict[str, tuple[Any, Any]] = {
        "path-sigma": (Field(path=cnftools.OTPath(0.1)), Field(path=cnftools.OTPath(0.5))),
        "tensor-attribute": (Field(), Field(tensor=torch.tensor([1.0, 1.0, 1.0 + 2**-23]))),
        "private-float": (Field(private=1.0), Field(private=1.5)),
        "list": (Field(widths=[1, 2]), Field(widths=[1, 3])),
        "lambda": (Field(time=lambda t: t), Field(time=lambda t: 1 - t)),
        "partial": (functools.partial(velocity, scale=1.0), functools.partial(velocity, scale=2.0)),
        "as-velocity-path": (
            cnftools.as_velocity(model, cnftools.VPPath(0.1, 20.0), prediction="epsilon"),
            cnftools.as_velocity(model, cnftools.VPPath(0.1, 19.0), prediction="epsilon"),
        ),
        "as-velocity-time": (
            cnftools.as_velocity(
                model, cnftools.VPPath(), prediction="score", time=lambda t: 1 - t
            ),
            cnftools.as_velocity(
                model, cnftools.VPPath(), prediction="score", time=lambda t: 999 * (1 - t)
            ),
        ),
        "numpy-extra": (big, big_changed),
        "dataclass": (Field(config=Config(1.0)), Field(config=Config(2.0))),
        "slots": (Field(slotted=Slotted(1.0)), Field(slotted=Slotted(2.0))),
        "forward-hook": (Field(), hooked),
    }
    first, second = pairs[change]
    assert fingerprint(first) != fingerprint(second)


def test_cycles_and_shared_objects_terminate_and_count():
    a: list = [1.0]
    a.append(a)
    b: list = [1.0]
    b.append(b)
    assert fingerprint(a) == fingerprint(b)
    b[0] = 2.0
    assert fingerprint(a) != fingerprint(b)
    module = torch.nn.Module()
    module.me = module  # a module holding itself (a cycle through _modules)
    assert isinstance(fingerprint(module), str)


# ----------------------------------------------------------------------------------------------
# the property: random object graphs, one leaf changed -> another fingerprint (or a refusal)
_NAMES = ["a", "b", "c", "_p", "_q"]


class _Plain:
    """A plain object: its attributes in ``__dict__``."""


class _Slotted:
    __slots__ = ("first", "second")


@dataclasses.dataclass
class _Record:
    first: Any
    second: Any


class _Holder(torch.nn.Module):
    """A module holding anything (plain values, tensors, submodules, parameters)."""

    def forward(self, x, t):
        return -x


def _use(x, t, *args, **kwargs):
    return -x


def _closure(value):
    return lambda x, t: (x, value)


def _with_default(value):
    def fn(x, t, extra=value):
        return -x

    return fn


_LEAF = st.one_of(
    st.tuples(st.just("int"), st.integers(-(10**9), 10**9)),
    st.tuples(st.just("float"), st.floats(allow_nan=False, allow_infinity=False)),
    st.tuples(st.just("str"), st.text(max_size=4)),
    st.tuples(st.just("bool"), st.booleans()),
    st.tuples(st.just("none"), st.none()),
    st.tuples(st.just("np-scalar"), st.floats(-1e6, 1e6)),
    st.tuples(
        st.just("ndarray"), st.integers(1, 2500), st.sampled_from(["<f8", "<f4", "<i4", ">f8"])
    ),
    st.tuples(st.just("tensor"), st.integers(1, 40), st.sampled_from(["float64", "float32"])),
    st.tuples(st.just("path"), st.floats(0.0, 0.8)),
    st.tuples(st.just("ref"), st.integers(0, 50)),
)


def _node(children):
    named = st.dictionaries(st.sampled_from(_NAMES), children, max_size=3)
    return st.one_of(
        st.tuples(st.just("list"), st.lists(children, max_size=3)),
        st.tuples(st.just("tuple"), st.lists(children, max_size=3)),
        st.tuples(st.just("dict"), named),
        st.tuples(st.just("plain"), named),
        st.tuples(st.just("slots"), children, children),
        st.tuples(st.just("record"), children, children),
        st.tuples(st.just("module"), named, st.booleans()),
        st.tuples(st.just("partial"), st.lists(children, max_size=2), named),
        st.tuples(st.just("closure"), children),
        st.tuples(st.just("default"), children),
    )


_GRAPH = st.recursive(_LEAF, _node, max_leaves=10)


class _Builder:
    """Builds a graph from a recipe and records, for each leaf slot, how to change it."""

    def __init__(self) -> None:
        self.containers: list[Any] = []  # for "ref" leaves: shared objects and cycles
        self.changes: list[tuple[str, Callable[[], None]]] = []

    def build(self, recipe: tuple, where: str) -> Any:
        kind = recipe[0]
        if kind == "list":
            out: Any = []
            self.containers.append(out)
            for i, child in enumerate(recipe[1]):
                out.append(None)
                self.slot(child, f"{where}[{i}]", out.__setitem__, i)
            return out
        if kind == "tuple":
            return tuple(
                self.build(child, f"{where}[{i}]") for i, child in enumerate(recipe[1])
            )  # immutable: only leaves changed in place are recorded inside
        if kind in ("dict", "plain", "module"):
            out = {"dict": dict, "plain": _Plain, "module": _Holder}[kind]()
            self.containers.append(out)
            if kind == "module" and recipe[2]:
                out.weight = torch.nn.Parameter(torch.arange(3.0, dtype=torch.float64))
                out.register_buffer("stat", torch.zeros(2))
                self.changes.append((f"{where}.weight", lambda: _bump_tensor(out.weight)))
                self.changes.append((f"{where}.stat", lambda: _bump_tensor(out.stat)))
            for key, child in recipe[1].items():
                if kind == "dict":
                    self.slot(child, f"{where}[{key!r}]", out.__setitem__, key)
                else:
                    self.slot(child, f"{where}.{key}", functools.partial(setattr, out), key)
            return out
        if kind in ("slots", "record"):
            out = _Slotted() if kind == "slots" else _Record(None, None)
            self.containers.append(out)
            for key, child in zip(("first", "second"), recipe[1:], strict=True):
                self.slot(child, f"{where}.{key}", functools.partial(setattr, out), key)
            return out
        if kind == "partial":
            args = tuple(self.build(c, f"{where}.args[{i}]") for i, c in enumerate(recipe[1]))
            out = functools.partial(_use, *args)
            self.containers.append(out)
            for key, child in recipe[2].items():
                self.slot(child, f"{where}.keywords[{key!r}]", out.keywords.__setitem__, key)
            return out
        if kind == "closure":
            out = _closure(None)
            cell = out.__closure__[0]
            self.slot(
                recipe[1], f"{where}.<cell>", lambda _, v: setattr(cell, "cell_contents", v), 0
            )
            return out
        if kind == "default":
            out = _with_default(None)
            self.slot(
                recipe[1],
                f"{where}.__defaults__",
                lambda _, v: setattr(out, "__defaults__", (v,)),
                0,
            )
            return out
        return self.leaf(recipe, where)

    def slot(self, recipe: tuple, where: str, assign: Callable[[Any, Any], None], key: Any) -> None:
        """Build ``recipe`` into a mutable slot; a plain leaf there can be replaced."""
        value = self.build(recipe, where)
        assign(key, value)
        if recipe[0] in ("int", "float", "str", "bool", "none", "np-scalar"):
            self.changes.append((where, lambda: assign(key, _other(value))))

    def leaf(self, recipe: tuple, where: str) -> Any:
        kind = recipe[0]
        if kind == "ref":
            if self.containers:
                return self.containers[recipe[1] % len(self.containers)]
            return 0
        if kind == "np-scalar":
            return np.float64(recipe[1])
        if kind == "ndarray":
            array = np.arange(recipe[1]).astype(recipe[2])
            self.changes.append((f"{where}[middle]", lambda: _bump_array(array)))
            return array
        if kind == "tensor":
            tensor = torch.arange(recipe[1], dtype=getattr(torch, recipe[2]))
            self.changes.append((f"{where}[middle]", lambda: _bump_tensor(tensor)))
            return tensor
        if kind == "path":
            path = cnftools.OTPath(recipe[1])
            self.changes.append((f"{where}.sigma_min", lambda: setattr(path, "sigma_min", 0.9)))
            return path
        return recipe[1]


def _other(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, np.floating):
        return np.float64(math.nextafter(float(value), math.inf))
    if isinstance(value, float):
        return math.nextafter(value, math.inf)
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    return 0  # None


def _bump_array(array: np.ndarray) -> None:
    i = array.size // 2  # the middle: beyond a truncated repr's reach in a large array
    array.flat[i] = array.flat[i] + 1


def _bump_tensor(tensor: torch.Tensor) -> None:
    with torch.no_grad():
        flat = tensor.view(-1)
        flat[flat.numel() // 2] += 1


def _fingerprint_or_none(obj: Any) -> str | None:
    try:
        return fingerprint(obj)
    except Unfingerprintable:
        return None


@given(recipe=_GRAPH, data=st.data())
def test_changing_any_leaf_changes_the_fingerprint(recipe, data):
    builder = _Builder()
    root = _Holder()  # the field: a module holding the graph
    root.graph = builder.build(recipe, "v.graph")
    root._scale = 1.0
    builder.changes.append(("v._scale", lambda: setattr(root, "_scale", 2.0)))
    before = fingerprint(root)
    twin = _Holder()
    twin.graph = _Builder().build(recipe, "v.graph")
    twin._scale = 1.0
    assert fingerprint(twin) == before  # content, not identity
    where, change = data.draw(st.sampled_from(builder.changes), label="changed leaf")
    change()
    after = _fingerprint_or_none(root)
    assert after != before, f"changing {where} left the fingerprint unchanged"


def test_locks_and_loggers_do_not_block_a_fingerprint():
    import logging

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lock = threading.Lock()
            self.log = logging.getLogger("cnftools.test")

        def forward(self, x, t):
            return -x

    assert isinstance(fingerprint(Field()), str)


_user_module = __import__("types").ModuleType("_cnftools_test_user_module")
_user_module.scale = 1.0


def _reads_a_module_attribute(x, t):
    return -_user_module.scale * x


def test_an_attribute_of_a_user_module_that_a_function_reads_is_seen():
    before = fingerprint(_reads_a_module_attribute)
    _user_module.scale = 2.0
    try:
        assert fingerprint(_reads_a_module_attribute) != before
    finally:
        _user_module.scale = 1.0


def test_a_method_named_like_a_cache_is_part_of_the_class_s_fingerprint():
    """Today's main skipped every class member whose name contains "cache", methods included:
    editing ``_cached_scale`` (or a global it reads) resumed with the old model's numbers."""

    class Field(torch.nn.Module):
        def _cached_scale(self):
            return 0.5

        def forward(self, x, t):
            return -x * self._cached_scale()

    field = Field()
    before = fingerprint(field)
    original = Field._cached_scale
    Field._cached_scale = lambda self: 1.0
    try:
        assert fingerprint(field) != before
    finally:
        Field._cached_scale = original
    assert fingerprint(field) == before


def test_a_masked_array_s_mask_is_part_of_its_fingerprint():
    """Today's main hashed a masked array's data only: masking an element (a Shared extra a
    field reads with its mask) left the fingerprint unchanged."""
    values = np.ma.masked_array([1.0, 2.0, 3.0], mask=[False, False, False])
    before = fingerprint(values)
    values.mask[1] = True
    assert fingerprint(values) != before
