"""What ``mumoe demo`` measured, per head and per seed, and its JSON form.

Every figure is kept per seed (one entry per seed, in the order of
:attr:`DemoResult.seeds`); the report and the figures summarise them as
mean ± standard deviation.  :meth:`DemoResult.to_json` writes exactly what
was measured: no wall time, no thread count, so that two runs with the same
seeds give identical files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["JSON_VERSION", "DemoResult", "EditResult", "HeadResult", "mean_sd"]

#: Version of the layout :meth:`DemoResult.to_json` writes.
JSON_VERSION = 1


@dataclass
class HeadResult:
    """What one head scored, one entry per seed.

    Parameters
    ----------
    name : str
        ``"linear"`` or ``"cp N=128"``.
    n_experts : int
        0 for the linear baseline.
    rank : object
        The factorisation's rank (None for the linear baseline); the same for
        every seed.
    expert_params, gate_params : int
        Parameters of the experts (the cores; the weight and bias of the
        linear layer) and of the gate projection.
    accuracy : numpy.ndarray, shape (S,)
        Test accuracy, per seed.
    class_accuracy : numpy.ndarray, shape (S, 10)
        Test accuracy on each digit, per seed.
    polysemanticity : numpy.ndarray, shape (S,)
        Mean class-level polysemanticity over the experts that process at
        least ``MIN_COUNT`` digits, per seed (NaN for the linear baseline, and
        for a seed where no expert does).
    experts_counted : numpy.ndarray of int, shape (S,)
        How many experts that is, per seed (0 for the linear baseline).
    histograms : list of numpy.ndarray, shape (N, 10)
        Each seed's class histogram of every expert, over all digits (empty
        for the linear baseline).

    Examples
    --------
    >>> import numpy as np
    >>> head = HeadResult("cp N=4", 4, 19, 5135, 256, np.array([0.95, 0.97]),
    ...                   np.full((2, 10), 0.96), np.array([0.4, 0.5]), np.array([4, 3]))
    >>> head.expert_params + head.gate_params, float(head.accuracy.mean())
    (5391, 0.96)
    """

    name: str
    n_experts: int
    rank: Any
    expert_params: int
    gate_params: int
    accuracy: np.ndarray
    class_accuracy: np.ndarray
    polysemanticity: np.ndarray
    experts_counted: np.ndarray
    histograms: list[np.ndarray] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The head as the JSON object described in :meth:`DemoResult.to_json`.

        Returns
        -------
        dict

        Examples
        --------
        >>> import numpy as np
        >>> head = HeadResult("linear", 0, None, 650, 0, np.array([0.9]), np.full((1, 10), 0.9),
        ...                   np.array([np.nan]), np.array([0]))
        >>> head.to_json()["experts"], head.to_json()["accuracy"]
        (None, [0.9])
        """
        linear = self.n_experts == 0
        return {
            "name": self.name,
            "experts": None if linear else self.n_experts,
            "rank": _plain(self.rank),
            "expert_params": self.expert_params,
            "gate_params": self.gate_params,
            "accuracy": self.accuracy.tolist(),
            "class_accuracy": self.class_accuracy.tolist(),
            "polysemanticity": None if linear else [_number(p) for p in self.polysemanticity],
            "experts_counted": None if linear else self.experts_counted.tolist(),
        }


@dataclass
class EditResult:
    """One seed's edit: the experts of one digit switched off in the largest head.

    Parameters
    ----------
    seed : int
    digit : int
        The digit whose experts were switched off.
    experts : list of int
        Those experts: each receives at least ``TIED_SHARE`` of its gate mass
        from ``digit``.
    share : float
        The share of ``digit``'s gate mass (summed over its samples) that
        those experts carry.  With no ``edit_class`` given, the demo edits
        the digit where this share is largest: the digit whose experts are
        most specialised.
    before, after : numpy.ndarray, shape (10,)
        Test accuracy on each digit without and with the edit.

    Examples
    --------
    >>> import numpy as np
    >>> before = np.full(10, 0.9)
    >>> after = before.copy(); after[4] = 0.5; after[7] = 0.8
    >>> edit = EditResult(0, 4, [1, 5], 0.6, before, after)
    >>> round(edit.change_on_digit, 3), round(edit.change_on_others, 3)
    (-0.4, -0.011)
    """

    seed: int
    digit: int
    experts: list[int]
    share: float
    before: np.ndarray
    after: np.ndarray

    @property
    def change_on_digit(self) -> float:
        """Accuracy on the edited digit, after minus before.

        Examples
        --------
        >>> import numpy as np
        >>> round(EditResult(0, 1, [3], 0.9, np.full(10, 0.9), np.full(10, 0.8)).change_on_digit, 6)
        -0.1
        """
        return float(self.after[self.digit] - self.before[self.digit])

    @property
    def change_on_others(self) -> float:
        """Mean accuracy on the other nine digits, after minus before.

        Examples
        --------
        >>> import numpy as np
        >>> EditResult(0, 1, [3], 0.9, np.full(10, 0.9), np.full(10, 0.9)).change_on_others
        0.0
        """
        others = np.delete(np.arange(self.before.size), self.digit)
        return float(self.after[others].mean() - self.before[others].mean())


