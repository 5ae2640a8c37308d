"""The torch modules' tests: the folder is skipped, with the reason, where torch is missing."""

import pytest

pytest.importorskip("torch", reason="mumoe.nn needs torch (pip install torch, then 'mumoe[torch]')")
