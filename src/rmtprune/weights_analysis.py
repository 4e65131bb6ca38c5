"""Analyse every weight matrix of a weights file, one tensor in memory at a time (``rmtprune analyze``).

:func:`analyze_file` reads through :mod:`rmtprune.weights_file` and fits each 2-D/4-D float tensor
with :func:`rmtprune.analysis.analyze_tensor`; the result is a :class:`FileAnalysis`.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._validate import check_patterns
from .analysis import VERDICTS, LayerAnalysis, _check_conv, finish_tensor, metrics_summary, singular_values
from .config import FitConfig, match_pattern
from .spectral import DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_KS_MAX
from .weights_file import TensorInfo, _iter_source, _open, numpy_readable

__all__ = [
    "IgnoredTensor",
    "FileAnalysis",
    "CheckpointAnalysis",
    "analyze_file",
    "analyze_checkpoint",
    "IGNORE_REASONS",
]


IGNORE_REASONS = ("non-float", "1-d", "other-ndim", "empty")

#: Verdicts a file's tensor can get (``skip`` is for a model's layers, never a file's tensors).
FILE_VERDICTS = tuple(v for v in VERDICTS if v != "skip")

_REASON_LABELS = {
    "non-float": "non-float",
    "1-d": "1-D/scalar",
    "other-ndim": "3-D or 5-D+",
    "empty": "empty",
}


@dataclass(frozen=True)
class IgnoredTensor:
    """A tensor that was not analysed and why (``reason`` is one of :data:`IGNORE_REASONS`)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "reason": self.reason}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


# ------------------------------------------------------------------------------------------- patterns

# Only a regular expression has these (a glob has * ? [...] and nothing else): ^ $ ( ) + | \\ { },
# or ".*" inside a name (".*" ending a pattern or before a dot, "features.*", "layers.*.weight", is
# the glob "any components").
_REGEX_ONLY = re.compile(r"[\^$()+|\\{}]|\.\*(?=[^.])")
_GLOB_CLASS = re.compile(r"\[!?\]?[^\]]*\]")


@dataclass(frozen=True)
class _Pattern:
    """One include/exclude pattern: a glob (the library's language), or a regex accepted for a release."""

    text: str
    regex: re.Pattern[str] | None

    def matches(self, name: str) -> bool:
        """Glob: the tensor's name or the name of a module holding it matches (``fc1`` keeps
        ``fc1.weight``, ``encoder`` keeps ``model.encoder.0.weight``); regex: ``re.search``."""
        if self.regex is not None:
            return self.regex.search(name) is not None
        parts = name.split(".")
        return any(match_pattern(".".join(parts[:k]), self.text) for k in range(len(parts), 0, -1))


def _as_glob(regex: str) -> str | None:
    """The glob a simple regex means (``^fc`` -> ``fc*``, ``\\.weight$`` -> ``*.weight``), or None."""
    body = regex.removeprefix("^")
    anchored_end = body.endswith("$") and not body.endswith("\\$")
    body = body.removesuffix("$") if anchored_end else body
    body = body.replace(".*", "*").replace("\\.", "\0").replace(".", "?").replace("\0", ".")
    if _REGEX_ONLY.search(body.replace(".*", "")) or "[" in body:
        return None
    glob = ("" if regex.startswith("^") else "*") + body + ("" if anchored_end else "*")
    return re.sub(r"\*+", "*", glob)