@dataclass
class DemoResult:
    """Every head over every seed, the edits, and the figures written.

    Parameters
    ----------
    seeds : list of int
    heads : list of HeadResult
        The linear baseline first, then the μMoE heads by expert count.
    settings : dict
        The options that decide the numbers (expert counts, network, budget,
        epochs, edit class).
    edit_experts : int
        Expert count of the edited head (the largest).
    edits : list of EditResult or None
        One per seed; None where no expert of that seed's head is tied to a
        digit (nothing to switch off).
    figures : list of pathlib.Path
        The PNG files written.

    Examples
    --------
    >>> import numpy as np
    >>> linear = HeadResult("linear", 0, None, 650, 0, np.array([0.9]), np.full((1, 10), 0.9),
    ...                     np.array([np.nan]), np.array([0]))
    >>> written = DemoResult([0], [linear], {}, 0, [None], []).to_json()
    >>> written["heads"][0]["polysemanticity"] is None, written["edit"]["digit"]
    (True, [None])
    """

    seeds: list[int]
    heads: list[HeadResult]
    settings: dict[str, Any]
    edit_experts: int
    edits: list[EditResult | None]
    figures: list[Path] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The results as plain JSON types: what ``mumoe demo --json`` writes.

        Returns
        -------
        dict
            ``{"version": 1, "seeds": [...], "settings": {...}, "heads": [...],
            "edit": {...}}``.  Each head is ``{"name": str, "experts": int
            (null for the linear head), "rank", "expert_params",
            "gate_params", "accuracy": [one per seed], "class_accuracy":
            [per seed, 10 digits], "polysemanticity": [one per seed; null
            for the linear head], "experts_counted": [one per seed; null for
            the linear head]}``.  ``"edit"`` is ``{"experts": N of the edited
            head, "digit", "experts_switched_off", "share",
            "accuracy_before", "accuracy_after", "change_on_digit",
            "change_on_others"}``, each a list with one entry per seed (null
            for a seed with nothing to switch off).  NaN is written as null.

        Examples
        --------
        >>> import numpy as np
        >>> linear = HeadResult("linear", 0, None, 650, 0, np.array([0.9]),
        ...                     np.full((1, 10), 0.9), np.array([np.nan]), np.array([0]))
        >>> sorted(DemoResult([0], [linear], {}, 0, [None]).to_json())
        ['edit', 'heads', 'seeds', 'settings', 'version']
        """
        per_seed = {
            "digit": lambda e: e.digit,
            "experts_switched_off": lambda e: e.experts,
            "share": lambda e: e.share,
            "accuracy_before": lambda e: e.before.tolist(),
            "accuracy_after": lambda e: e.after.tolist(),
            "change_on_digit": lambda e: e.change_on_digit,
            "change_on_others": lambda e: e.change_on_others,
        }
        edit: dict[str, Any] = {"experts": self.edit_experts}
        for key, value in per_seed.items():
            edit[key] = [None if e is None else value(e) for e in self.edits]
        return {
            "version": JSON_VERSION,
            "seeds": list(self.seeds),
            "settings": {key: _plain(value) for key, value in self.settings.items()},
            "heads": [head.to_json() for head in self.heads],
            "edit": edit,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DemoResult:
        """The result back from :meth:`to_json`'s form (without histograms or figures).

        Parameters
        ----------
        data : dict
            What :meth:`to_json` returned (or ``json.load`` read from ``--json``).

        Returns
        -------
        DemoResult

        Raises
        ------
        ValueError
            For another layout version.

        Examples
        --------
        >>> import numpy as np
        >>> linear = HeadResult("linear", 0, None, 650, 0, np.array([0.9]),
        ...                     np.full((1, 10), 0.9), np.array([np.nan]), np.array([0]))
        >>> result = DemoResult([0], [linear], {"budget": 8}, 0, [None])
        >>> DemoResult.from_json(result.to_json()).to_json() == result.to_json()
        True
        """
        if data.get("version") != JSON_VERSION:
            raise ValueError(
                f"expected mumoe demo results of version {JSON_VERSION}, got version "
                f"{data.get('version')!r}"
            )
        seeds = [int(s) for s in data["seeds"]]
        heads = []
        for head in data["heads"]:
            linear = head["experts"] is None
            poly = [math.nan] * len(seeds) if linear else head["polysemanticity"]
            heads.append(
                HeadResult(
                    head["name"],
                    0 if linear else int(head["experts"]),
                    _tuple(head["rank"]),
                    head["expert_params"],
                    head["gate_params"],
                    np.array(head["accuracy"], dtype=float),
                    np.array(head["class_accuracy"], dtype=float),
                    np.array([math.nan if p is None else p for p in poly], dtype=float),
                    np.zeros(len(seeds), int) if linear else np.array(head["experts_counted"]),
                )
            )
        edit = data["edit"]
        edits: list[EditResult | None] = [
            None
            if edit["digit"][k] is None
            else EditResult(
                seed,
                edit["digit"][k],
                list(edit["experts_switched_off"][k]),
                edit["share"][k],
                np.array(edit["accuracy_before"][k]),
                np.array(edit["accuracy_after"][k]),
            )
            for k, seed in enumerate(seeds)
        ]
        return cls(seeds, heads, dict(data["settings"]), edit["experts"], edits)


def mean_sd(values: Any) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for one value) over the finite values.

    Examples
    --------
    >>> [round(v, 6) for v in mean_sd([0.5, 0.7, float("nan")])]
    [0.6, 0.141421]
    >>> mean_sd([0.5])
    (0.5, 0.0)
    """
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return math.nan, math.nan
    sd = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
    return float(finite.mean()), sd


def _number(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def _tuple(value: Any) -> Any:
    """JSON's lists back as the tuples a rank is written with."""
    return tuple(value) if isinstance(value, list) else value


def _plain(value: Any) -> Any:
    """Tuples as lists, NumPy scalars as Python numbers: what ``json`` writes."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value
