"""The analyze stage: singular values (float64) plus the BEMA fit, per tensor or per model.

This is the bridge between tensors and the pure-numpy ``rmtprune.spectral``. :func:`analyze_tensor`
reads one weight as a matrix (conv weights ``out x in x k...`` as ``out x (in * k...)``), fits its
bulk and gives a verdict; a numpy weight is analysed with numpy alone (torch is imported only for
torch tensors, models and ``device=``), so ``rmtprune analyze FILE.safetensors`` never loads torch.
:func:`analyze` does the same for every layer of a model the layer registry
(:mod:`rmtprune.layers`) knows, factored layers included, and is what :func:`rmtprune.plan`,
sparsification, the training pruner and the reports consume: the fit, the gate and the verdict
sentence live here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ._progress import progress as _progress
from ._spectrum import (
    _all_finite,
    _as_array,
    as_matrix,
    resolve_device,
    singular_values,
    singular_values_batched,
)
from .errors import InvalidWeightsError
from .spectral import DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_KS_MAX, MIN_P, SpectrumFit, fit_bulk, fit_censored

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "analyze_matrix",
    "analyze_tensor",
    "as_matrix",
    "singular_values",
    "singular_values_batched",
    "resolve_device",
    "LayerAnalysis",
    "ModelAnalysis",
    "analyze",
    "gate_reason",
    "VERDICTS",
]

#: Verdicts: ``fit`` (MP-like bulk), ``no-mp-bulk`` (ks above the gate, or no bulk left to refit
#: a factored layer), ``too-small`` (p < MIN_P), ``invalid`` (NaN/Inf weights), and, for layers of a
#: model only, ``skip`` (not analysed: unsupported, not selected, parametrized or shared).
VERDICTS = ("fit", "no-mp-bulk", "too-small", "invalid", "skip")


def gate_reason(fit: SpectrumFit, ks_max: float) -> str:
    """Why ``fit`` is refused by the gate ("" when it is accepted): the one verdict sentence.

    The gate is ``ks <= max(ks_max, q)``, ``q`` the 99% quantile of the KS distance of a true MP bulk
    of the layer's size (:mod:`rmtprune.spectral.gate`); the sentence names both terms and the
    layer's p-value.
    """
    if fit.accepted(ks_max):
        return ""
    from .spectral.gate import gate_message

    return gate_message(fit, ks_max)


def _fit(s: np.ndarray, mat: Any, alpha: float, beta: float, noise: str) -> SpectrumFit:
    """The fit of a dense weight's spectrum ``s`` under the noise model ``noise`` (``mp``: BEMA's
    standard model; the others read the entries, ``mat``, see :func:`rmtprune.spectral.fit_matrix`)."""
    shape = tuple(int(v) for v in mat.shape)
    if noise == "mp":
        return fit_bulk(s, shape, alpha=alpha, beta=beta)
    from .spectral.heavy import fit_matrix

    return fit_matrix(_numpy(mat), noise=noise, alpha=alpha, beta=beta, singular_values=s)


def analyze_matrix(W: Any, alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA) -> SpectrumFit:
    """BEMA fit of the spectrum of a weight matrix (numpy or torch, any float dtype; float64 math).

    4-D conv weights are read as ``out x (in * kh * kw)``. Raises :class:`InvalidWeightsError`
    for NaN/Inf and ``ValueError`` when the matrix is too small for the trimmed window.

    Examples
    --------
    >>> import numpy as np
    >>> fit = analyze_matrix(np.random.default_rng(0).standard_normal((300, 100)))
    >>> fit.n_spikes, round(fit.sigma2, 1)
    (0, 1.0)
    """
    mat = _as_array(W) if isinstance(W, np.ndarray) else as_matrix(W)
    if not _all_finite(mat):
        raise InvalidWeightsError(f"weight of shape {tuple(mat.shape)} contains NaN or Inf")
    s = singular_values(mat)
    return fit_bulk(s, tuple(mat.shape), alpha=alpha, beta=beta)


@dataclass
class LayerAnalysis:
    """Analysis of one named weight: its verdict and, where the fit ran, the fit.

    From :func:`analyze` (a layer of a model) it also carries the module, its handler, the layer
    type, the current rank, the spectrum ``s`` (all ``p`` values, descending; a factored layer's
    cut values as zeros) and, when asked, the thin SVD ``(U, s, Vh)`` as torch tensors.
    ``metrics`` are the heavy-tail / norm metrics of the spectrum of a fitted layer
    (:class:`rmtprune.spectral.esd_metrics.ESDMetrics`: power-law alpha, alpha-hat, stable rank,
    ...) and ``traps`` the correlation-trap report, when asked (``randomize``). ``ks_gate`` is the
    effective gate the fit was judged by, ``max(ks_max, q_99%(p, gamma))``; ``tail`` the tail test
    of the entries (:class:`rmtprune.spectral.TailTest`; with the metrics, for weights read from a
    file): heavy-tailed entries make the ``mp`` edge count false spikes (``noise="auto"`` fits them).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    verdict: str
    fit: SpectrumFit | None = None
    message: str = ""
    layer_type: str = ""
    matrix: tuple[int, int] | None = None
    rank: int | None = None
    factored: bool = False
    module: Any = field(default=None, repr=False, compare=False)
    handler: Any = field(default=None, repr=False, compare=False)
    s: np.ndarray | None = field(default=None, repr=False, compare=False)
    svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(
        default=None, repr=False, compare=False
    )
    metrics: Any = field(default=None, compare=False)
    traps: Any = field(default=None, compare=False)
    ks_gate: float | None = None
    tail: Any = field(default=None, compare=False)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """Shape of the matrix the weight was read as."""
        if self.matrix is not None:
            return self.matrix
        rest = int(np.prod(self.shape[1:])) if len(self.shape) > 1 else 1
        return (int(self.shape[0]), rest)

    @property
    def accepted(self) -> bool:
        """Whether the fit ran and passed the gate."""
        return self.verdict == "fit"

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict (fit fields flattened in, ``None`` where no fit ran)."""
        out: dict[str, Any] = {
            "layer": self.name,
            "shape": list(self.shape),
            "matrix_shape": list(self.matrix_shape),
            "dtype": self.dtype,
            "verdict": self.verdict,
            "message": self.message,
        }
        keys = ("gamma", "sigma2", "lambda_plus", "s_plus", "n_spikes", "n_bulk", "ks", "ks_pvalue", "alpha")
        fit = self.fit.to_dict() if self.fit is not None else {}
        for k in (*keys, "beta", "noise"):
            out[k] = fit.get(k)
        gate = self.ks_gate
        out["ks_gate"] = gate if gate is None or gate < float("inf") else None  # inf: the gate is off
        # Nested: their names ("alpha": the power-law exponent) would clash with the fit's (BEMA alpha).
        out["metrics"] = self.metrics.to_dict() if self.metrics is not None else None
        if self.traps is not None:
            out["traps"] = self.traps.to_dict()
        t = self.tail
        out["tail"] = None if t is None else {"ratio": t.ratio, "heavy": t.heavy, "nu": _nu(t)}
        return out


def _nu(t: Any) -> float | None:
    """The Student-t degrees of freedom matched to a heavy tail (None: light-tailed)."""
    return 1.0 / t.inv_nu if t.heavy and t.inv_nu > 0 else None


def analyze_tensor(
    name: str,
    weight: Any,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    ks_max: float = DEFAULT_KS_MAX,
    *,
    noise: str = "mp",
    metrics: bool = True,
    randomize: bool = False,
    conv: str = "matrix",
) -> LayerAnalysis:
    """Analyse one named weight and give it a verdict; never raises for bad values, only reports.

    A numpy weight is analysed in numpy (torch is not imported). ``noise``: the noise model of the
    edge (``mp``, ``resample``, ``gamma`` or ``auto``; :class:`rmtprune.config.FitConfig`).
    ``metrics``: the ESD metrics of a fitted layer (:attr:`LayerAnalysis.metrics`); ``randomize``:
    also its correlation-trap report (:attr:`LayerAnalysis.traps`, a second spectrum of the
    shuffled weight). ``conv``: the reading of a 4-D weight's metrics, ``matrix`` (``out x rest``, as
    the fit) or ``ww`` (WeightWatcher's pooled ``kh*kw`` slices,
    :func:`rmtprune.spectral.esd_metrics.conv_eigenvalues`); only the metrics of 4-D weights change,
    the fit and verdict keep ``matrix``.
    """
    _check_conv(conv)
    mat = _as_array(weight) if isinstance(weight, np.ndarray) else as_matrix(weight)
    la = check_tensor(name, weight, mat)
    if la is not None:
        return la
    s = singular_values(mat)
    return finish_tensor(
        name, weight, mat, s, alpha, beta, ks_max, noise=noise, metrics=metrics, randomize=randomize,
        conv=conv,
    )  # fmt: skip


def check_tensor(name: str, weight: Any, mat: Any) -> LayerAnalysis | None:
    """The ``invalid``/``too-small`` verdict of a weight (``mat``: it as a matrix), or None to fit it."""
    shape = tuple(int(v) for v in (weight.shape))
    dtype = str(weight.dtype).replace("torch.", "")
    p = min(mat.shape)
    if not _all_finite(mat):
        return LayerAnalysis(name, shape, dtype, "invalid", None, f"layer {name!r} contains NaN or Inf")
    if p < MIN_P:
        return LayerAnalysis(name, shape, dtype, "too-small", None, f"p={p} < {MIN_P}: too small to fit")
    return None


def finish_tensor(
    name: str,
    weight: Any,
    mat: Any,
    s: np.ndarray,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    ks_max: float = DEFAULT_KS_MAX,
    *,
    noise: str = "mp",
    metrics: bool = True,
    randomize: bool = False,
    conv: str = "matrix",
) -> LayerAnalysis:
    """The fit, verdict and metrics of a weight whose singular values ``s`` are computed (by
    :func:`singular_values` or :func:`singular_values_batched`); ``conv`` as in :func:`analyze_tensor`."""
    shape = tuple(int(v) for v in (weight.shape))
    dtype = str(weight.dtype).replace("torch.", "")
    fit = _fit(s, mat, alpha, beta, noise)
    why = gate_reason(fit, ks_max)
    la = LayerAnalysis(name, shape, dtype, "no-mp-bulk" if why else "fit", fit, why)
    la.ks_gate = fit.gate(ks_max)
    if metrics:
        la.metrics = _esd_metrics(s, tuple(mat.shape), fit, weight if _check_conv(conv) == "ww" else None)
        if fit.sigma2 > 0:
            from .spectral.heavy import tail_test

            la.tail = tail_test(_numpy(mat), sigma2=fit.sigma2)
    if randomize:
        la.traps = _traps(mat, fit)
    return la


def _numpy(mat: Any) -> np.ndarray:
    """A weight matrix as a numpy array (a torch tensor copied to the CPU in float64)."""
    if isinstance(mat, np.ndarray):
        return mat
    import torch

    return mat.detach().to("cpu", torch.float64).numpy()  # numpy has no bfloat16 / float8


def _esd_metrics(
    s: np.ndarray, shape: tuple[int, int], fit: SpectrumFit | None, conv_weight: Any = None
) -> Any:
    """:func:`rmtprune.spectral.esd_metrics.esd_metrics` of a spectrum; of WeightWatcher's reading of
    ``conv_weight`` instead when it is a 4-D weight (:func:`.esd_metrics.conv_eigenvalues`)."""
    from .spectral.esd_metrics import conv_eigenvalues, esd_metrics

    if conv_weight is not None and len(conv_weight.shape) == 4:
        return esd_metrics(s, shape, fit=fit, eigenvalues=conv_eigenvalues(_numpy(conv_weight)))
    return esd_metrics(s, shape, fit=fit)


def _check_conv(conv: str) -> str:
    """``conv`` if it names a reading of conv weights for the metrics (``matrix`` or ``ww``)."""
    if conv not in ("matrix", "ww"):
        raise ValueError(f"conv={conv!r} must be 'matrix' or 'ww'")
    return conv


def _traps(mat: Any, fit: SpectrumFit | None) -> Any:
    """:func:`rmtprune.spectral.esd_metrics.correlation_traps` of a weight matrix (numpy, float64)."""
    from .spectral.esd_metrics import correlation_traps

    return correlation_traps(np.asarray(_numpy(mat), dtype=np.float64), seed=0, fit=fit)


def metrics_summary(layers: Sequence[LayerAnalysis]) -> dict[str, Any] | None:
    """:func:`rmtprune.spectral.esd_metrics.summarize` of the layers' metrics (None: no layer has them)."""
    found = [la.metrics for la in layers if la.metrics is not None]
    if not found:
        return None
    from .spectral.esd_metrics import summarize

    return summarize(found)


