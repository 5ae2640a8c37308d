r"""Parse and check the spec string of a tensor network.

A spec names the legs of each core, cores separated by commas and legs by
white space, for instance ``"n r, i r, o r"`` (CP) or
``"r0 n r1, r1 i r2, r2 o r0"`` (tensor ring).  Three kinds of leg carry a
role in Eq. (1) of the paper:

``n`` or ``n1, n2, ..., nE``
    the expert modes, one per expert level (``n`` is short for ``n1`` when
    there is a single level);
``i`` or ``i1, i2, ..., iK``
    the input mode (of size ``in_features``, plus one with a bias), or the
    legs it is split into (``x`` reshaped row-major to ``in_shape``);
``o`` or ``o1, o2, ..., oL``
    the output mode, or the legs it is split into (``out_shape``).

Every other name is a *bond*: it is summed over, appears in two or more
cores (three or more makes a hyperedge, as in CP), and takes its size from
the ranks.  A role leg may appear in several cores too (an *open
hyperedge*): it is shared like a bond but stays open, so the cores act
elementwise along it.  ``"n o, i o"`` is MxD's Hadamard factorisation
:math:`\mathcal{W}[n, i, o] = C[n, o] D[i, o]`, and ``"n i r, n o r"`` gives
every expert a low-rank matrix :math:`U_n V_n^\top`.  This module knows only
the structure; sizes live in :class:`mumoe.spec.Network`.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass

__all__ = [
    "INPUT",
    "OUTPUT",
    "ParsedSpec",
    "is_expert_leg",
    "is_input_leg",
    "is_output_leg",
    "is_role_leg",
    "parse_spec",
]

INPUT = "i"
OUTPUT = "o"
_LEG = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_EXPERT = re.compile(r"n([1-9][0-9]*)?\Z")
#: The role legs by role: one unnumbered leg, or legs numbered from 1.
_ROLE = {
    "n": _EXPERT,
    "i": re.compile(r"i([1-9][0-9]*)?\Z"),
    "o": re.compile(r"o([1-9][0-9]*)?\Z"),
}


#: A role leg glued to the next leg: the role, then the rest (itself a leg name).
_GLUED = {
    "n": re.compile(r"(n[1-9][0-9]*|n)([A-Za-z_][A-Za-z0-9_]*)\Z"),
    INPUT: re.compile(r"(i[1-9][0-9]*|i)([A-Za-z_][A-Za-z0-9_]*)\Z"),
    OUTPUT: re.compile(r"(o[1-9][0-9]*|o)([A-Za-z_][A-Za-z0-9_]*)\Z"),
}
#: A role leg numbered from 0 ('n0', 'i0', 'o00').
_FROM_ZERO = {role: re.compile(rf"{role}0[0-9]*\Z") for role in ("n", INPUT, OUTPUT)}
#: Role legs spelled out as words.
_WORDS = {
    "n": ("expert", "experts"),
    INPUT: ("in", "inp", "input", "inputs"),
    OUTPUT: ("out", "output", "outputs"),
}
_ROLE_NAMES = {"n": "expert", INPUT: "input", OUTPUT: "output"}

#: Commas of other scripts that look like ','.
_LOOKALIKE_COMMAS = ("\uff0c", "\u3001", "\ufe50", "\u060c")


def _refuse_glued_legs(spec: str, where: dict[str, list[int]]) -> None:
    # "nr, ir, or": a role leg glued to a bond reads as one bond and the role goes
    # missing; say so, rather than that the spec has no input leg.  Each suggestion
    # is itself a valid spec fragment.
    for role in ("n", INPUT, OUTPUT):
        if any(_ROLE[role].match(leg) for leg in where):
            continue
        for leg in where:
            found = (
                f"spec {_quote(spec)} has no {role!r} leg but a leg {leg!r} in core {where[leg][0]}"
            )
            glued = None if is_role_leg(leg) else _GLUED[role].match(leg)
            # 'in' is 'i' glued to 'n' where 'n' is a leg; 'out' is a word ('ut' is no leg).
            if glued is not None and _is_leg_of(glued.group(2), where):
                raise ValueError(f"{found}: {_separated(glued)}")
            if leg.lower() in _WORDS[role]:
                several = " ('n1', 'n2', ... for several levels)" if role == "n" else ""
                raise ValueError(f"{found}: the {_ROLE_NAMES[role]} leg is named {role!r}{several}")
            if _FROM_ZERO[role].match(leg):
                raise ValueError(
                    f"{found}: the {_ROLE_NAMES[role]} legs are {role!r}, or {role}1, {role}2, "
                    "... numbered from 1"
                )
            if glued is not None:
                raise ValueError(f"{found}: {_separated(glued)}")


def _is_leg_of(name: str, where: dict[str, list[int]]) -> bool:
    return name in where or is_role_leg(name)


def _separated(glued: re.Match[str]) -> str:
    return f"legs are separated by white space, e.g. '{glued.group(1)} {glued.group(2)}'"


def is_expert_leg(leg: str) -> bool:
    """Return whether ``leg`` names an expert mode (``n`` or ``n1``, ``n2``, ...).

    Parameters
    ----------
    leg : str

    Returns
    -------
    bool

    Examples
    --------
    >>> [is_expert_leg(leg) for leg in ("n", "n2", "n0", "i", "r")]
    [True, True, False, False, False]
    """
    return _EXPERT.match(leg) is not None


def is_input_leg(leg: str) -> bool:
    """Return whether ``leg`` names the input mode or one of its legs (``i`` or ``i1``, ...).

    Parameters
    ----------
    leg : str

    Returns
    -------
    bool

    Examples
    --------
    >>> [is_input_leg(leg) for leg in ("i", "i2", "i0", "o", "ir")]
    [True, True, False, False, False]
    """
    return _ROLE[INPUT].match(leg) is not None


def is_output_leg(leg: str) -> bool:
    """Return whether ``leg`` names the output mode or one of its legs (``o`` or ``o1``, ...).

    Parameters
    ----------
    leg : str

    Returns
    -------
    bool

    Examples
    --------
    >>> [is_output_leg(leg) for leg in ("o", "o3", "i")]
    [True, True, False]
    """
    return _ROLE[OUTPUT].match(leg) is not None


def is_role_leg(leg: str) -> bool:
    """Return whether ``leg`` is an expert, input or output leg: open, never summed.

    Parameters
    ----------
    leg : str

    Returns
    -------
    bool

    Examples
    --------
    >>> [is_role_leg(leg) for leg in ("n2", "i", "o1", "r")]
    [True, True, True, False]
    """
    return is_expert_leg(leg) or is_input_leg(leg) or is_output_leg(leg)


@dataclass(frozen=True)
class ParsedSpec:
    """The structure of a tensor network, as written in its spec.

    Parameters
    ----------
    core_legs : tuple of tuple of str
        The legs of each core, in storage order.
    expert_legs : tuple of str
        The expert legs ``("n1", ..., "nE")``, in level order.  A spec that
        writes a single ``n`` is normalised to ``("n1",)``.
    bonds : tuple of str
        The summed legs, in order of first appearance.
    input_legs, output_legs : tuple of str
        ``("i",)``, or the legs ``("i1", ..., "iK")`` the input is split
        into, in row-major order; the same for the output.  A lone ``i1``
        (``o1``) is renamed ``i`` (``o``).

    Examples
    --------
    >>> parse_spec("n r, i r, o r")  # doctest: +NORMALIZE_WHITESPACE
    ParsedSpec(core_legs=(('n1', 'r'), ('i', 'r'), ('o', 'r')), expert_legs=('n1',),
               bonds=('r',), input_legs=('i',), output_legs=('o',))
    >>> parse_spec("n r0, r0 i1 o1 r1, r1 i2 o2").input_legs
    ('i1', 'i2')
    """

    core_legs: tuple[tuple[str, ...], ...]
    expert_legs: tuple[str, ...]
    bonds: tuple[str, ...]
    input_legs: tuple[str, ...] = (INPUT,)
    output_legs: tuple[str, ...] = (OUTPUT,)

    @property
    def spec(self) -> str:
        """The canonical spec string (single spaces, ``", "`` between cores).

        Examples
        --------
        >>> parse_spec("n   r,i r ,  o r").spec
        'n1 r, i r, o r'
        """
        return ", ".join(" ".join(legs) for legs in self.core_legs)


def _quote(spec: str, limit: int = 200) -> str:
    # A spec in an error message, shortened: a long spec must not make a long message.
    return repr(spec) if len(spec) <= limit else f"{spec[:limit]!r}... ({len(spec):,} characters)"


def parse_spec(spec: str) -> ParsedSpec:
    """Parse a spec string and check that it describes a valid μMoE network.

    Parameters
    ----------
    spec : str
        Cores separated by commas, legs separated by white space.

    Returns
    -------
    ParsedSpec
        The cores, expert, input and output legs, and bonds.  A lone expert
        leg ``n`` is renamed ``n1``; a lone ``i1`` (``o1``) is renamed ``i``
        (``o``).

    Raises
    ------
    TypeError
        If ``spec`` is not a string.
    ValueError
        If a core is empty, cores are separated by anything but ASCII commas,
        a leg is not an ASCII identifier, a leg is repeated in one core, a
        role leg (``n``/``nE``, ``i``/``iK``, ``o``/``oL``) is missing (or
        glued to the next leg), the legs of a role skip a number or mix the
        unnumbered leg with numbered ones, or a bond appears in only one core.

    Examples
    --------
    >>> parse_spec("n r, i r, o r").core_legs
    (('n1', 'r'), ('i', 'r'), ('o', 'r'))
    >>> parse_spec("r0 n1 r1, r1 n2 r2, r2 i r3, r3 o r0").bonds
    ('r0', 'r1', 'r2', 'r3')
    >>> parse_spec("n o, i o").core_legs  # MxD: the output leg shared, kept open
    (('n1', 'o'), ('i', 'o'))
    >>> parse_spec("n r0, r0 i1 o1 r1, r1 i2 o2").output_legs  # a TT-matrix
    ('o1', 'o2')
    """
    if not isinstance(spec, str):
        raise TypeError(f"a network spec must be a str such as 'n r, i r, o r', got {spec!r}")
    if not spec.strip():
        raise ValueError("the network spec is empty; expected cores such as 'n r, i r, o r'")

    for mark in _LOOKALIKE_COMMAS:
        if mark in spec:
            raise ValueError(
                f"spec {_quote(spec)} separates cores with {mark!r} (U+{ord(mark):04X}); cores are "
                "separated by the ASCII comma ',', e.g. 'n r, i r, o r'"
            )
    cores: list[tuple[str, ...]] = []
    for k, text in enumerate(spec.split(",")):
        legs = tuple(text.split())
        if not legs:
            raise ValueError(
                f"core {k} of spec {_quote(spec)} has no legs; separate cores with single commas"
            )
        for leg in legs:
            if not _LEG.match(leg):
                raise ValueError(
                    f"core {k} ({text.strip()!r}) has an invalid leg name {leg!r}: "
                    "legs are ASCII identifiers (letters, digits and '_', not starting "
                    "with a digit) such as 'n1', 'i', 'o' or 'r2'"
                )
        counts = collections.Counter(legs)  # linear: legs.count per leg was quadratic
        repeated = sorted(leg for leg, count in counts.items() if count > 1)
        if repeated:
            raise ValueError(
                f"leg {repeated[0]!r} is repeated inside core {k} ({text.strip()!r}); "
                "each leg may appear once per core (a trace is not a μMoE weight)"
            )
        cores.append(legs)

    where: dict[str, list[int]] = {}
    for k, legs in enumerate(cores):
        for leg in legs:
            where.setdefault(leg, []).append(k)

    _refuse_glued_legs(spec, where)
    expert_legs = _numbered_legs(spec, where, "n")
    input_legs = _numbered_legs(spec, where, INPUT)
    output_legs = _numbered_legs(spec, where, OUTPUT)

    bonds = tuple(leg for leg in where if not is_role_leg(leg))
    for bond in bonds:
        if len(where[bond]) < 2:
            raise ValueError(
                f"bond {bond!r} appears only in core {where[bond][0]} of spec {_quote(spec)}; "
                "a bond must join two or more cores (open legs are the expert, input and "
                "output legs)"
            )

    # The canonical names: one expert level is 'n1', an unsplit input 'i' and output 'o'.
    rename = {"n": "n1"}
    if input_legs == ("i1",):
        rename["i1"] = INPUT
    if output_legs == ("o1",):
        rename["o1"] = OUTPUT
    cores = [tuple(rename.get(leg, leg) for leg in legs) for legs in cores]
    return ParsedSpec(
        core_legs=tuple(cores),
        expert_legs=tuple(rename.get(leg, leg) for leg in expert_legs),
        bonds=bonds,
        input_legs=tuple(rename.get(leg, leg) for leg in input_legs),
        output_legs=tuple(rename.get(leg, leg) for leg in output_legs),
    )


#: What each role's legs are called in messages, and how many levels they are.
_PLURAL = {"n": "expert levels", INPUT: "input legs", OUTPUT: "output legs"}


def _numbered_legs(spec: str, where: dict[str, list[int]], role: str) -> tuple[str, ...]:
    # The legs of one role in level order: the lone unnumbered leg, or role1..roleK
    # without gaps (never both).
    names = [leg for leg in where if _ROLE[role].match(leg)]
    name = _ROLE_NAMES[role]
    if not names:
        if role == "n":
            raise ValueError(
                f"spec {_quote(spec)} has no expert leg: name the expert modes 'n' (one level) "
                "or 'n1', 'n2', ... (several levels)"
            )
        raise ValueError(
            f"spec {_quote(spec)} has no {name} leg {role!r}; every μMoE network has one "
            f"(or several: {role}1, {role}2, ...)"
        )
    if role in names and len(names) > 1:
        others = ", ".join(repr(leg) for leg in names if leg != role)
        several = "expert level" if role == "n" else f"{name} leg"
        raise ValueError(
            f"spec {_quote(spec)} mixes the {name} leg {role!r} with {others}; use {role!r} for a "
            f"single {several} or '{role}1', '{role}2', ... for several"
        )
    if names == [role]:
        return (role,)
    zero = next((leg for leg in where if _FROM_ZERO[role].match(leg)), None)
    if zero is not None:
        raise ValueError(
            f"spec {_quote(spec)} has {name} legs {', '.join(names)} and a leg {zero!r}: the "
            f"{name} legs are numbered from 1 ({role}1, {role}2, ...)"
        )
    levels = sorted(int(leg[1:]) for leg in names)
    missing = sorted(set(range(1, levels[-1] + 1)) - set(levels))
    if missing:
        letter = "E" if role == "n" else "K" if role == INPUT else "L"
        raise ValueError(
            f"spec {_quote(spec)} has {name} legs {', '.join(f'{role}{e}' for e in levels)} but "
            f"no {role}{missing[0]}; {_PLURAL[role]} must be numbered {role}1..{role}{letter} "
            "without gaps"
        )
    return tuple(f"{role}{e}" for e in levels)
