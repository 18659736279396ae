"""Content fingerprints (cnftools/nll/fingerprint.py): everything a call of the field can read.

The property test builds random object graphs (modules, plain and slotted objects, dataclasses,
partials, closures, paths, containers, shared references and cycles, NumPy and torch values),
changes one leaf reachable from the root, and requires the fingerprint to change (or the walk to
refuse: never the same fingerprint for other content). Rebuilt from the same recipe, a graph has
the same fingerprint (content, not identity).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import functools
import math
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from _dist_worker import make_case, make_mixture
from hypothesis import given
from hypothesis import strategies as st

import cnftools
from cnftools._runge_kutta import StepController
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


# ----------------------------------------------------------------------------------------------
# The same bits as before: a resumed run compares fingerprints computed by another version of this
# code, so a refactor of the walk must reproduce every digest exactly. The objects below cover
# every kind the walk dispatches on; their digests were computed by the code as it was before the
# walk was split by kind (see _GOLDEN_PORTABLE for how). Do not edit these objects: a digest
# depends on their code as well as their values.


class _GoldenColour(__import__("enum").IntEnum):
    RED = 1
    BLUE = 2


class _GoldenTag(str):
    """A subclass of a plain type, with an attribute of its own."""


@dataclasses.dataclass(frozen=True)
class _GoldenConfig:
    scale: float
    widths: tuple = (8, 8)
    names: list = dataclasses.field(default_factory=lambda: ["a", "b"])


class _GoldenSlots:
    __slots__ = ("left", "right")

    def __init__(self, left, right):
        self.left, self.right = left, right


class _GoldenNode:
    def __init__(self, child):
        self.child = child


class _GoldenMembers:
    """A class with every kind of member the class walk reads."""

    limit = 3
    _cache_of_values = ("skipped",)

    def __init__(self):
        self.value = 1.5

    @staticmethod
    def double(x):
        return 2 * x

    @classmethod
    def make(cls):
        return cls()

    @property
    def half(self):
        return self.value / 2

    def _cached_scale(self):
        return 0.5


_GOLDEN_TABLE = {"gain": 1.25, "offsets": [0.0, 1.0]}


def _golden_velocity(x, t, scale=1.0, *, shift=0.0):
    return -scale * x * _GOLDEN_TABLE["gain"] + shift + math.pi * np.sqrt(2.0) * t


def _golden_imports(x, t):
    import math as m

    return m.tanh(x) * torch.nn.functional.softplus(t)


def _golden_closure(rate):
    offsets = np.linspace(0.0, 1.0, 4)

    def v(x, t):
        return -rate * x + offsets[0] * t

    return v


class _GoldenUNet(torch.nn.Module):
    """A diffusers-style model: a config, a dtype, a ``.sample`` output, a conv with buffers."""

    def __init__(self):
        super().__init__()
        self.config = collections.OrderedDict(sample_size=4, in_channels=1, layers=[1, 2])
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
        self.norm = torch.nn.GroupNorm(1, 2)
        self.out = torch.nn.Conv2d(2, 1, 1)
        self.register_buffer("timesteps", torch.linspace(0.0, 999.0, 7))
        self._internal_dtype = torch.float64

    def forward(self, sample, timestep, class_labels=None):
        return types.SimpleNamespace(sample=self.out(self.norm(self.conv(sample))))


def _golden_portable() -> dict[str, Any]:
    """Objects read without code of this file or torch's module internals: the same digests on
    every Python, torch and NumPy version."""
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    big = np.arange(3000, dtype="<f8") / 7
    structured = np.zeros(3, dtype=[("x", "<f4"), ("n", ">i8")])
    structured["x"] = [1.5, -2.0, 3.25]
    masked = np.ma.masked_array([1.0, 2.0, 3.0], mask=[False, True, False], fill_value=-1.0)
    shared = [1, 2.5]
    cycle: list = ["head"]
    cycle.append(cycle)
    return {
        "plain": [0, -7, 2**70, 0.1, -0.0, math.inf, math.nan, 1 + 2j, "é\ud800", b"\x00b", None],
        "bools": (True, False),
        "tensor-float64": values,
        "tensor-float32-view": values.float().t(),
        "tensor-int": torch.arange(10),
        "tensor-sparse": torch.eye(3, dtype=torch.float64).to_sparse(),
        "ndarray": big,
        "ndarray-big-endian": big.astype(">f4")[::3],
        "ndarray-structured": structured,
        "ndarray-object": np.array([1.5, "x", None], dtype=object),
        "ndarray-masked": masked,
        "numpy-scalars": [np.float32(1.5), np.int64(-3), np.bool_(True)],
        "dict-mixed-keys": {"b": 1, 2: "two", None: [1.0], b"k": 0.5, 1.5: ()},
        "dict-ordered": collections.OrderedDict([("z", 1), ("a", 2)]),
        "dict-default": collections.defaultdict(list, {"a": [1]}),
        "sets": [{3, 1, 2}, frozenset({"a", "b"}), set()],
        "shared-and-cycle": [shared, shared, cycle],
        "torch-values": [torch.float64, torch.device("cpu"), torch.strided, torch.Size([2, 3])],
        "numpy-dtypes": [np.dtype("<f8"), np.dtype(">i2"), structured.dtype],
        "generator": gen,
        "controller": StepController(beta=0.04),
        "reductions": [
            datetime.date(2020, 1, 2),
            decimal.Decimal("1.5"),
            range(2, 9, 3),
            slice(1, None, 2),
            bytearray(b"ab"),
        ],
    }


def _golden_environment() -> dict[str, Any]:
    """Objects whose digests depend on the interpreter (bytecode) and the torch version (the
    attributes of ``nn.Module``): checked where they were computed (see _GOLDEN_ENVIRONMENT)."""
    torch.manual_seed(0)
    cnftools.MLPField(2, hidden=[8, 8])  # no longer pinned; built for its draws from the RNG
    norm = torch.nn.BatchNorm1d(3)
    norm.running_mean += 0.25
    norm.num_batches_tracked += 4
    hooked = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh())
    hooked.register_forward_hook(lambda module, args, out: 2 * out)
    torch.manual_seed(1)
    unet = _GoldenUNet()
    tag = _GoldenTag("unit")
    tag.note = "attribute of a str"
    holder = _GoldenMembers()
    holder.lock = threading.Lock()
    holder.log = __import__("logging").getLogger("cnftools.test.golden")
    deep: Any = None
    for _ in range(100):
        deep = _GoldenNode(deep)
    tensor = torch.ones(2, dtype=torch.float64)
    normal = torch.distributions.MultivariateNormal(torch.zeros(2), 2 * torch.eye(2))
    return {
        "batchnorm": norm,
        "hooked-sequential": hooked,
        "diffusers-like": unet,
        "diffusers-like-forward": unet.forward,
        "partial": functools.partial(_golden_velocity, 2.0, shift=0.5),
        "partial-of-library": functools.partial(torch.nn.functional.normalize, dim=0),
        "function-globals": _golden_velocity,
        "function-imports": _golden_imports,
        "closure": _golden_closure(3.0),
        "lambda": lambda x, t: -x * t,
        "dataclass": _GoldenConfig(0.5),
        "slots": _GoldenSlots([1, 2], _GoldenSlots(None, "r")),
        "enum": [_GoldenColour.BLUE, _GoldenColour],
        "str-subclass": tag,
        "class-members": holder,
        "class": _GoldenMembers,
        "deep-chain": deep,
        "bound-builtin": tensor.add,
        "builtins": [len, math.sqrt, np.add, str.upper],
        "distribution": normal,
        "module": np,
        "namedtuple": collections.namedtuple("Pair", "left right")(1, [2]),
    }


# Produced once at commit 7f78343 (the walk before it was split by kind), from the repository root:
#   python -c "import sys; sys.path.insert(0, 'tests'); import test_nll_fingerprint as m; \
#   from cnftools.nll import fingerprint; \
#   print({k: fingerprint(v) for k, v in m._golden_portable().items()}); \
#   print({k: fingerprint(v) for k, v in m._golden_environment().items()})"
# and the messages of the refusals likewise (str(error) of fingerprint(v), for _golden_refusals())
_GOLDEN_PORTABLE: dict[str, str] = {
    "plain": "10d48a473d6cab90c6b911c06e9f5ee4413c2c66342505db19d224b5b7d219af",
    "bools": "61bd7cca919f49668c16cc66b2b4eb0ff43ddefa7dfb4c6402c52a3bd2a355c5",
    "tensor-float64": "4ac4520025a95322b1943c081309fcd852432d599592bab33a4325fcf3688ae0",
    "tensor-float32-view": "68b1e1b749e7d25514ec382a1913aa4679a0f49508d6b1b4ff3e7c0412e5c443",
    "tensor-int": "b5e2f4dc189d641141c867e727a826d848e89fe75b26110ca4f58feb5942888d",
    "tensor-sparse": "bd5dbea69ae6e41d89214726f5376a9ac9f65b1a3c6aa7bb64ef61131d753f3a",
    "ndarray": "5764c6f68ba141cd75b5704b295a44c3d4cb13031d6e979ec50166b6222031c2",
    "ndarray-big-endian": "88f98c0c4f6f07b6afda00a69ee8430864cf00de7d3131c034045e3443132cb1",
    "ndarray-structured": "3714e73968ec75c4a821273214ebdb9f1f378e6c922ec990043a227993510263",
    "ndarray-object": "90fea88328087dcd3a6193c2810bb30d02ab95fb67a196ee70648362d8553f5d",
    "ndarray-masked": "2c82f36a1ffc269523adac3e453de67a527b64112bb2c434441fa1dc325a301e",
    "numpy-scalars": "12a50ba337a5845886e4e5748f6084ff0455843586e9473bcdcfa37fdc229074",
    "dict-mixed-keys": "ea8654e07d82c308454ea979aa693fc3e747071a7e913e095d483aca21485798",
    "dict-ordered": "9296ed6b8a2963402742a911a5ec717744ae96ff1419c06e55afb8bb7aafecce",
    "dict-default": "50f20c05f520ef69d12665c24a864a99b0a363e50a4456f69555fc86a888c5f4",
    "sets": "78d55ffe93277147973281d4dd8ce44c03722a5c35ac11cc51928b620044d0c8",
    "shared-and-cycle": "a54bf7e36333ccb318936c37797d46b51b6ecbf403592ad50db96fe8cbf562d2",
    "torch-values": "61c361e5b050462f1d4901dd0076e307aa0e53053f7cf2ea7f9944b233efa2a4",
    "numpy-dtypes": "5fe6f6f8bd9104bc0eea2c1cc392455b0c23de04c86fc07b1073c4626529f4e0",
    "generator": "5d0a7f7aaffdab8f7a698705f5acff236de698d58f91cd929d7de53ece119914",
    "controller": "ee386c71260a1ac945fdd5a8fa0f595876ed52dac5c5f51b05c47ac1564d032f",
    "reductions": "172328f573a5e186eb15b44fe7bf1a18a8037f7f3958ebf5c324871189307e49",
}
_GOLDEN_ENVIRONMENT: dict[str, str] = {
    # "mlp" (a cnftools.MLPField) was pinned too; 0.2 changed MLPField itself (time=TimeFeatures:
    # other attributes and code), so its digest changed with the class, not with the walk. A run
    # is never resumed across cnftools versions anyway (the version is part of its identity).
    # Modules stay pinned through batchnorm, hooked-sequential and diffusers-like.
    "batchnorm": "225992c1ad8e2c4c7880ea0d283f53363bb5fa1490681697dcd966d42a7fb165",
    "hooked-sequential": "4ce9e68d203d02a4eebe7230ce4d3ce07a834705b28102612f378dbc81c454fd",
    "diffusers-like": "9984e3b3d5d70bd4b1ceb9ffd7017945fd5a1e481c0e2bcb1b7549235847bd01",
    "diffusers-like-forward": "63dea349cf5b31a9848a7568a468eda98988c590d75a5d95fb45cc28a4570368",
    "partial": "5c546b5cdc7d768c8dd2085a1791acfa9e9526e9d3f27cb9600c10fe630e8892",
    "partial-of-library": "86d68726c6a9386b5c6ab4c0638b4ff49e8aef7465aac028459f8d0181f3bc9b",
    "function-globals": "62f5a085fd287ac12646f67e2c256d829e7ac552dcd98c267fdc3acb358dea8f",
    "function-imports": "9686d28e9d98c818d415e38e63901bdf476af2ea6d7ede7e38ca3b7e51687a75",
    "closure": "1c4177c026056b40dfb26c18c6bb7641555310f6f07f6827f207a43570683a10",
    "lambda": "e25a17caa81c56f6ea3d7f8a5e0d9f78f530a4c87a44fd8c052d6bf7f44d16b7",
    "dataclass": "a676ad6525fa5a2817e561348922ed7ffd17e5554fdc0dc76043a4e959c4e115",
    "slots": "68d83a1858b7329112ea1b523c518cb9992292709fc6e05fb905fbf38e62d3fe",
    "enum": "9dac2b3df0d5fbcd29f90edb8eca335d5cbf087d44c6bc45438730a29cc654fa",
    "str-subclass": "b1aeaf8966c11571cd652527510bb150ab2e766fa9f72239af9bba7ade4255e9",
    "class-members": "4188e36221f49d9b2b072a318163e028c7d67628400718117c7fd7a614a41a3f",
    "class": "6c8d0fa339b50f39fb99d0468596407a121719a2b4ae8ce2c3533c33cb52e2af",
    "deep-chain": "abb872be8328abed69dd1c80aeea750d09b4f154680c551fc32f05bf3bf5cda4",
    "bound-builtin": "c3719f9771e2e2fb4c0b4831a752b8a7dfa2161919e85f80a8fcde1a93cee6c3",
    "builtins": "b00c01b02f0855a92aab89365fac0d02e62bf1a15b0f459a7e55456224223c87",
    "distribution": "064690fc7f9605ba4b2a1d51b0436b8500eea960b3426d01c9ab4e224025c634",
    "module": "1e87b4620007f14070970edfabffb87c57b85b7f68b8b2c9143fd5f07ab4493c",
    "namedtuple": "8989c55ac4a653250537556a640a826414c039f594b91c0bf60a21f883eebcc0",
}
_UNREADABLE = (
    " whose content cannot be read; pass run_id= (or give the field a readable form, e.g. plain"
    " attributes)"
)
_GOLDEN_REFUSALS: dict[str, str] = {
    "generator": "v['rows'] is a builtins.generator" + _UNREADABLE,
    "numpy-dispatcher": "v.func is a numpy._ArrayFunctionDispatcher" + _UNREADABLE,
    "too-deep": "v" + "[0]" * 121 + ": nested deeper than 120 levels",
    "file": "v[1] is a _io.TextIOWrapper" + _UNREADABLE,
}
# where _GOLDEN_ENVIRONMENT and _GOLDEN_REFUSALS were computed (Python minor version, torch, NumPy)
_GOLDEN_VERSIONS = ("3.11", "2.13.0+cpu", "2.4.6")


def _golden_refusals() -> dict[str, Any]:
    """Objects the walk refuses: the message must be the same too."""
    deep: list = []
    for _ in range(200):
        deep = [deep]
    return {
        "generator": {"rows": (i for i in range(2))},
        "numpy-dispatcher": functools.partial(np.linspace, num=5),
        "too-deep": deep,
        "file": [threading.Event(), open(__file__)],  # closed by the test
    }


@pytest.mark.parametrize("name", sorted(_golden_portable()))
def test_fingerprints_are_those_of_the_code_before_the_split(name):
    assert fingerprint(_golden_portable()[name]) == _GOLDEN_PORTABLE[name]


_VERSIONS = (
    f"{sys.version_info[0]}.{sys.version_info[1]}",
    torch.__version__,
    np.__version__,
)


@pytest.mark.skipif(
    _VERSIONS != _GOLDEN_VERSIONS,
    reason=f"digests of code and modules computed on {_GOLDEN_VERSIONS}, this is {_VERSIONS}",
)
@pytest.mark.parametrize("name", sorted(_golden_environment()))
def test_fingerprints_of_code_and_modules_are_those_of_the_code_before_the_split(name):
    assert fingerprint(_golden_environment()[name]) == _GOLDEN_ENVIRONMENT[name]


@pytest.mark.skipif(
    _VERSIONS != _GOLDEN_VERSIONS,
    reason=f"messages name classes of the versions {_GOLDEN_VERSIONS}, this is {_VERSIONS}",
)
@pytest.mark.parametrize("name", sorted(_golden_refusals()))
def test_refusals_are_those_of_the_code_before_the_split(name):
    objects = _golden_refusals()
    try:
        with pytest.raises(Unfingerprintable) as error:
            fingerprint(objects[name])
    finally:
        if name == "file":
            objects[name][1].close()
    assert str(error.value) == _GOLDEN_REFUSALS[name]
