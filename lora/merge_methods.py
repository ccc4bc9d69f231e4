"""Merge methods and their options as declarations, from which everything else is derived.

A merge method is one `MergeMethod` in `DECLARED`: its name, its `Family` (how the sources'
factors become the tensors that are combined, and what comes out), the options it reads and, for
the families that combine task tensors, its combination: a function in `merge_ops` whose typed
keyword parameters are those options (plus values the driver gives, `CONTEXT`)::

    MergeMethod("breadcrumbs_svd", PRUNED_SVD, "...", "combine_breadcrumbs", reads=("density", "gamma"),
                in_peft=False)

    def combine_breadcrumbs(tensors, weights, *, density: float, gamma: float) -> torch.Tensor: ...

An option is one `MergeOptions` field made with `option`: its type, valid values, meaning and the
PeftMerge widget that sets it. From these two declarations come which methods need equal ranks,
read density, elect signs, end in an SVD or draw random numbers; the checks of option values
(`lora.merge.check_parameters`, PeftMerge's input checks); PeftMerge's method list, inputs and
tooltips; and the parameters a merged LoRA records. Declarations are checked when this module is
imported, and combinations' signatures against them when `lora.merge` is (`combinations`): a
mismatch fails with what, where and ``Fix:``. This module imports no torch (PeftMerge's inputs
come from it while the node pack loads); the maths is loaded on first use.

Adding a method: its combination in `merge_ops` (or an existing one), one `MergeMethod` line, and a
test on hand-written tensors. Adding an option: one `MergeOptions` field; PeftMerge shows it as an
optional input after its existing ones.
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers
import re
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from ..graph_runtime.errors import SchemaError

if TYPE_CHECKING:
    from .merge_factors import Combine

SIGN_METHODS = ("total", "frequency")
"""Valid ``majority_sign_method`` values (as peft)."""

# --- families -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """How a method turns its sources into one LoRA module.

    ``combines``: it combines task tensors with the method's combination (factors or full deltas);
    ``equal_ranks``: it combines A's and B's element by element, so every source needs one rank;
    ``svd``: it ends in a truncated SVD, and reads ``svd_rank`` and ``svd_clamp``.
    """

    name: str
    description: str
    combines: bool
    equal_ranks: bool
    svd: bool


CAT = Family("cat", "stacks the factors: exact, rank = sum of ranks", combines=False, equal_ranks=False, svd=False)
FACTORWISE = Family("factor-wise", "combines the A's and the B's separately (peft splits each weight over A and B)",
                    combines=True, equal_ranks=True, svd=False)
STACKED_SVD = Family("svd", "truncated SVD of the exact weighted sum, from the stacked factors", combines=False,
                     equal_ranks=False, svd=True)
PRUNED_SVD = Family("pruned svd", "combines the full deltas, then a truncated SVD", combines=True,
                    equal_ranks=False, svd=True)
SVD_OPTIONS = ("svd_rank", "svd_clamp")
"""The options every SVD family reads."""

# --- options ------------------------------------------------------------------------------------


class _Marker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


KEEP = _Marker("KEEP")
"""`Option.ignored`: a method that ignores the option still records its value."""
OMIT = _Marker("OMIT")
"""`Option.ignored`: a method that ignores the option records nothing for it."""


@dataclass(frozen=True)
class Widget:
    """The PeftMerge widget of an option: default, range, step; ``zero_is_none``: 0 stands for None."""

    default: Any
    min: float | None = None
    max: float | None = None
    step: float | None = None
    zero_is_none: bool = False


@dataclass(frozen=True)
class Option:
    """One merge option: type, meaning, valid values and widget (declared once, on `MergeOptions`).

    Valid values: ``choices``, or numbers from ``low`` to ``high`` (``low_open``: low itself is
    not valid); ``none`` says what None means (None: a method that reads the option needs a value).
    ``fix`` advises on a value out of range. ``ignored`` is what a merged LoRA's parameters (its
    metadata and fingerprint) hold for the option when the method ignores it: a value, `KEEP` or
    `OMIT`; options added after the first five use `OMIT`, so earlier merges keep their fingerprints.
    """

    type: type
    default: Any
    meaning: str
    widget: Widget
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple = ()
    none: str | None = None
    fix: str | None = None
    ignored: Any = OMIT
    name: str = ""

    @property
    def limit(self) -> str:
        """The valid values, in words: ``(0, 1]``, ``>= 1``, ``total, frequency``."""
        if self.choices:
            return ", ".join(self.choices)
        if self.low is not None and self.high is not None:
            return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return "an integer" if self.type is int else "a number"

    def problem(self, value: Any) -> tuple[str, str | None] | None:
        """Why `value` is not valid here, as ``(message, fix)`` (message starts with the name); None if valid."""
        if value is None:
            if self.none is not None:
                return None
            return (f"needs {self.name} ({self.meaning}, in {self.limit}); got None",
                    f"pass {self.name}={self.widget.default!r}, say")
        if self.choices:
            return None if value in self.choices else (f"{self.name} {value!r} is not one of {self.limit}", None)
        kind = numbers.Integral if self.type is int else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
            wanted = "an integer" if self.type is int else "a finite number"
            return f"{self.name} {value!r} must be {wanted}" + (" or None" if self.none else ""), None
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and value > self.high
        if not (below or above):
            return None
        if self.high is None:
            return f"{self.name} {value!r} must be {self.limit}" + (" or None" if self.none else ""), self.fix
        return f"{self.name} {value!r} is outside {self.limit}", self.fix

    def from_widget(self, value: Any) -> Any:
        """The option value a PeftMerge widget value stands for."""
        return None if self.widget.zero_is_none and value == 0 else value


def option(default: Any, **declaration: Any) -> Any:
    """A `MergeOptions` field declaring its `Option` (the keyword arguments are Option's fields)."""
    return field(default=default, metadata={"option": Option(default=default, **declaration)})


@dataclass(frozen=True)
class MergeOptions:
    """The options of a merge: each method reads the ones its declaration names and ignores the rest.

    Defaults are peft's (density has none: a pruning method needs one). `seed` drives DARE in
    `lora.merge.merge_loras` (`merge_module` takes a generator instead).
    """

    density: float | None = option(
        None, type=float, meaning="fraction of values kept", low=0.0, high=1.0, low_open=True,
        fix="density is the fraction kept: 1 keeps everything, 0.1 keeps a tenth", ignored=None,
        widget=Widget(0.5, 0.0, 1.0, 0.05))
    majority_sign_method: str = option(
        "total", type=str, meaning="TIES sign election: total elects the sign of the sum, frequency the sign "
        "most LoRAs hold", choices=SIGN_METHODS, ignored="total", widget=Widget("total"))
    svd_rank: int | None = option(
        None, type=int, meaning="rank of the result", none="the largest source rank", low=1, ignored=None,
        widget=Widget(0, 0, 4096, zero_is_none=True))
    svd_clamp: float | None = option(
        None, type=float, meaning="clamp the merged factors at this quantile of their entries", none="no clamp",
        low=0.0, high=1.0, low_open=True, fix="0.99 clamps the top 1% of factor entries", ignored=None,
        widget=Widget(0.0, 0.0, 1.0, 0.01, zero_is_none=True))
    # KEEP: merged LoRAs have always recorded the seed, whatever the method.
    seed: int | None = option(
        0, type=int, meaning="seeds the random pruning of each module: same seed, same result, whatever ran "
        "before", none="torch's global RNG, in peft's draw order", ignored=KEEP, widget=Widget(0, 0, 2**63 - 1))
    gamma: float = option(
        0.01, type=float, meaning="fraction of each delta's largest-magnitude entries dropped as outliers",
        low=0.0, high=1.0, widget=Widget(0.01, 0.0, 1.0, 0.01))

    def parameters(self, method: "MergeMethod") -> dict[str, Any]:
        """The options as a merged LoRA records them for `method` (see `Option.ignored`)."""
        out = {}
        for name, opt in OPTIONS.items():
            value = getattr(self, name)
            if not method.uses(name):
                if opt.ignored is OMIT:
                    continue
                if opt.ignored is not KEEP:
                    value = opt.ignored
            out[name] = value
        return out

    @classmethod
    def from_widgets(cls, values: Mapping[str, Any]) -> "MergeOptions":
        """Options from PeftMerge widget values (0 stands for None where the widget says so)."""
        return cls(**{name: OPTIONS[name].from_widget(value) for name, value in values.items()})


def _declaration_error(what: str, problems: list[tuple[str, str]], key: str) -> SchemaError:
    """One error for every (problem, fix) pair of a declaration: the problems, then their fixes in
    the same order."""
    return SchemaError(f"{what}: " + "; ".join(p for p, _ in problems) + ".", key=key,
                       fix="; ".join(f for _, f in problems), kind="bad_declaration")


def _options() -> Mapping[str, Option]:
    out = {}
    for f in fields(MergeOptions):
        declared = f.metadata.get("option")
        if not isinstance(declared, Option):
            raise _declaration_error(f"MergeOptions.{f.name} ({__name__})", [(
                "not declared with option()",
                f"{f.name}: {f.type} = option(default, type=..., meaning=..., widget=Widget(...))")], f.name)
        out[f.name] = replace(declared, name=f.name)
    return MappingProxyType(out)


OPTIONS: Mapping[str, Option] = _options()
"""Every option by name, in declaration order (PeftMerge's input order)."""

CONTEXT = MappingProxyType({
    "generator": "the module's torch.Generator for random pruning (None: torch's global RNG); the method then "
                 "reads seed",
    "mask_dtypes": "per source, the dtype of its Bernoulli probabilities (None: each tensor's; peft-compatible "
                   "draws only)",
    "select": "the magnitude-pruning rule: 'topk' (peft's ties among factor entries) or 'kth' (selection, for "
              "full deltas)",
})
"""Keyword parameters a combination may take besides options: values the merge driver provides."""

# --- methods ------------------------------------------------------------------------------------

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def _annotation(p: inspect.Parameter) -> str:
    a = p.annotation
    if a is inspect.Parameter.empty:
        return "nothing"
    return a if isinstance(a, str) else (a.__name__ if isinstance(a, type) else str(a))


def check_signature(method: "MergeMethod", combination: Callable) -> None:
    """Raise SchemaError unless `combination` fits `method`'s declaration: ``(tensors, weights)``, then
    keyword-only parameters without defaults: exactly the options the method reads that are not its
    family's (annotated with the option's type), ``generator`` exactly when it reads ``seed``, and
    other `CONTEXT` values as it needs."""
    params = list(inspect.signature(combination).parameters.values())
    problems = []
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if positional != ["tensors", "weights"]:
        problems.append((f"positional parameters ({', '.join(positional)})",
                         "take (tensors, weights) positionally, everything else after a bare *"))
    keywords = set()
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            problems.append((f"parameter '{p.name}' collects arbitrary arguments", "name every parameter"))
        if p.kind is not p.KEYWORD_ONLY:
            continue
        keywords.add(p.name)
        if p.default is not p.empty:
            problems.append((f"parameter '{p.name}' has a default", "remove it: option defaults are declared on "
                             "MergeOptions, driver values are always given"))
        if p.name in OPTIONS:
            opt = OPTIONS[p.name]
            expected = opt.type.__name__ + (" | None" if opt.none is not None else "")
            if _annotation(p) != expected:
                problems.append((f"parameter '{p.name}' is annotated {_annotation(p)}, option {p.name} is {expected}",
                                 f"annotate it '{p.name}: {expected}'"))
        elif p.name not in CONTEXT:
            problems.append((f"parameter '{p.name}' is neither an option ({', '.join(OPTIONS)}) nor a driver value "
                             f"({', '.join(CONTEXT)})", "rename it, or declare a new option as a MergeOptions field"))
    declared = set(method.reads) - {"seed"}
    for name in sorted(declared - keywords):
        problems.append((f"the declaration reads {name}, the combination takes no '{name}'",
                         f"add '{name}' to its keyword parameters, or drop it from reads"))
    for name in sorted((keywords & set(OPTIONS)) - declared):
        problems.append((f"the combination takes option '{name}', the declaration does not read it",
                         f"add {name!r} to the declaration's reads"))
    if ("seed" in method.reads) != ("generator" in keywords):
        problems.append(("a method reads seed exactly when its combination takes 'generator'",
                         "add both, or neither"))
    if problems:
        code = getattr(combination, "__code__", None)
        where = f"{code.co_filename}:{code.co_firstlineno} " if code is not None else ""
        raise _declaration_error(f"merge method {method.name!r}, combination {where}{combination.__qualname__}",
                                 problems, method.name)


@dataclass(frozen=True)
class MergeMethod:
    """One merge method, declared once: name, family, a one-line summary for users, the options its
    maths reads beyond its family's (`reads`), and for the families that combine task tensors the
    name of its combination (a ``combine_*`` function of `merge_ops`, checked by `check_signature`).

    ``in_peft``: the name and maths are peft's ``add_weighted_adapter`` combination_type.
    ``options`` (derived) are all the option names the method reads, in `MergeOptions` order: its
    `reads`, plus ``svd_rank`` and ``svd_clamp`` for the SVD families. A combination that reads
    density but elects no signs must be the plain weighted sum at density 1: those SVD forms then
    take the exact stacked-factor SVD (`is_weighted_sum`).
    """

    name: str
    family: Family
    summary: str
    combination: str | None = None
    reads: tuple[str, ...] = ()
    in_peft: bool = True
    options: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self):
        problems: list[tuple[str, str]] = []
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            problems.append((f"name {self.name!r} is not snake_case", "name it like 'ties_svd'"))
        if not isinstance(self.family, Family):
            problems.append((f"family {self.family!r} is not a Family", "use CAT, FACTORWISE, STACKED_SVD or "
                             "PRUNED_SVD"))
        elif self.family.combines and self.combination is None:
            problems.append((f"the {self.family.name} family combines task tensors, but no combination is named",
                             "name a combine_* function of merge_ops"))
        elif not self.family.combines and (self.combination is not None or self.reads):
            problems.append((f"the {self.family.name} family takes no combination and reads no options of its own",
                             "drop combination and reads, or pick FACTORWISE or PRUNED_SVD"))
        for name in self.reads:
            if name not in OPTIONS:
                problems.append((f"reads {name!r}, which is not an option ({', '.join(OPTIONS)})",
                                 "declare it as a MergeOptions field first"))
            elif name in SVD_OPTIONS:
                problems.append((f"reads {name!r}, which comes with the SVD families", f"drop {name!r} from reads"))
        if problems:
            raise _declaration_error(f"merge method {self.name!r} ({__name__}.DECLARED)", problems, self.name)
        reads = set(self.reads) | (set(SVD_OPTIONS) if self.family.svd else set())
        object.__setattr__(self, "options", tuple(n for n in OPTIONS if n in reads))

    def uses(self, option_name: str) -> bool:
        """True when the method reads that option."""
        return option_name in self.options

    @property
    def equal_ranks(self) -> bool:
        """Every source of a module needs the same rank (A's and B's are combined element by element)."""
        return self.family.equal_ranks

    @property
    def svd(self) -> bool:
        """Ends in a truncated SVD (reads svd_rank and svd_clamp)."""
        return self.family.svd

    @property
    def elects_signs(self) -> bool:
        """Elects a sign per entry (TIES; reads majority_sign_method)."""
        return self.uses("majority_sign_method")

    @property
    def random(self) -> bool:
        """Draws random numbers (DARE): its combination takes a generator, seeded per module from seed."""
        return self.uses("seed")

    def is_weighted_sum(self, options: MergeOptions) -> bool:
        """True when, with these options, the combination is the plain weighted sum (prunes nothing)."""
        return self.uses("density") and not self.elects_signs and options.density >= 1

    def bind(self, options: MergeOptions, **context: Any) -> Combine:
        """The combination as ``combine(tensors, weights)``, its options and the driver's `context`
        values (every `CONTEXT` name the combination takes) bound."""
        combination = combinations()[self.name]
        takes = [p.name for p in inspect.signature(combination).parameters.values() if p.kind is p.KEYWORD_ONLY]
        values = {n: getattr(options, n) if n in OPTIONS else context[n] for n in takes}
        return functools.partial(combination, **values)


