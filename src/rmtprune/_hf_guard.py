"""Keep transformers' own ``save_pretrained`` from writing a factored model it cannot read back.

After rmtprune replaces layers of a transformers model by factored ones, the model's state dict
holds ``first``/``second`` factors where ``config.json`` describes dense layers. Saved with
``model.save_pretrained`` and read with ``from_pretrained``, those layers would be silently
initialised at random. :func:`guard_save_pretrained` replaces the instance's ``save_pretrained``
by one that refuses with the call to make instead (``rmtprune.save(model, DIR)``).
"""

from __future__ import annotations

from typing import Any

from .errors import RmtpruneError


def is_transformers_model(model: Any) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (checked without importing transformers)."""
    return any(
        c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.")
        for c in type(model).__mro__
    )


def guard_save_pretrained(model: Any) -> None:
    """Make ``model.save_pretrained`` refuse (a transformers model with factored layers); no-op otherwise."""
    if not is_transformers_model(model) or "save_pretrained" in vars(model):
        return
    name = type(model).__name__

    def save_pretrained(*args: Any, **kwargs: Any) -> None:
        raise RmtpruneError(
            f"{name}.save_pretrained would write factored layers that transformers' from_pretrained "
            "silently re-initialises at random; save with rmtprune.save(model, DIR) and load with "
            "rmtprune.load(DIR)"
        )

    object.__setattr__(model, "save_pretrained", save_pretrained)