# ====================================================================== a whole model


@dataclass
class ModelAnalysis:
    """:func:`analyze` of a model: one :class:`LayerAnalysis` per layer the registry speaks about.

    Iterate it, or index it by position or layer name. ``output_layer`` is the layer the one
    output-layer rule (:func:`rmtprune.layers.output_layer`) names, with ``output_reason``.
    """

    layers: list[LayerAnalysis]
    output_layer: str | None = None
    output_reason: str = ""

    def __iter__(self) -> Iterator[LayerAnalysis]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, key: int | str) -> LayerAnalysis:
        if isinstance(key, int):
            return self.layers[key]
        for la in self.layers:
            if la.name == key:
                return la
        raise KeyError(f"no layer {key!r} in the analysis")

    @property
    def analysed(self) -> list[LayerAnalysis]:
        """The layers that were analysed (every verdict but ``skip``)."""
        return [la for la in self.layers if la.verdict != "skip"]

    def counts(self) -> dict[str, int]:
        """How many layers got each verdict."""
        return {v: sum(la.verdict == v for la in self.layers) for v in VERDICTS}

    def summary(self) -> dict[str, Any] | None:
        """Model-level summary of the layers' ESD metrics (:func:`metrics_summary`)."""
        return metrics_summary(self.layers)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict: the output layer, every layer's record and the metrics summary."""
        return {
            "output_layer": self.output_layer,
            "output_reason": self.output_reason,
            "counts": self.counts(),
            "summary": self.summary(),
            "layers": [{**la.to_dict(), "layer_type": la.layer_type} for la in self.layers],
        }

    def table(self) -> str:
        """One row per layer: name, type, matrix, verdict, spikes, ks, sigma2 and the reason."""
        from ._format import table

        rows = []
        for la in self.layers:
            fit = la.fit
            mat = "" if la.verdict == "skip" and la.matrix is None else "{}x{}".format(*la.matrix_shape)
            rows.append(
                [
                    la.name,
                    la.layer_type,
                    mat,
                    la.verdict,
                    "" if fit is None else str(fit.n_spikes),
                    "" if fit is None else f"{fit.ks:.3f}",
                    "" if fit is None else f"{fit.sigma2:.3g}",
                    la.message,
                ]
            )
        head = ["layer", "type", "matrix", "verdict", "spikes", "ks", "sigma2", "reason"]
        return table(head, rows) + "\n"


