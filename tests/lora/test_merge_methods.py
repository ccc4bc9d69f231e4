"""Merge method and option declarations: what is derived from them, and how a wrong one fails."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from loraloom.lora import merge_ops
from loraloom.lora.merge import Factors, MergeError, merge_module
from loraloom.lora.merge_methods import (
    CAT,
    FACTORWISE,
    OPTIONS,
    PEFT_METHODS,
    PRUNED_SVD,
    REGISTRY,
    STACKED_SVD,
    MergeMethod,
    MergeOptions,
    _registry,
    check_signature,
    combinations,
    users,
)

# peft 0.21's add_weighted_adapter combination types, in its order: PeftMerge's first choices, frozen in
# saved workflows (a UI workflow stores the chosen name; reordering would not break it, renaming would).
PEFT_ORDER = ("svd", "linear", "cat", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
              "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")

# name: (family, options read), written out from peft's documentation of each combination type
EXPECTED = {
    "svd": (STACKED_SVD, ("svd_rank", "svd_clamp")),
    "linear": (FACTORWISE, ()),
    "cat": (CAT, ()),
    "ties": (FACTORWISE, ("density", "majority_sign_method")),
    "ties_svd": (PRUNED_SVD, ("density", "majority_sign_method", "svd_rank", "svd_clamp")),
    "dare_linear": (FACTORWISE, ("density", "seed")),
    "dare_ties": (FACTORWISE, ("density", "majority_sign_method", "seed")),
    "dare_linear_svd": (PRUNED_SVD, ("density", "svd_rank", "svd_clamp", "seed")),
    "dare_ties_svd": (PRUNED_SVD, ("density", "majority_sign_method", "svd_rank", "svd_clamp", "seed")),
    "magnitude_prune": (FACTORWISE, ("density",)),
    "magnitude_prune_svd": (PRUNED_SVD, ("density", "svd_rank", "svd_clamp")),
    "breadcrumbs_svd": (PRUNED_SVD, ("density", "svd_rank", "svd_clamp", "gamma")),
}


def test_peft_methods_come_first_in_peft_order():
    assert PEFT_METHODS == PEFT_ORDER, f"peft's methods changed order or names: {PEFT_METHODS}"
    assert tuple(REGISTRY)[: len(PEFT_ORDER)] == PEFT_ORDER, f"peft's names lead PeftMerge's list: {tuple(REGISTRY)}"


@pytest.mark.parametrize("name", list(EXPECTED))
def test_properties_are_derived_from_the_declaration(name):
    method = REGISTRY[name]
    family, options = EXPECTED[name]
    assert method.family is family and method.options == options, f"{name}: {method.family.name}, {method.options}"
    assert method.equal_ranks == (family is FACTORWISE), f"{name}: equal ranks"
    assert method.svd == (family in (STACKED_SVD, PRUNED_SVD)), f"{name}: svd"
    assert method.elects_signs == ("ties" in name), f"{name}: sign election"
    assert method.random == name.startswith("dare"), f"{name}: random pruning"
    assert set(REGISTRY) == set(EXPECTED), "every declared method is in this table"


def test_users_lists_the_methods_reading_an_option():
    assert users("gamma") == ("breadcrumbs_svd",)
    assert users("majority_sign_method") == ("ties", "ties_svd", "dare_ties", "dare_ties_svd")
    assert users("density") == tuple(n for n in REGISTRY if n not in ("svd", "linear", "cat"))


def test_every_declared_combination_is_found_and_fits():
    found = combinations()
    assert set(found) == {n for n, m in REGISTRY.items() if m.family.combines}, f"{sorted(found)}"
    assert found["breadcrumbs_svd"] is merge_ops.combine_breadcrumbs


@pytest.mark.parametrize("name", [n for n, m in REGISTRY.items() if m.uses("density") and not m.elects_signs])
def test_combinations_without_sign_election_are_the_weighted_sum_at_density_1(name):
    # The SVD forms of these methods skip the full deltas at density 1 (is_weighted_sum): that is only
    # right when the combination prunes nothing there.
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(6, 5, generator=g) for _ in range(3)]
    weights = [1.0, -0.5, 0.25]
    method = REGISTRY[name]
    options = MergeOptions(density=1.0, gamma=0.3)
    combined = method.bind(options, generator=torch.Generator().manual_seed(1), mask_dtypes=None, select="kth")
    assert method.is_weighted_sum(options)
    assert torch.equal(combined(tensors, weights), merge_ops.weighted_sum(tensors, weights)), name


# ------------------------------------------------------------------------------ declaration errors


def good(tensors, weights, *, density: float, gamma: float):
    return tensors[0]


def misnamed(tensors, weights, *, dens: float):
    return tensors[0]


def defaulted(tensors, weights, *, density: float = 0.5):
    return tensors[0]


def mistyped(tensors, weights, *, density: int):
    return tensors[0]


def unseeded(tensors, weights, *, density: float, generator):
    return tensors[0]


def positional(tensors, *, density: float):
    return tensors[0]


@pytest.mark.parametrize("combination, reads, needles", [
    (misnamed, ("density",), ["parameter 'dens' is neither an option", "the declaration reads density",
                              "Fix: rename it"]),
    (defaulted, ("density",), ["parameter 'density' has a default", "Fix: remove it"]),
    (mistyped, ("density",), ["'density' is annotated int, option density is float", "Fix: annotate it "
                              "'density: float'"]),
    (unseeded, ("density",), ["reads seed exactly when its combination takes 'generator'"]),
    (positional, ("density",), ["positional parameters (tensors)", "Fix: take (tensors, weights)"]),
    (good, ("density",), ["takes option 'gamma', the declaration does not read it", "Fix: add 'gamma'"]),
])
def test_a_combination_that_does_not_fit_its_declaration_says_what_where_and_fix(combination, reads, needles):
    method = MergeMethod("made_up_svd", PRUNED_SVD, "test", "good", reads)
    with pytest.raises(TypeError) as err:
        check_signature(method, combination)
    text = str(err.value)
    assert "merge method 'made_up_svd'" in text and "test_merge_methods.py:" in text, f"what and where: {text}"
    for needle in needles:
        assert needle in text, f"{needle!r} not in: {text}"


def test_a_fitting_combination_passes():
    check_signature(MergeMethod("made_up_svd", PRUNED_SVD, "test", "good", ("density", "gamma")), good)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(name="Ties2", family=FACTORWISE, combination="combine_ties"), "not snake_case"),
    (dict(name="x", family=FACTORWISE), "no combination is named"),
    (dict(name="x", family=CAT, combination="combine_ties"), "takes no combination"),
    (dict(name="x", family="svd"), "is not a Family"),
    (dict(name="x", family=PRUNED_SVD, combination="combine_ties", reads=("densty",)), "reads 'densty', which is "
     "not an option"),
    (dict(name="x", family=PRUNED_SVD, combination="combine_ties", reads=("svd_rank",)), "comes with the SVD"),
])
def test_bad_declarations_fail_at_once(kwargs, needle):
    with pytest.raises(TypeError, match="Fix:") as err:
        MergeMethod(summary="test", **kwargs)
    assert needle in str(err.value), str(err.value)


def test_registry_refuses_duplicates_and_peft_names_after_others():
    extra = MergeMethod("extra", CAT, "not peft's", in_peft=False)
    with pytest.raises(TypeError, match="declared twice"):
        _registry([REGISTRY["cat"], REGISTRY["cat"]])
    with pytest.raises(TypeError, match="keep peft's methods first"):
        _registry([extra, REGISTRY["cat"]])


# ------------------------------------------------------------------------------ options


def test_options_are_the_merge_options_fields_in_order():
    assert tuple(OPTIONS) == tuple(f.name for f in dataclasses.fields(MergeOptions))
    assert tuple(OPTIONS)[:5] == ("density", "majority_sign_method", "svd_rank", "svd_clamp", "seed"), (
        "the first five options are PeftMerge's original widgets, in order")
    for name, opt in OPTIONS.items():
        assert opt.problem(opt.from_widget(opt.widget.default)) is None, f"{name}: the widget default is invalid"
        assert getattr(MergeOptions(), name) == opt.default, f"{name}: field default"


@pytest.mark.parametrize("name, value, needle", [
    ("density", None, "needs density (fraction of values kept, in (0, 1]); got None"),
    ("density", 0.0, "density 0.0 is outside (0, 1]"),
    ("density", float("nan"), "density nan must be a finite number"),
    ("majority_sign_method", "mean", "majority_sign_method 'mean' is not one of total, frequency"),
    ("svd_rank", 0, "svd_rank 0 must be >= 1 or None"),
    ("svd_rank", 2.5, "svd_rank 2.5 must be an integer or None"),
    ("svd_clamp", 1.5, "svd_clamp 1.5 is outside (0, 1]"),
    ("seed", "7", "seed '7' must be an integer or None"),
    ("gamma", -0.1, "gamma -0.1 is outside [0, 1]"),
    ("gamma", True, "gamma True must be a finite number"),
])
def test_option_problems_name_option_value_and_limit(name, value, needle):
    message, _ = OPTIONS[name].problem(value)
    assert message == needle, message


def test_merge_error_carries_option_key_limit_and_fix():
    down, up = torch.ones(1, 2), torch.ones(2, 1)
    pair = [Factors(down, up, 1.0), Factors(down, up, 1.0)]
    with pytest.raises(MergeError) as err:
        merge_module("breadcrumbs_svd", pair, [1.0, 1.0], MergeOptions(density=0.5, gamma=2.0))
    e = err.value
    assert (e.method, e.key, e.value, e.limit) == ("breadcrumbs_svd", "gamma", 2.0, "[0, 1]"), vars(e)
    with pytest.raises(MergeError, match="Fix: density is the fraction kept"):
        merge_module("ties", pair, [1.0, 1.0], MergeOptions(density=1.5))
    # Options a method does not read are not checked.
    merge_module("cat", pair, [1.0, 1.0], MergeOptions(gamma=2.0, majority_sign_method="mean"))


def test_recorded_parameters_keep_earlier_merges_fingerprints():
    options = MergeOptions(density=0.4, majority_sign_method="frequency", svd_rank=3, svd_clamp=0.9, seed=5,
                           gamma=0.2)
    # What merged LoRAs recorded before options were declared: ignored options at fixed values, the seed
    # always, and nothing of options added later.
    assert options.parameters(REGISTRY["cat"]) == {"density": None, "majority_sign_method": "total",
                                                   "svd_rank": None, "svd_clamp": None, "seed": 5}
    assert options.parameters(REGISTRY["ties"]) == {"density": 0.4, "majority_sign_method": "frequency",
                                                    "svd_rank": None, "svd_clamp": None, "seed": 5}
    assert options.parameters(REGISTRY["breadcrumbs_svd"]) == {"density": 0.4, "majority_sign_method": "total",
                                                               "svd_rank": 3, "svd_clamp": 0.9, "seed": 5,
                                                               "gamma": 0.2}


def test_widget_zero_stands_for_none_where_declared():
    options = MergeOptions.from_widgets({"density": 0.5, "svd_rank": 0, "svd_clamp": 0.0, "seed": 0, "gamma": 0.0})
    assert (options.svd_rank, options.svd_clamp, options.seed, options.gamma) == (None, None, 0, 0.0), options
