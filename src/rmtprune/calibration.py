"""Calibration: each layer's input second moment, streamed from a few batches of real inputs.

Data-aware compression (:func:`rmtprune.compress` with ``calibration=``) needs, for every layer it
cuts, the uncentred second moment ``C = E[x x^T]`` of the layer's input rows ``x`` (a token for a
linear layer, an unfolded patch for a convolution; :meth:`LayerHandler.input_rows`): the output error
of any replacement ``W'`` on those inputs is ``tr((W - W') C (W - W')^T)``, which whitening turns
into a Frobenius norm (SVD-LLM, Wang et al. 2024, arXiv:2403.07378). Wanda's activation norms
(arXiv:2306.11695) and ASVD's mean absolute activations (arXiv:2312.05821) come from the same pass.

:func:`collect` runs the model in eval mode without gradients and accumulates ``sum x x^T`` per layer
in float64 with forward hooks, so memory is ``n^2`` per layer whatever the number of samples. The
last batches (``held_out``) go to a second set of accumulators that the guard of the compression
reads: an error measured on inputs the truncation never saw.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._progress import progress as _progress
from .errors import first_line
from .layers import collect_layers

__all__ = ["InputStats", "Calibration", "collect", "whitening_factor", "token_windows"]

#: Default relative damping of the input covariance before its Cholesky factor: 0.1, chosen on
#: SmolLM2's validation text by a pre-registered rule (out-of-domain perplexity 612 -> 422 for 57 -> 60
#: in domain at 80%; docs/compression.md, benchmarks/results/damping_smollm2.md).
DEFAULT_DAMPING = 1e-1


@dataclass
class InputStats:
    """Streaming statistics of one layer's input rows ``x`` (``n`` features) over ``rows`` rows.

    ``xtx`` is ``sum x x^T`` (``n x n``, float64) and ``abs_sum`` is ``sum |x|`` (``n``, float64).
    """

    xtx: torch.Tensor
    abs_sum: torch.Tensor
    rows: int = 0

    @classmethod
    def zeros(cls, n: int, device: torch.device | str = "cpu") -> InputStats:
        return cls(
            torch.zeros(n, n, dtype=torch.float64, device=device),
            torch.zeros(n, dtype=torch.float64, device=device),
        )

    @property
    def n(self) -> int:
        return int(self.xtx.shape[0])

    @property
    def second_moment(self) -> torch.Tensor:
        """``E[x x^T]``: the input's uncentred covariance (float64, ``n x n``)."""
        return self.xtx / max(self.rows, 1)

    @property
    def l2_norm(self) -> torch.Tensor:
        """``||X_j||_2`` over all rows, per input feature (Wanda's activation norm)."""
        return torch.sqrt(torch.diagonal(self.xtx).clamp_min(0))

    @property
    def mean_abs(self) -> torch.Tensor:
        """``mean |x_j|`` per input feature (ASVD's activation scale)."""
        return self.abs_sum / max(self.rows, 1)

    def add(self, rows: torch.Tensor, matmul_dtype: torch.dtype = torch.float32) -> None:
        """Add a ``k x n`` block of input rows (the product in ``matmul_dtype``, summed in float64)."""
        self.add_sums(*_sums(rows, matmul_dtype))

    def add_sums(self, xtx: torch.Tensor, abs_sum: torch.Tensor, rows: int) -> None:
        """Add the sums of a block of rows already computed (:func:`_sums`): layers reading one
        input share them."""
        self.xtx += xtx
        self.abs_sum += abs_sum
        self.rows += int(rows)