def _settings(config: Any, name: str) -> tuple[Any, str]:
    """The fit parameters and SVD precision for layer ``name`` from whatever config was given."""
    if hasattr(config, "for_layer"):  # a CompressionConfig: per-layer overrides apply
        cfg = config.for_layer(name)
        return cfg.fit, cfg.svd_dtype
    return config, "float64"


def _analyze_layer(
    e: Any,
    fit_cfg: Any,
    svd_dtype: str,
    keep_svd: bool,
    method: str,
    device: str | None = None,
    metrics: bool = True,
    randomize: bool = False,
    conv: str = "matrix",
) -> LayerAnalysis:
    """Spectrum, fit, verdict and metrics of one supported layer (the model is not changed)."""
    import torch

    h, mod, name = e.handler, e.module, e.name
    m, n = h.matrix_shape(mod)
    p = min(m, n)
    k_now = h.current_rank(mod)
    la = LayerAnalysis(
        name,
        h.weight_shape(mod),
        str(h.weights(mod)[0].dtype).replace("torch.", ""),
        "fit",
        layer_type=type(mod).__name__,
        matrix=(m, n),
        rank=k_now,
        factored=h.factored,
        module=mod,
        handler=h,
    )
    if not all(bool(torch.isfinite(w.detach()).all()) for w in h.weights(mod)):
        la.verdict, la.message = "invalid", f"layer {name!r} contains NaN or Inf"
        return la
    if p < MIN_P:
        la.verdict, la.message = "too-small", f"p={p} < {MIN_P}: too small to fit"
        return la
    dtype = {"float64": torch.float64, "float32": torch.float32}[svd_dtype]
    if keep_svd or h.factored:
        U, s_t, Vh = h.svd(mod, dtype)
        la.svd = (U, s_t, Vh)
        s = s_t.detach().to("cpu", torch.float64).numpy()
    elif device is not None:
        s = singular_values_batched([h.matrix(mod)], device)[0]
    elif method == "gram":
        s = singular_values(h.matrix(mod))
    else:
        s = h.singular_values(mod, dtype).detach().to("cpu", torch.float64).numpy()
    if h.factored:
        fit = fit_censored(s[:p], (m, n), fit_cfg.alpha, fit_cfg.beta)
        s_full = np.zeros(p)
        s_full[: min(s.size, p)] = s[:p]
    else:
        fit = _fit(s, h.matrix(mod), fit_cfg.alpha, fit_cfg.beta, getattr(fit_cfg, "noise", "mp"))
        s_full = s
    la.s, la.fit = s_full, fit
    if fit is None:
        la.verdict = "no-mp-bulk"
        la.message = f"rank {k_now} leaves too few bulk values in the trimmed window to refit"
        return la
    if metrics:
        w = h.weights(mod)[0] if conv == "ww" and not h.factored else None
        la.metrics = _esd_metrics(s_full, (m, n), fit, w)
    if randomize and not h.factored:
        la.traps = _traps(h.matrix(mod), fit)
    la.ks_gate = fit.gate(fit_cfg.ks_max)
    why = gate_reason(fit, fit_cfg.ks_max)
    if why:
        la.verdict, la.message = "no-mp-bulk", why
    return la


