"""Each mechanism's own constructor arguments are declared once and checked (issue 41).

Every registered mechanism declares ``arguments = {name: Arg}`` for each keyword of its own
``__init__``; the registry checks them before the constructor runs (``build`` and direct
construction), so a bad value fails with the mechanism, the argument, the value and what is
accepted, never deep inside torch or silently.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

import attnlab as al
from attnlab.core.arguments import Arg, ArgumentError
from attnlab.mechanisms.base import Attention

DIM, HEADS, LENGTH = 32, 4, 5
NAMES = al.available()
SETTINGS = settings(max_examples=6, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.filter_too_much,
                                           HealthCheck.too_slow])


def _own_parameters(cls: type) -> list[str]:
    """The keywords of the class's own constructor (none when it keeps the base's)."""
    if inspect.unwrap(cls.__init__) is Attention.__init__:
        return []
    params = inspect.signature(cls.__init__).parameters
    return [n for n, p in params.items() if n not in ("self", "dim", "heads")
            and p.kind is not inspect.Parameter.VAR_KEYWORD]


PAIRS = [(n, a) for n in NAMES for a in getattr(al.info(n).cls, "arguments", {})]


@pytest.mark.parametrize("name", NAMES)
def test_every_own_argument_is_declared(name):
    cls = al.info(name).cls
    assert "arguments" in cls.__dict__, f"{name} declares no `arguments`"
    missing = set(_own_parameters(cls)) - set(cls.arguments)
    assert not missing, f"{name}: constructor arguments without a declaration: {missing}"
    for arg, value in al.info(name).defaults.items():
        if arg in cls.arguments:
            assert cls.arguments[arg].fits(value), f"{name}: default {arg}={value!r} refused"


def test_pairs_cover_every_mechanism_with_arguments():  # so no pair test goes missing
    assert len({n for n, _ in PAIRS}) == len(NAMES) - 1  # softmax has none
    assert len(PAIRS) >= 70


def _invalid(arg: Arg) -> st.SearchStrategy:
    """Values the declaration refuses: wrong types, out of range, not finite."""
    junk = st.one_of(st.text(max_size=4), st.booleans(), st.just([]), st.just({}),
                     st.just(object()))
    numbers = st.one_of(st.integers(-10**6, 10**6),
                        st.floats(allow_nan=True, allow_infinity=True),
                        st.sampled_from([math.nan, math.inf, -math.inf]))
    tuples = st.one_of(st.just(()), st.tuples(st.integers(-3, 0)),
                       st.tuples(st.integers(1, 4), st.floats(0.5, 3.5)),
                       st.tuples(st.integers(1, 4), st.text(max_size=2)),
                       st.lists(st.integers(1, 4), min_size=3, max_size=4).map(tuple))
    return st.one_of(junk, numbers, tuples).filter(lambda v: v is not None and not arg.fits(v))


def _valid(arg: Arg) -> st.SearchStrategy:
    """Values the declaration accepts, small enough for a 5-token forward."""
    low = arg.low if arg.low is not None else -4.0
    if arg.kind == "bool":
        values = st.booleans()
    elif arg.kind == "str":
        values = st.sampled_from(arg.choices)
    elif arg.kind == "int":
        values = st.integers(int(low), int(low) + 12)
    elif arg.kind == "float":
        high = min(arg.high, low + 8) if arg.high is not None else low + 8
        values = st.floats(low, high, exclude_min=arg.low_open,
                           exclude_max=arg.high_open and high == arg.high)
    elif arg.kind == "ints":
        values = st.lists(st.integers(int(low), int(low) + 4), min_size=arg.length or 1,
                          max_size=arg.length or 3).map(tuple)
    elif arg.kind == "int_or_ints":  # the small input is a sequence: one axis
        values = st.one_of(st.integers(int(low), int(low) + 4),
                           st.tuples(st.integers(int(low), int(low) + 4)))
    else:  # "bools", one axis
        values = st.tuples(st.booleans())
    if arg.optional:
        values = st.one_of(st.none(), values)
    return values.filter(arg.fits)


@pytest.mark.parametrize("name, arg", PAIRS)
@SETTINGS
@given(data=st.data())
def test_invalid_own_argument_is_refused_naming_it(name, arg, data):
    declared = al.info(name).cls.arguments[arg]
    value = data.draw(_invalid(declared), label=arg)
    for make in (al.build, al.info(name).cls):  # by name and constructed directly
        with pytest.raises(ArgumentError) as err:
            make(dim=DIM, heads=HEADS, **{arg: value}) if make is not al.build else \
                make(name, DIM, HEADS, **{arg: value})
        assert str(err.value).startswith(f"{name}: {arg} must be "), str(err.value)
        assert declared.accepted() in str(err.value)


@pytest.mark.parametrize("name, arg", PAIRS)
@SETTINGS
@given(data=st.data())
def test_valid_own_argument_builds_a_finite_module(name, arg, data):
    value = data.draw(_valid(al.info(name).cls.arguments[arg]), label=arg)
    torch.manual_seed(0)
    try:
        module = al.build(name, DIM, HEADS, **{arg: value})
    except ArgumentError:
        raise
    except ValueError as err:  # a check relating several arguments (top_k <= routed heads)
        assert str(err).startswith(name), str(err)
        reject()
    x = torch.randn(2, LENGTH, DIM)
    with torch.no_grad():
        try:
            y = module(x)
        except ValueError as err:  # an argument that bounds the input (sparsifiner's tokens)
            assert str(err).startswith(name) and f"{arg}=" in str(err), str(err)
            reject()
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("name, kwargs, match", [  # accepted before issue 41's declarations
    ("rfa", {"identity_mean": math.inf}, r"rfa: identity_mean must be a finite number, got inf"),
    ("softplus", {"reweight_p": math.inf}, r"softplus: reweight_p must be a finite number "
                                           r"that is 0 \(LSSA\) or >= 1 or None, got inf"),
    ("lla", {"ridge": math.nan}, r"lla: ridge must be a finite number > 0, got nan"),
    # lambda = 0: the first causal query sees one key, Sigma is singular (a LinAlgError)
    ("lla", {"ridge": 0.0}, r"lla: ridge must be a finite number > 0, got 0.0"),
    ("moh", {"balance_weight": math.nan},
     r"moh: balance_weight must be a finite number >= 0, got nan"),
    ("neighborhood", {"kernel_size": (3, 0)}, r"kernel_size must be an int or a non-empty "
                                              r"tuple of ints, each >= 1, got \(3, 0\)"),
    ("spectral", {"grid_size": 14}, r"grid_size must be a tuple of 2 ints, each >= 1"),
    ("agent", {"agents": 48}, r"agents must be an int >= 1, a square number"),
    ("longheads", {"budget": 2}, r"budget must be an int >= 3, got 2"),
    ("maxvit", {"grid": 2.0}, r"grid must be an int >= 1, got 2.0 \(float\)"),
    ("sparsifiner", {"distill_weight": "1"}, r"distill_weight must be a finite number >= 0"),
    ("hedgehog", {"tie_qk": "yes"}, r"tie_qk must be True or False, got 'yes'"),
])
def test_silently_accepted_or_deep_failures_now_raise(name, kwargs, match):
    with pytest.raises(ArgumentError, match=match):
        al.build(name, DIM, HEADS, **kwargs)
    with pytest.raises(ArgumentError, match=match):
        al.info(name).cls(DIM, HEADS, **kwargs)


def test_lists_from_config_files_are_tuples_of_axes():
    module = al.build("neighborhood", DIM, HEADS, kernel_size=[3], dilation=[1])
    assert module.kernel_size == (3,)
    assert torch.isfinite(module(torch.randn(1, LENGTH, DIM))).all()


def test_unknown_keyword_keeps_its_error():
    with pytest.raises(ValueError, match="unknown argument"):
        al.build("rfa", DIM, HEADS, identity_man=0.0)


def test_a_mechanism_name_that_is_no_string_is_refused_naming_the_choices():
    for name in (None, 3, ["softmax"]):  # None failed inside difflib with a TypeError
        with pytest.raises(ValueError, match="a mechanism name is a string.*available: agent"):
            al.build(name, dim=16, heads=2)


@pytest.mark.parametrize("name, old", [("agent", "dwconv"), ("soft", "dwconv"), ("l2vit", "lcm")])
def test_a_deprecated_alias_warns_at_the_callers_line_and_refuses_a_contradiction(name, old):
    with pytest.warns(FutureWarning, match=f"{old}= is deprecated, use local=") as caught:
        al.build(name, dim=32, heads=4, **{old: False})
    assert caught[0].filename == __file__  # the user's line, not the registry's
    with pytest.raises(ValueError, match=f"{old}=True .deprecated. contradicts local=False"):
        al.build(name, dim=32, heads=4, local=False, **{old: True})
