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
data flow, in private modules: ``_train`` (one head, one seed: a ``Job``) →
``_results`` (per seed, and as JSON) → ``_report`` and ``_figures``;
:func:`run` (``_experiment``) drives them.  Run ``mumoe demo --help`` for the options.  It
needs the ``torch`` and ``demo`` extras (``pip install "mumoe[torch,demo]"``).

``mumoe demo lm`` (:func:`run_lm`, ``_lm``) is the second main job: a small
language model's MLP decomposed into experts (it needs the ``models`` extra too).
"""

from mumoe.demo._experiment import run
from mumoe.demo._lm import run_lm
from mumoe.demo._results import DemoResult, EditResult, HeadResult

__all__ = ["DemoResult", "EditResult", "HeadResult", "run", "run_lm"]
