"""Spec parsing: structure, canonical form, and every kind of invalid spec."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mumoe.spec import is_expert_leg, parse_spec
from mumoe.testing import custom_specs


@pytest.mark.parametrize(
    ("spec", "cores", "experts", "bonds"),
    [
        ("n r, i r, o r", (("n1", "r"), ("i", "r"), ("o", "r")), ("n1",), ("r",)),
        (
            "  n  a ,i b,o c,  a b c ",
            (("n1", "a"), ("i", "b"), ("o", "c"), ("a", "b", "c")),
            ("n1",),
            ("a", "b", "c"),
        ),
        (
            "n1 r1, r1 n2 r2, r2 i r3, r3 o",
            (("n1", "r1"), ("r1", "n2", "r2"), ("r2", "i", "r3"), ("r3", "o")),
            ("n1", "n2"),
            ("r1", "r2", "r3"),
        ),
        ("n2 i o n1", (("n2", "i", "o", "n1"),), ("n1", "n2"), ()),
    ],
)
def test_parse_valid(spec, cores, experts, bonds):
    parsed = parse_spec(spec)
    assert parsed.core_legs == cores
    assert parsed.expert_legs == experts
    assert parsed.bonds == bonds


def test_canonical_spec_round_trips():
    parsed = parse_spec("  r0 n r1 ,r1 i   r2, r2 o r0")
    assert parsed.spec == "r0 n1 r1, r1 i r2, r2 o r0"
    assert parse_spec(parsed.spec) == parsed


@pytest.mark.parametrize(
    ("leg", "expected"),
    [
        ("n", True),
        ("n1", True),
        ("n12", True),
        ("n0", False),
        ("n01", False),
        ("nr", False),
        ("r", False),
        ("i", False),
    ],
)
def test_is_expert_leg(leg, expected):
    assert is_expert_leg(leg) is expected


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("", "the network spec is empty"),
        ("n r, , i r, o r", r"core 1 .* has no legs"),
        ("n r, i r, o r,", r"core 3 .* has no legs"),
        ("n r, i r-1, o r", r"invalid leg name 'r-1'"),
        ("n r r, i r, o r", r"leg 'r' is repeated inside core 0"),
        ("i r, o r", r"has no expert leg"),
        ("n r, i r, o r, n1 r", r"mixes the expert leg 'n' with 'n1'"),
        ("n1 r, n3 r, i r, o r", r"no n2; expert levels must be numbered n1..nE"),
        ("n r, o r", r"has no input leg 'i'"),
        ("n r, i r", r"has no output leg 'o'"),
        ("n r, i r, o q", r"bond 'q' appears only in core 2"),
        (
            "nr,ir,or",
            r"no 'n' leg but a leg 'nr' in core 0: legs are separated by white "
            r"space, e\.g\. 'n r'",
        ),
        ("n1 r, n2 r, ir, o r", r"no 'i' leg but a leg 'ir' in core 2.*'i r'"),
        ("n r, i r, or", r"no 'o' leg but a leg 'or' in core 2"),
        # Issue #26, item 7: 'out' was read as 'o' glued to 'ut'; 'i1' got 'i 1', refused.
        ("n r, i r, out r", r"a leg 'out' in core 2: the output leg is named 'o'\Z"),
        ("n r, input r, o r", r"a leg 'input' in core 1: the input leg is named 'i'\Z"),
        ("experts r, i r, o r", r"the expert leg is named 'n' \('n1', 'n2', \.\.\."),
        ("n r, i0 r, o r", r"a leg 'i0' in core 1: the input legs are 'i', or i1, i2, \.\.\."),
        ("n1 r, n2 r, i r, o3 r", r"has output legs o3 but no o1; output legs must be numbered"),
        ("n r, i r, i2 r, o r", r"mixes the input leg 'i' with 'i2'"),
        ("n r, i1 r, i3 r, o r", r"has input legs i1, i3 but no i2"),
        (
            "n r\uff0c i r\uff0c o r",
            r"separates cores with '\uff0c' \(U\+FF0C\); cores are "
            r"separated by the ASCII comma ','",
        ),
        ("n r, i r, o r\u00e9", r"invalid leg name 'r\u00e9': legs are ASCII identifiers"),
    ],
)
def test_invalid_specs_name_the_problem(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_spec(spec)


@given(custom_specs(), st.data())
def test_a_glued_role_legs_suggestion_is_a_valid_spec(spec, data):
    # Glue one role leg to the next leg of its core: the message's suggestion, put back
    # in its place, must parse (issue #26, item 7: 'i1' got the suggestion 'i 1').
    parsed = parse_spec(spec)
    cores = [list(legs) for legs in parsed.core_legs]
    roles = ["i", "o"] + (["n1"] if len(parsed.expert_legs) == 1 else [])
    holders = [
        (k, j)
        for k, legs in enumerate(cores)
        for j, leg in enumerate(legs[:-1])
        if leg in roles and sum(leg in c for c in cores) == 1
    ]
    if not holders:
        return
    k, j = data.draw(st.sampled_from(holders))
    role = "n" if cores[k][j] == "n1" else cores[k][j]
    if len(parsed.expert_legs) == 1:  # written 'n', as a user would
        cores = [["n" if leg == "n1" else leg for leg in legs] for legs in cores]
    glued = role + cores[k][j + 1]
    cores[k][j : j + 2] = [glued]
    broken = ", ".join(" ".join(legs) for legs in cores)
    with pytest.raises(ValueError) as caught:
        parse_spec(broken)
    message = str(caught.value)
    assert f"a leg {glued!r} in core {k}" in message
    suggestion = message.rsplit("e.g. ", 1)[-1].strip("'")
    repaired = broken.replace(glued, suggestion)
    assert parse_spec(repaired).core_legs == parse_spec(spec).core_legs


@pytest.mark.parametrize("spec", [None, 3, ["n r", "i r", "o r"]])
def test_spec_must_be_a_string(spec):
    with pytest.raises(TypeError, match="a network spec must be a str"):
        parse_spec(spec)


@given(custom_specs())
def test_generated_specs_parse(spec):
    parsed = parse_spec(spec)
    legs = [leg for core in parsed.core_legs for leg in core]
    roles = (*parsed.input_legs, *parsed.output_legs, *parsed.expert_legs)
    for role in roles:  # open legs: one core or shared (hyperedges)
        assert 1 <= legs.count(role) <= len(parsed.core_legs)
    for bond in parsed.bonds:
        assert legs.count(bond) >= 2
    assert parsed == parse_spec(parsed.spec)  # the canonical spec reads back the same


@given(custom_specs(), st.data())
def test_dropping_a_bond_occurrence_is_caught(spec, data):
    parsed = parse_spec(spec)
    if not parsed.bonds:
        return
    bond = data.draw(st.sampled_from(parsed.bonds))
    holders = [k for k, core in enumerate(parsed.core_legs) if bond in core]
    # Keep the bond in one core only: it becomes a dangling leg.
    cores = [
        [leg for leg in core if leg != bond or k == holders[0]]
        for k, core in enumerate(parsed.core_legs)
    ]
    if any(not core for core in cores):
        return
    mutated = ", ".join(" ".join(core) for core in cores)
    with pytest.raises(ValueError, match=f"bond '{bond}' appears only in core"):
        parse_spec(mutated)


@given(custom_specs(), st.data())
def test_removing_a_role_leg_is_caught(spec, data):
    # The first leg of each role (removing a later one of several can leave valid legs).
    parsed = parse_spec(spec)
    groups = (parsed.expert_legs, parsed.input_legs, parsed.output_legs)
    role = data.draw(st.sampled_from([leg for legs in groups for leg in legs[:1]]))
    cores = [[leg for leg in core if leg != role] for core in parsed.core_legs]
    if any(not core for core in cores):
        return
    mutated = ", ".join(" ".join(core) for core in cores)
    match = r"has no (input|output|expert) leg|no [nio]1|legs .* but no [nio][0-9]"
    with pytest.raises(ValueError, match=match):
        parse_spec(mutated)


def test_split_legs_parse_in_order_and_a_lone_numbered_leg_is_the_mode():
    parsed = parse_spec("n r0, r0 i2 o1 r1, r1 i1 o2")
    assert parsed.input_legs == ("i1", "i2") and parsed.output_legs == ("o1", "o2")
    assert parsed.bonds == ("r0", "r1")
    lone = parse_spec("n r, i1 r, o1 r")
    assert lone.core_legs == (("n1", "r"), ("i", "r"), ("o", "r")) and lone.input_legs == ("i",)


@given(st.text(alphabet="ni or0123 ,_\t-", max_size=30))
def test_any_text_parses_or_raises_value_error(text):
    """Garbage in gives a ValueError from the parser, never another exception."""
    try:
        parsed = parse_spec(text)
    except ValueError:
        return
    assert parse_spec(parsed.spec) == parsed


def test_long_specs_parse_in_linear_time_and_are_shortened_in_messages():
    # Parsing was quadratic in the legs of a core: an 80 kB spec took 5 s (issue #15,
    # item 11). A ratio of two sizes in the same run, not a time: linear is about 8x for
    # 8x the legs, quadratic 64x.
    import time

    def spec(n):
        legs = " ".join(f"a{k}" for k in range(n))
        return f"n r, i r, o r {legs}, {legs}"

    def seconds(text):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            parse_spec(text)
            times.append(time.perf_counter() - start)
        return min(times)

    small, large = spec(4_000), spec(32_000)
    assert seconds(large) / seconds(small) < 24
    with pytest.raises(ValueError, match=r"characters\)") as error:
        parse_spec(large.replace("n r, ", ""))  # no expert leg: the message quotes the spec
    assert len(str(error.value)) < 500