def _registry(methods: Iterable[MergeMethod]) -> Mapping[str, MergeMethod]:
    out: dict[str, MergeMethod] = {}
    for m in methods:
        if m.name in out:
            raise SchemaError(f"merge method {m.name!r} is declared twice.", key=m.name, kind="bad_declaration",
                              fix="give the second one its own name")
        if m.in_peft and any(not o.in_peft for o in out.values()):
            raise SchemaError(f"merge method {m.name!r} is peft's but declared after methods peft lacks.", key=m.name,
                              kind="bad_declaration", fix="keep peft's methods first, in peft's order: saved "
                                                          "workflows store PeftMerge's choices")
        out[m.name] = m
    return MappingProxyType(out)


DECLARED = (
    # peft's combination types, in peft's order (PeftMerge lists them so; saved workflows rely on it).
    MergeMethod("svd", STACKED_SVD, "best rank-k approximation of the exact weighted sum"),
    MergeMethod("linear", FACTORWISE, "weighted sums of the A's and of the B's (cross terms)", "combine_linear"),
    MergeMethod("cat", CAT, "the exact sum, factors stacked (rank = sum of the ranks)"),
    MergeMethod("ties", FACTORWISE, "TIES on the A's and B's", "combine_ties",
                ("density", "majority_sign_method")),
    MergeMethod("ties_svd", PRUNED_SVD, "TIES on the full deltas, then SVD", "combine_ties",
                ("density", "majority_sign_method")),
    MergeMethod("dare_linear", FACTORWISE, "DARE random pruning of the A's and B's, then weighted sums",
                "combine_dare_linear", ("density", "seed")),
    MergeMethod("dare_ties", FACTORWISE, "DARE pruning, then TIES, on the A's and B's", "combine_dare_ties",
                ("density", "majority_sign_method", "seed")),
    MergeMethod("dare_linear_svd", PRUNED_SVD, "DARE on the full deltas, weighted sum, then SVD",
                "combine_dare_linear", ("density", "seed")),
    MergeMethod("dare_ties_svd", PRUNED_SVD, "DARE, then TIES, on the full deltas, then SVD", "combine_dare_ties",
                ("density", "majority_sign_method", "seed")),
    MergeMethod("magnitude_prune", FACTORWISE, "magnitude pruning of the A's and B's, then weighted sums",
                "combine_magnitude_prune", ("density",)),
    MergeMethod("magnitude_prune_svd", PRUNED_SVD, "magnitude pruning of the full deltas, weighted sum, then SVD",
                "combine_magnitude_prune", ("density",)),
    # Not in peft.
    MergeMethod("breadcrumbs_svd", PRUNED_SVD, "Model Breadcrumbs, each full delta loses its largest (gamma) and "
                "smallest entries, keeping density; weighted sum, then SVD", "combine_breadcrumbs",
                ("density", "gamma"), in_peft=False),
)
REGISTRY: Mapping[str, MergeMethod] = _registry(DECLARED)
"""Every merge method by name: peft's first, in peft's order."""