def _sums(rows: torch.Tensor, matmul_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(x^T x, sum |x|, k)`` of a ``k x n`` block of rows, in float64."""
    wide = rows.to(matmul_dtype)
    return (wide.T @ wide).to(torch.float64), rows.to(torch.float64).abs().sum(0), int(rows.shape[0])


@dataclass
class Calibration:
    """Input statistics of a model's layers: ``fit`` for the truncation, ``held_out`` for the guard.

    ``samples`` / ``held_out_samples`` count the batches' leading dimension (sequences or images).
    """

    fit: dict[str, InputStats]
    held_out: dict[str, InputStats] = field(default_factory=dict)
    samples: int = 0
    held_out_samples: int = 0

    def __contains__(self, name: object) -> bool:
        return name in self.fit

    def __getitem__(self, name: str) -> InputStats:
        try:
            return self.fit[name]
        except KeyError:
            raise ValueError(f"no calibration statistics for layer {name!r}") from None

    @property
    def names(self) -> list[str]:
        return list(self.fit)

    def summary(self) -> str:
        rows = next(iter(self.fit.values())).rows if self.fit else 0
        held = f", {self.held_out_samples} held out for the guard" if self.held_out else ""
        return (
            f"calibration: {self.samples} samples ({rows} rows at the first layer) over "
            f"{len(self.fit)} layers{held}"
        )


Batch = Mapping[str, Any] | torch.Tensor | tuple


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _batch_size(batch: Batch) -> int:
    if isinstance(batch, Mapping):
        batch = next((v for v in batch.values() if torch.is_tensor(v)), None)
    elif isinstance(batch, tuple):
        batch = batch[0] if batch else None
    return int(batch.shape[0]) if torch.is_tensor(batch) and batch.ndim > 0 else 1


def _masked(rows: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Leave padding tokens out when the batch's ``attention_mask`` lines up with the input's rows."""
    if mask is None or x.ndim < 2 or tuple(x.shape[:-1]) != tuple(mask.shape):
        return rows  # not token-aligned (a pooler's first token, a conv's patches): keep every row
    return rows[mask.reshape(-1).to(device=rows.device) != 0]


def _length(batches: Any) -> int | None:
    try:
        return len(batches)
    except TypeError:
        return None


def _held_out_rule(batches: Any, held_out: float) -> Callable[[int], bool]:
    """Which batch indices go to the held-out slice: the last ``held_out`` share when the number of
    batches is known (at least one of two or more), else every ``round(1 / held_out)``-th batch (a
    generator is streamed, never materialised)."""
    if held_out == 0:
        return lambda i: False
    n = _length(batches)
    if n is not None:
        n_held = 0 if n < 2 else max(1, int(math.floor(held_out * n)))
        return lambda i: i >= n - n_held
    k = max(2, round(1 / held_out))
    return lambda i: i % k == k - 1


def _rows_key(module: nn.Module, handler: Any) -> tuple:
    """What makes two layers reading the same tensor see the same rows: the unfold geometry of a
    convolution (kernel, stride, padding, dilation), nothing for a linear layer."""
    conv = getattr(module, "first", module)
    return (
        type(handler).__name__,
        type(conv).__name__,
        *(getattr(conv, a, None) for a in ("kernel_size", "stride", "padding", "dilation")),
    )


def _sums_hook(
    name: str,
    handler: Any,
    state: dict[str, Any],
    matmul_dtype: torch.dtype,
    sink: Callable[[str, tuple[torch.Tensor, torch.Tensor, int]], None],
) -> Callable[..., None]:
    """A forward hook giving ``sink(name, sums)`` the :func:`_sums` of the layer's input rows
    (:meth:`LayerHandler.input_rows`, padding left out by ``state["mask"]``). Layers reading the
    same tensor with the same unfold geometry (q/k/v, gate/up) share one computation through
    ``state["last"]``, which the caller resets for each batch."""

    def hook(module: nn.Module, args: tuple, output: object) -> None:
        if not args or not torch.is_tensor(args[0]):
            raise ValueError(f"layer {name!r} was not called with its input as the first positional argument")
        x = args[0]
        last = state["last"]
        key = _rows_key(module, handler)
        if last is not None and last[0] is x and last[1] == key:
            sums = last[2]
        else:
            try:
                rows = handler.input_rows(module, x)
            except (ValueError, IndexError, RuntimeError) as exc:
                raise ValueError(f"layer {name!r}: {exc}") from None
            sums = _sums(_masked(rows, x, state["mask"]), matmul_dtype)
            state["last"] = (x, key, sums)
        sink(name, sums)

    return hook


def _forward(model: nn.Module, batch: Any, i: int, device: torch.device, state: dict[str, Any]) -> None:
    """One calibration forward pass; a batch the model cannot take is named with its shape."""
    try:
        if isinstance(batch, Mapping):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            state["mask"] = batch.get("attention_mask")
            model(**batch)
        elif isinstance(batch, tuple):
            state["mask"] = None
            model(*(v.to(device) if torch.is_tensor(v) else v for v in batch))
        elif torch.is_tensor(batch):
            state["mask"] = None
            model(batch.to(device))
        else:
            raise TypeError(
                f"calibration batch {i} is a {type(batch).__name__}: expected a tensor, tuple or dict"
            )
    except (RuntimeError, ValueError, IndexError) as exc:
        if str(exc).startswith("layer "):
            raise  # our own hook's message, already naming the layer
        shape = _shape(batch)
        raise ValueError(
            f"calibration batch {i} {shape}does not fit the model: {first_line(exc, 200)}"
        ) from None


def _shape(batch: Any) -> str:
    if torch.is_tensor(batch):
        return f"of shape {tuple(batch.shape)} "
    if isinstance(batch, Mapping):
        return (
            "(" + ", ".join(f"{k}: {tuple(v.shape)}" for k, v in batch.items() if torch.is_tensor(v)) + ") "
        )
    if isinstance(batch, tuple):
        return "(" + ", ".join(str(tuple(v.shape)) for v in batch if torch.is_tensor(v)) + ") "
    return ""


def collect(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    layers: Sequence[str] | None = None,
    held_out: float = 0.125,
    matmul_dtype: torch.dtype = torch.float32,
    progress: bool | None = False,
) -> Calibration:
    """Stream ``batches`` through ``model`` and accumulate each layer's input second moment.

    Parameters
    ----------
    model : the network (run in eval mode, no gradients; its mode is restored).
    batches : an iterable of inputs: a tensor (``model(x)``), a tuple (``model(*x)``) or a mapping
        (``model(**x)``, e.g. a tokenizer's output; rows its ``attention_mask`` marks as padding are
        left out). Moved to the model's device.
    layers : names of the layers to calibrate (default: every layer rmtprune can cut).
    held_out : fraction of the batches kept apart for the guard: the last ones when the number of
        batches is known (at least one of two or more), else every ``round(1 / held_out)``-th one
        (a generator is streamed, one batch at a time); 0 keeps none.
    matmul_dtype : precision of each batch's ``x^T x`` before it is added in float64 (float32 is
        2-3x faster on CPU; float64 for bit-exact statistics).
    progress : a progress bar over batches (None: when stderr is a terminal).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(held_out, bool) or not isinstance(held_out, (int, float)) or not 0 <= held_out < 1:
        raise ValueError(f"held_out={held_out!r} must be a fraction in [0, 1)")
    if isinstance(batches, (str, bytes, nn.Module)) or not isinstance(batches, Iterable):
        raise TypeError(f"batches must be an iterable of model inputs, got {type(batches).__name__}")
    entries = {e.name: e for e in collect_layers(model) if e.handler is not None and not e.reason}
    if layers is None:
        names = list(entries)
    else:
        names = list(layers)
        for name in names:
            if name not in entries:
                raise ValueError(f"layer {name!r} is not a layer rmtprune can cut in this model")
    held = _held_out_rule(batches, held_out)
    fit: dict[str, InputStats] = {}
    held_stats: dict[str, InputStats] = {}
    state: dict[str, Any] = {"mask": None, "into": fit, "last": None}

    def into(name: str, sums: tuple[torch.Tensor, torch.Tensor, int]) -> None:
        acc = state["into"].get(name)
        if acc is None:
            acc = state["into"][name] = InputStats.zeros(sums[0].shape[0], sums[0].device)
        acc.add_sums(*sums)

    handles = [
        entries[name].module.register_forward_hook(
            _sums_hook(name, entries[name].handler, state, matmul_dtype, into)
        )
        for name in names
    ]
    modes = {mod: mod.training for mod in model.modules()}
    device = _model_device(model)
    samples = [0, 0]
    count = 0
    try:
        model.eval()
        with torch.no_grad():
            bar = _progress(batches, total=_length(batches), desc="calibrate", enable=progress)
            for i, batch in enumerate(bar):
                count += 1
                into_held = held(i)
                state["into"] = held_stats if into_held else fit
                state["last"] = None
                samples[into_held] += _batch_size(batch)
                _forward(model, batch, i, device, state)
                del batch
    finally:
        state["last"] = None
        for handle in handles:
            handle.remove()
        for mod, mode in modes.items():
            mod.training = mode
    if count == 0:
        raise ValueError("calibration needs at least one batch; got none")
    missing = [name for name in names if name not in fit or fit[name].rows == 0]
    if missing:
        raise ValueError(
            f"layer {missing[0]!r} saw no calibration input (is it used in the forward pass?)"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    for where in (fit, held_stats):
        for name, st in where.items():
            if not (bool(torch.isfinite(st.xtx).all()) and bool(torch.isfinite(st.abs_sum).all())):
                raise ValueError(f"the calibration inputs of layer {name!r} contain NaN or Inf")
    return Calibration(
        {n: fit[n] for n in names},
        {n: held_stats[n] for n in names if n in held_stats},
        samples=samples[0],
        held_out_samples=samples[1],
    )


def whitening_factor(C: torch.Tensor, damping: float = DEFAULT_DAMPING) -> tuple[torch.Tensor, float]:
    """Lower-triangular ``S`` with ``S S^T = C + lam I``, ``lam = damping * mean(diag C)``; and ``lam``.

    The damping keeps ``S`` invertible when the calibration inputs do not span every direction
    (fewer rows than features, dead features); if the factorisation still fails, ``lam`` is raised
    tenfold until it succeeds (at most six times). ``C`` is symmetrised first; float64 throughout.
    """
    C = C.to(torch.float64)
    C = (C + C.T) / 2
    scale = float(torch.diagonal(C).mean().clamp_min(1e-30))
    lam = damping * scale
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    for _ in range(7):
        S, info = torch.linalg.cholesky_ex(C + lam * eye)
        if int(info) == 0 and bool(torch.isfinite(S).all()):
            return S, lam
        lam = max(lam * 10, 1e-12 * scale)
    raise ValueError("the calibration covariance is not positive definite even with damping")


def token_windows(
    tokenizer: Any, text: str, samples: int, seq_len: int = 256
) -> list[dict[str, torch.Tensor]]:
    """Up to ``samples`` non-overlapping windows of ``seq_len`` tokens of ``text``, one batch each.

    Each batch is ``{"input_ids": (1, seq_len), "attention_mask": ones}``; ValueError if the text
    holds fewer than ``seq_len`` tokens.
    """
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    n = min(int(samples), ids.numel() // seq_len)
    if n < 1:
        raise ValueError(f"the calibration text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    out = []
    for i in range(n):
        w = ids[i * seq_len : (i + 1) * seq_len].unsqueeze(0)
        out.append({"input_ids": w, "attention_mask": torch.ones_like(w)})
    return out