def analyze(
    model: nn.Module,
    config: Any = None,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    keep_svd: bool = False,
    method: str = "svd",
    progress: bool | None = False,
    entries: list[Any] | None = None,
    device: Any = None,
    metrics: bool = True,
    randomize: bool = False,
    conv: str = "matrix",
) -> ModelAnalysis:
    """Spectrum, BEMA fit and verdict of every layer of ``model`` the layer registry supports.

    The analyze stage of the pipeline (analyze -> plan -> apply): the model is not changed, and
    nothing raises for bad weights (a NaN layer gets the verdict ``invalid``).

    Parameters
    ----------
    config : a :class:`~rmtprune.config.FitConfig` (default ``FitConfig()``), or a
        :class:`~rmtprune.config.CompressionConfig`, whose per-layer overrides, layer selection and
        ``svd_dtype`` then apply.
    include, exclude : layer-name globs (as in :func:`rmtprune.config.match_pattern`), on top of
        the config's own selection.
    keep_svd : keep each analysed layer's thin SVD ``(U, s, Vh)`` (what :func:`rmtprune.compress`
        needs to cut without a second decomposition).
    method : ``svd`` (``torch.linalg.svdvals`` at the config's precision) or ``gram`` (float64
        eigenvalues of the Gram matrix, see :func:`singular_values`), for dense layers without
        ``keep_svd``; factored layers always use QR of their factors.
    progress : show a progress bar over layers (None: when stderr is a terminal).
    entries : the layers from :func:`rmtprune.layers.collect_layers`, if the caller has them.
    device : run the Gram/eigenvalue step of dense layers (without ``keep_svd``) on this torch
        device, float64 (:func:`singular_values_batched`); ``cuda`` without a GPU falls back to the
        CPU with a warning. None: ``method`` on the CPU.
    metrics : compute each fitted layer's ESD metrics (:attr:`LayerAnalysis.metrics`).
    randomize : also each dense fitted layer's correlation-trap report (:attr:`LayerAnalysis.traps`;
        a second spectrum per layer).
    conv : the reading of conv layers' metrics: ``matrix`` (default, ``out x (in*kh*kw)`` as the fit)
        or ``ww`` (WeightWatcher 0.7.7's pooled ``kh*kw`` slices, so alpha compares with WW's; see
        docs/metrics.md). Only the metrics of 4-D weights change.

    Examples
    --------
    >>> import torch, rmtprune
    >>> model = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.ReLU(), torch.nn.Linear(200, 5))
    >>> [la.verdict for la in rmtprune.analyze(model)]
    ['fit', 'too-small']
    """
    from torch import nn

    from .config import FitConfig, match_pattern
    from .layers import collect_layers, output_layer

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = FitConfig() if config is None else config
    if not (isinstance(config, FitConfig) or hasattr(config, "for_layer")):
        raise TypeError(f"config must be a FitConfig or a CompressionConfig, got {type(config).__name__}")
    if method not in ("svd", "gram"):
        raise ValueError(f"method={method!r} must be 'svd' or 'gram'")
    _check_conv(conv)
    dev = resolve_device(device)
    if dev is None and device is not None:
        dev = "cpu"  # asked for a device that is not there: the same batched path on the CPU
    entries = collect_layers(model) if entries is None else entries
    include, exclude = list(include or []), list(exclude or [])

    def why_not(e: Any) -> str:
        if e.handler is None or e.reason:
            return e.reason
        if hasattr(config, "selects"):
            selected, why = config.selects(e.name)
            if not selected:
                return why
        if include and not any(match_pattern(e.name, p) for p in include):
            return f"not matched by include patterns {include}"
        hit = next((p for p in exclude if match_pattern(e.name, p)), None)
        return f"excluded by pattern {hit!r}" if hit else ""

    reasons = {e.name: why_not(e) for e in entries}
    todo = [e for e in entries if not reasons[e.name]]
    done: dict[str, LayerAnalysis] = {}
    for e in _progress(todo, total=len(todo), desc="analyze", enable=progress):
        fit_cfg, svd_dtype = _settings(config, e.name)
        done[e.name] = _analyze_layer(e, fit_cfg, svd_dtype, keep_svd, method, dev, metrics, randomize, conv)
    layers = [done.get(e.name) or _skipped(e, reasons[e.name]) for e in entries]
    out, why = output_layer(model, entries)
    return ModelAnalysis(layers, out, why)


def _skipped(e: Any, reason: str) -> LayerAnalysis:
    h, mod = e.handler, e.module
    if h is not None:
        shape, matrix = h.weight_shape(mod), h.matrix_shape(mod)
    else:
        shape = next((tuple(int(v) for v in p.shape) for p in mod.parameters() if p.ndim >= 2), ())
        matrix = None
    return LayerAnalysis(
        e.name,
        shape,
        "",
        "skip",
        None,
        reason,
        layer_type=type(mod).__name__,
        matrix=matrix,
        module=mod,
        handler=h,
    )
