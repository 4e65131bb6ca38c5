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


def guard_save_pretrained(model: Any, layers: list[str] | None = None) -> None:
    """Make ``save_pretrained`` refuse on every transformers model that holds a factored layer: the
    model itself and, given the factored ``layers``' names, each transformers model among their
    ancestors (a ``BertModel`` inside a sentence-transformers wrapper). No-op for other models.

    Calling the class's method directly (``type(model).save_pretrained(model, d)``) still bypasses
    this: only the instance is guarded, never transformers' classes.
    """
    targets = [model]
    for name in layers or []:
        parts = name.split(".")
        for i in range(1, len(parts)):
            try:
                targets.append(model.get_submodule(".".join(parts[:i])))
            except AttributeError:
                break
    seen: set[int] = set()
    for mod in targets:
        if id(mod) in seen or not is_transformers_model(mod) or "save_pretrained" in vars(mod):
            continue
        seen.add(id(mod))
        _guard(mod)


def _guard(model: Any) -> None:
    name = type(model).__name__

    def save_pretrained(*args: Any, **kwargs: Any) -> None:
        raise RmtpruneError(
            f"{name}.save_pretrained would write factored layers that transformers' from_pretrained "
            "silently re-initialises at random; save with rmtprune.save(model, DIR) and load with "
            "rmtprune.load(DIR)"
        )

    object.__setattr__(model, "save_pretrained", save_pretrained)