def _compile_patterns(
    patterns: str | Iterable[str] | None, option: str, *, regex: bool = False
) -> tuple[_Pattern, ...]:
    """Check ``include``/``exclude`` patterns: globs, or (deprecated) regexes, with a warning for each.

    ``regex``: every pattern is a regular expression (``re.search``), as the deprecated
    :func:`analyze_checkpoint` has always read them.
    """
    if patterns is None:
        return ()
    out = []
    for pat in check_patterns(option, patterns if isinstance(patterns, str) else list(patterns)):
        if regex:
            try:
                out.append(_Pattern(pat, re.compile(pat)))
            except re.error as exc:
                raise ValueError(
                    f"{option} pattern {pat!r} is not a valid regular expression: {exc}"
                ) from None
            continue
        for cls in _GLOB_CLASS.findall(pat):  # [z-a] is an error in both languages
            try:
                re.compile(cls.replace("[!", "[^", 1))
            except re.error as exc:
                raise ValueError(
                    f"{option} pattern {pat!r} is not a valid regular expression or glob: {exc}"
                ) from None
        if not _REGEX_ONLY.search(pat):
            out.append(_Pattern(pat, None))
            continue
        try:
            compiled = re.compile(pat)
        except re.error as exc:
            raise ValueError(f"{option} pattern {pat!r} is not a valid regular expression: {exc}") from None
        glob = _as_glob(pat)
        how = f"write it as {glob!r}" if glob else "write it as a glob (* ? [...] on dotted names)"
        warnings.warn(
            f"{option} pattern '{pat}' is a regular expression; analyze patterns are shell globs, as in "
            f"compress and sparsify (regexes are accepted until the next release): {how}",
            DeprecationWarning,
            stacklevel=3,
        )
        out.append(_Pattern(pat, compiled))
    return tuple(out)


def _ignore_reason(info: TensorInfo) -> str | None:
    if not info.is_float:
        return "non-float"
    if len(info.shape) <= 1:
        return "1-d"
    if len(info.shape) not in (2, 4):
        return "other-ndim"
    if info.numel == 0:
        return "empty"
    return None


