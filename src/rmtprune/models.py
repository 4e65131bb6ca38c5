"""Deprecated alias of :mod:`rmtprune.zoo.models` (the reference models moved into the zoo).

``import rmtprune.models`` still works for one release and gives the very same module object as
``rmtprune.zoo.models``, with a ``DeprecationWarning`` on first import.
"""

from __future__ import annotations

import sys
import warnings

from .zoo import models as _models

warnings.warn(
    "rmtprune.models is deprecated and will be removed in the next release; use rmtprune.zoo.models",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _models
