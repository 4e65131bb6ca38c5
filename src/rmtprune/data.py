"""Deprecated alias of :mod:`rmtprune.zoo.data` (the experiment datasets moved into the zoo).

``import rmtprune.data`` still works for one release and gives the very same module object as
``rmtprune.zoo.data`` (so patching ``rmtprune.data.X`` patches the zoo), with a
``DeprecationWarning`` on first import.
"""

from __future__ import annotations

import sys
import warnings

from .zoo import data as _data

warnings.warn(
    "rmtprune.data is deprecated and will be removed in the next release; use rmtprune.zoo.data",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _data