METHODS = tuple(REGISTRY)
"""Every method name (PeftMerge's choices)."""
PEFT_METHODS = tuple(n for n, m in REGISTRY.items() if m.in_peft)
"""Every combination type of peft's ``add_weighted_adapter``, in peft's order."""
EQUAL_RANK_METHODS = tuple(n for n, m in REGISTRY.items() if m.equal_ranks)
"""Methods that combine A's and B's element by element: every source of a module needs one rank."""
ANY_RANK_METHODS = tuple(n for n, m in REGISTRY.items() if not m.equal_ranks)
"""Methods that accept sources of different ranks."""
SVD_METHODS = tuple(n for n, m in REGISTRY.items() if m.svd)
"""Methods that end in a truncated SVD (read svd_rank and svd_clamp)."""


def users(option_name: str) -> tuple[str, ...]:
    """The names of the methods that read an option."""
    return tuple(n for n, m in REGISTRY.items() if m.uses(option_name))


@functools.cache
def combinations() -> Mapping[str, Callable]:
    """Each combining method's combination function, from `merge_ops` (this imports torch), every
    signature checked against its declaration (`check_signature`)."""
    from . import merge_ops

    out = {}
    for m in REGISTRY.values():
        if m.combination is None:
            continue
        function = getattr(merge_ops, m.combination, None)
        if not callable(function):
            raise _declaration_error(f"merge method {m.name!r}", [(
                f"merge_ops has no function {m.combination!r}",
                "define it there, or name an existing combine_* function")], m.name)
        check_signature(m, function)
        out[m.name] = function
    return MappingProxyType(out)
