"""``mumoe demo``: more experts, more specialised experts, on scikit-learn's digits.

The demo trains, on CPU and in seconds, a linear classifier and μMoE heads
with growing numbers of experts on the 8×8 digits that ship with
scikit-learn (nothing is downloaded), over several seeds, and measures what
the paper measures:

1. test accuracy, with every head's experts matched to one parameter budget;
2. the mean class-level polysemanticity of the experts
   (:func:`mumoe.analysis.polysemanticity`), which falls as experts are added;
3. the digits each expert processes (a PNG grid per head);
4. an edit: switching off the experts tied to one digit, and what that
   changes on that digit and on the others.

Every figure is reported as mean ± standard deviation over the seeds.  The
data flow: :mod:`~mumoe.demo.train` (one head, one seed: a
:class:`~mumoe.demo.train.Job`) → :mod:`~mumoe.demo.results` (per seed, and
as JSON) → :mod:`~mumoe.demo.report` and :mod:`~mumoe.demo.figures`;
:func:`run` drives them.  Run ``mumoe demo --help`` for the options.  It
needs the ``torch`` and ``demo`` extras (``pip install "mumoe[torch,demo]"``).
"""

from mumoe.demo.experiment import run
from mumoe.demo.results import DemoResult, EditResult, HeadResult

__all__ = ["DemoResult", "EditResult", "HeadResult", "run"]