@dataclass
class FileAnalysis:
    """Result of :func:`analyze_file`: one :class:`LayerAnalysis` per 2-D/4-D float tensor.

    ``ignored`` lists the tensors that matched the filters but were not analysed, with the reason;
    ``n_tensors`` counts every tensor in the file and ``n_matched`` those the include/exclude
    patterns kept.
    """

    path: str
    format: str
    layers: list[LayerAnalysis]
    ignored: list[IgnoredTensor] = field(default_factory=list)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    n_tensors: int = 0
    n_matched: int = 0
    alpha: float = DEFAULT_ALPHA
    beta: float = DEFAULT_BETA
    ks_max: float = DEFAULT_KS_MAX
    unwrapped: tuple[str, ...] = ()
    noise: str = "mp"

    @property
    def counts(self) -> dict[str, int]:
        """Number of layers per verdict (every verdict present, in :data:`FILE_VERDICTS` order)."""
        c = Counter(la.verdict for la in self.layers)
        return {v: c.get(v, 0) for v in FILE_VERDICTS}

    @property
    def ignored_counts(self) -> dict[str, int]:
        """Number of ignored tensors per reason (every reason present)."""
        c = Counter(t.reason for t in self.ignored)
        return {r: c.get(r, 0) for r in IGNORE_REASONS}

    @property
    def has_invalid(self) -> bool:
        """Whether any layer has NaN/Inf weights (verdict ``invalid``)."""
        return any(la.verdict == "invalid" for la in self.layers)

    @property
    def invalid_layers(self) -> list[str]:
        """Names of the layers with verdict ``invalid``."""
        return [la.name for la in self.layers if la.verdict == "invalid"]

    def summary(self) -> str:
        """One line: layers per verdict, ignored tensors per reason, tensors filtered out."""
        counts = ", ".join(f"{n} {v}" for v, n in self.counts.items())
        out = f"{_plural(len(self.layers), 'layer')} analysed ({counts})"
        ign = ", ".join(f"{n} {_REASON_LABELS[r]}" for r, n in self.ignored_counts.items() if n)
        out += f"; {_plural(len(self.ignored), 'tensor')} ignored" + (f" ({ign})" if ign else "")
        if self.include or self.exclude:
            dropped = self.n_tensors - self.n_matched
            out += f"; {dropped} of {self.n_tensors} tensors filtered out by include/exclude"
        return out

    def metrics_summary(self) -> dict[str, Any] | None:
        """Model-level summary of the layers' ESD metrics (None when no layer has metrics)."""
        return metrics_summary(self.layers)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of the whole analysis (``ks_max`` None: the gate was off, ``inf``)."""
        from . import __version__

        return {
            "rmtprune_version": __version__,
            "checkpoint": self.path,  # the key analysis JSON has always had (tools read it)
            "format": self.format,
            "unwrapped": list(self.unwrapped),
            "alpha": self.alpha,
            "beta": self.beta,
            "ks_max": None if math.isinf(self.ks_max) else self.ks_max,
            "noise": self.noise,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "n_tensors": self.n_tensors,
            "n_matched": self.n_matched,
            "counts": self.counts,
            "ignored_counts": self.ignored_counts,
            "summary": self.metrics_summary(),
            "layers": [la.to_dict() for la in self.layers],
            "ignored": [t.to_dict() for t in self.ignored],
        }


#: Deprecated name of :class:`FileAnalysis` (kept for one release).
CheckpointAnalysis = FileAnalysis


def analyze_file(
    path: str | os.PathLike[str],
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    ks_max: float | None = None,
    progress: bool | None = None,
    *,
    fit: FitConfig | None = None,
    noise: str | None = None,
    device: Any = None,
    metrics: bool = True,
    randomize: bool = False,
    conv: str = "matrix",
    _regex: bool = False,
) -> FileAnalysis:
    """Analyse every 2-D and 4-D floating-point tensor of a weights file, one tensor in memory at a time.

    Parameters
    ----------
    path : a ``.safetensors`` file, a directory of safetensors shards (or its ``*.index.json``),
        or a ``torch.save`` state dict (``.pt``/``.pth``/``.bin``; nested ``{"state_dict": ...}``
        is unwrapped).
    include, exclude : shell-style globs, as for :func:`rmtprune.compress`: a pattern selects a
        tensor when it matches the tensor's dotted name or the name of a module holding it (``fc1``
        and ``fc*`` keep ``fc1.weight``, ``*.bias`` every bias, ``encoder`` all of ``encoder``).
        A tensor is kept when it matches any ``include`` (or none are given) and no ``exclude``.
        A pattern that only makes sense as a regular expression (``^ $ ( ) + | \\ { }``, or ``.*``
        inside a name) is still accepted as one (``re.search``), with a ``DeprecationWarning``
        saying how to write it as a glob.
    alpha, beta, ks_max : the fit parameters (METHOD.md section 3), checked by
        :class:`~rmtprune.config.FitConfig`; above ``ks_max`` a layer's verdict is ``no-mp-bulk``
        (``inf``: no gate). Defaults: :class:`FitConfig`'s.
    progress : show a progress bar (``None``: only when stderr is a terminal).
    fit : the fit parameters as one :class:`FitConfig` (instead of ``alpha``/``beta``/``ks_max``/``noise``).
    noise : the noise model of the edge, ``mp`` (default), ``resample``, ``gamma`` or ``auto``
        (:class:`~rmtprune.config.FitConfig`, docs/spectral.md "Heavy-tailed noise").
    device : a torch device (``"cuda"``, ``"cuda:1"``, ``"cpu"``) for the Gram/eigenvalue step, in
        float64, tensors of the same shape in batches (:func:`rmtprune.analysis.singular_values_batched`),
        read from disk as they are needed, so device memory stays near the batch (at most
        :data:`BATCH_BYTES`, or the largest tensor). CUDA not available: the CPU path, with a
        ``RuntimeWarning``. None (default): numpy on the CPU, one tensor at a time.
    metrics : each fitted layer's ESD metrics (power-law alpha, alpha-hat, stable rank, ...).
    randomize : each fitted layer's correlation-trap report too (a second spectrum per layer).
    conv : the reading of 4-D tensors' metrics, ``matrix`` (default, ``out x (in*kh*kw)``, as the fit)
        or ``ww`` (WeightWatcher 0.7.7's pooled ``kh*kw`` slices; :func:`rmtprune.analysis.analyze_tensor`).

    Returns
    -------
    FileAnalysis
        Layers with NaN/Inf weights get verdict ``invalid`` and the others are still analysed;
        check :attr:`FileAnalysis.has_invalid`. 1-D, non-float and 3-D tensors are listed in
        ``ignored`` with the reason.

    Raises
    ------
    CheckpointError
        for a missing, empty, truncated, unsafe or unrecognised file.
    ValueError
        for a pattern that does not compile, parameters out of range, or filters that match nothing.
    """
    from ._progress import progress as _progress

    fit = _fit_config(fit, alpha, beta, ks_max, noise)
    _check_conv(conv)
    inc = _compile_patterns(include, "include", regex=_regex)
    exc = _compile_patterns(exclude, "exclude", regex=_regex)
    from .analysis import resolve_device

    src = _open(path)
    infos = src.infos()
    matched, todo, ignored = _select(infos, inc, exc, path)
    names = [i.name for i in todo]
    dev = resolve_device(device)
    reads = _iter_source(src, path, names, as_numpy=numpy_readable(src, names))
    reads = _progress(reads, total=len(todo), desc="analyze", enable=progress)
    dtypes = {i.name: i.dtype for i in todo}
    if dev is None:
        layers = [_analyze_one(name, t, fit, dtypes[name], metrics, randomize, conv) for name, t in reads]
    else:
        layers = _analyze_batched(reads, fit, dtypes, dev, metrics, randomize, conv)
    return FileAnalysis(
        path=str(path),
        format=src.format,
        layers=layers,
        ignored=ignored,
        include=tuple(p.text for p in inc),
        exclude=tuple(p.text for p in exc),
        n_tensors=len(infos),
        n_matched=len(matched),
        alpha=fit.alpha,
        beta=fit.beta,
        ks_max=fit.ks_max,
        unwrapped=tuple(getattr(src, "unwrapped", ())),
        noise=fit.noise,
    )


def _select(
    infos: list[TensorInfo], inc: tuple[_Pattern, ...], exc: tuple[_Pattern, ...], path: Any
) -> tuple[list[TensorInfo], list[TensorInfo], list[IgnoredTensor]]:
    """The tensors the patterns keep, those of them to analyse, and those ignored (with the reason)."""
    changed = _changed_meaning(infos, inc, exc)
    matched = [
        i
        for i in infos
        if (not inc or any(p.matches(i.name) for p in inc)) and not any(p.matches(i.name) for p in exc)
    ]
    if (inc or exc) and not matched:
        raise ValueError(
            f"no tensor of {str(path)!r} matches include={[p.text for p in inc]} "
            f"exclude={[p.text for p in exc]} ({len(infos)} tensors, e.g. {infos[0].name!r})"
            + (f"; {changed[0]}" if changed else "")
        )
    for note in changed:
        warnings.warn(note, DeprecationWarning, stacklevel=4)
    ignored: list[IgnoredTensor] = []
    todo: list[TensorInfo] = []
    for info in matched:
        reason = _ignore_reason(info)
        if reason is None:
            todo.append(info)
        else:
            ignored.append(IgnoredTensor(info.name, info.shape, info.dtype, reason))
    return matched, todo, ignored


def _changed_meaning(
    infos: list[TensorInfo], inc: tuple[_Pattern, ...], exc: tuple[_Pattern, ...]
) -> list[str]:
    """One sentence per glob that keeps other tensors than the regular expression (``re.search``)
    analyze read it as before this release: ``fc`` was every name containing "fc", and as a glob it
    is the module ``fc`` only. Says how many each reading matches and the glob for the old one."""
    notes = []
    for option, pats in (("include", inc), ("exclude", exc)):
        for p in pats:
            if p.regex is not None:
                continue
            try:
                old = re.compile(p.text)
            except re.error:
                continue
            glob_hits = [p.matches(i.name) for i in infos]
            regex_hits = [old.search(i.name) is not None for i in infos]
            if glob_hits != regex_hits:
                as_glob, as_regex = sum(glob_hits), sum(regex_hits)
                notes.append(
                    f"{option} pattern {p.text!r} is a shell glob now and matches {as_glob} tensor(s); "
                    f"read as the regular expression analyze used before (re.search) it matched "
                    f"{as_regex}: write {_as_glob(p.text) or p.text!r} for that selection"
                )
    return notes


def _fit_config(fit: FitConfig | None, alpha: Any, beta: Any, ks_max: Any, noise: Any = None) -> FitConfig:
    """``fit``, or a :class:`FitConfig` of the separate values (the defaults where None)."""
    values = (("alpha", alpha), ("beta", beta), ("ks_max", ks_max), ("noise", noise))
    given = {k: v for k, v in values if v is not None}
    if fit is None:
        return FitConfig(**given)
    if not isinstance(fit, FitConfig):
        raise TypeError(f"fit={fit!r} must be a FitConfig")
    if given:
        raise ValueError(f"give fit= or {', '.join(given)}=, not both")
    return fit


def analyze_checkpoint(*args: Any, **kwargs: Any) -> FileAnalysis:
    """Deprecated name of :func:`analyze_file` (kept for one release): "checkpoint" now means only a
    training checkpoint, and this reads any weights file."""
    warnings.warn(
        "rmtprune.analyze_checkpoint is deprecated; use rmtprune.analyze_file (the same arguments, "
        "but include/exclude are shell globs there; analyze_checkpoint still reads them as regular "
        "expressions)",
        DeprecationWarning,
        stacklevel=2,
    )
    return analyze_file(*args, **kwargs, _regex=True)


#: Bytes of tensors a batch for ``device=`` holds at most (a larger tensor is a batch of its own).
BATCH_BYTES = 512 * 2**20


def _prepare(name: str, tensor: Any, dtype: str) -> tuple[Any, Any, LayerAnalysis | None]:
    """A tensor ready to analyse, as a matrix, and its verdict when it is not fitted (NaN, too small).

    8-bit torch floats are upcast (torch has no ``isfinite`` for them); numpy reads are already
    widened (bfloat16 and float8 to float32).
    """
    from .analysis import _as_array, as_matrix, check_tensor

    if not isinstance(tensor, np.ndarray) and tensor.dtype.itemsize == 1:
        tensor = tensor.float()
    mat = _as_array(tensor) if isinstance(tensor, np.ndarray) else as_matrix(tensor)
    la = check_tensor(name, tensor, mat)
    if la is not None:
        la.dtype = dtype
    return tensor, mat, la


def _analyze_one(
    name: str,
    tensor: Any,
    fit: FitConfig,
    dtype: str,
    metrics: bool = True,
    randomize: bool = False,
    conv: str = "matrix",
) -> LayerAnalysis:
    """:func:`rmtprune.analysis.analyze_tensor` of one read tensor, reporting the file's own ``dtype``."""
    tensor, mat, la = _prepare(name, tensor, dtype)
    if la is not None:
        return la
    return _finish(name, tensor, mat, singular_values(mat), fit, dtype, metrics, randomize, conv)


def _finish(
    name: str,
    tensor: Any,
    mat: Any,
    s: np.ndarray,
    fit: FitConfig,
    dtype: str,
    metrics: bool,
    randomize: bool,
    conv: str,
) -> LayerAnalysis:
    """:func:`rmtprune.analysis.finish_tensor` of a read tensor with spectrum ``s``, under ``fit``,
    reporting the file's own ``dtype`` (the one-at-a-time and the batched paths alike)."""
    la = finish_tensor(
        name,
        tensor,
        mat,
        s,
        fit.alpha,
        fit.beta,
        fit.ks_max,
        noise=fit.noise,
        metrics=metrics,
        randomize=randomize,
        conv=conv,
    )
    la.dtype = dtype
    return la


def _analyze_batched(
    reads: Iterable[tuple[str, Any]],
    fit: FitConfig,
    dtypes: dict[str, str],
    device: str,
    metrics: bool,
    randomize: bool,
    conv: str = "matrix",
) -> list[LayerAnalysis]:
    """The tensors of ``reads`` analysed with their spectra computed on ``device`` in batches of the
    same shape; a batch runs when the tensors waiting hold :data:`BATCH_BYTES` (and at the end)."""
    from .analysis import singular_values_batched

    out: list[LayerAnalysis | None] = []
    waiting: list[tuple[int, str, Any, Any]] = []
    held = 0

    def flush() -> None:
        nonlocal held
        values = singular_values_batched([mat for _, _, _, mat in waiting], device)
        for (i, name, tensor, mat), s in zip(waiting, values, strict=True):
            out[i] = _finish(name, tensor, mat, s, fit, dtypes[name], metrics, randomize, conv)
        waiting.clear()
        held = 0

    for name, tensor in reads:
        tensor, mat, la = _prepare(name, tensor, dtypes[name])
        out.append(la)
        if la is not None:
            continue
        size = int(np.prod(mat.shape)) * mat.dtype.itemsize
        if waiting and held + size > BATCH_BYTES:
            flush()
        waiting.append((len(out) - 1, name, tensor, mat))
        held += size
    if waiting:
        flush()
    return [la for la in out if la is not None]
