"""Pruning during training (METHOD.md section 7): the :class:`RMTPruner` callback and the optimizer surgery.

:class:`RMTPruner` is the callback for any training loop: at the end of every ``every``-th epoch
from ``start`` it fits each layer's Marchenko-Pastur bulk, keeps ``n_spikes + floor(f(epoch) *
n_bulk)`` singular triplets and factors the layer (through :func:`rmtprune.compress`), then
:func:`rebuild_optimizer` points the optimizer's parameter groups at the new parameters.

References
----------
Shmalo, Y. et al. (2023). Deep learning weight pruning with RMT-SVD: increasing accuracy and
reducing overfitting. arXiv:2303.08986.
Berlyand, L., Sandier, E., Shmalo, Y. and Zhang, L. (2023). Enhancing accuracy in deep learning
using random matrix theory. arXiv:2310.03165.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._validate import check_fields, check_int, check_number

__all__ = ["RMTPruner", "rebuild_optimizer", "LogFn"]

LogFn = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# Optimizer surgery
# --------------------------------------------------------------------------------------------


def _module_path(name: str) -> str:
    return name.rpartition(".")[0]


def _closest_old(name: str, old_names: list[str]) -> str | None:
    """The old parameter that lived closest to ``name`` in the module tree (longest shared prefix)."""
    path = _module_path(name)
    while True:
        for old in old_names:
            op = _module_path(old)
            if op == path or (path and op.startswith(path + ".")) or not path:
                return old
        if not path:
            return None
        path = _module_path(path)


def rebuild_optimizer(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    old_params: dict[str, nn.Parameter],
) -> dict[str, list[str]]:
    """Point ``optimizer`` at ``model``'s parameters after module surgery, in place.

    Parameters still present (same object) keep their group and their state (momentum, Adam
    moments); parameters that were removed lose theirs; new parameters (the factors of a layer
    that was cut) join the group of the old parameter closest to them in the module tree and
    start with fresh state, except a tensor copied unchanged into the new layer (its bias),
    which takes over the state and the group of the one it copies (a no-weight-decay group of
    biases stays one). Group hyper-parameters, ``lr`` included,
    are untouched, so a learning rate scheduler attached to ``optimizer`` continues where it was.

    Parameters
    ----------
    optimizer : the optimizer that was training ``model`` before the surgery.
    model : the model after surgery.
    old_params : ``dict(model.named_parameters())`` taken before the surgery.

    Returns
    -------
    dict with the parameter names that were ``kept``, ``carried`` (new tensor, state taken over
    from the identical old one), ``added`` (fresh state) and ``removed``.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    group_of: dict[int, int] = {}
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            group_of[id(p)] = gi
    old_ids = {id(p) for p in old_params.values()}
    old_names = list(old_params)
    new_named = list(model.named_parameters())
    new_ids = {id(p) for _, p in new_named}

    # Parameters the optimizer holds that are not (and were not) the model's: left as they are.
    foreign: list[list[torch.Tensor]] = [
        [p for p in g["params"] if id(p) not in old_ids and id(p) not in new_ids]
        for g in optimizer.param_groups
    ]
    new_lists: list[list[torch.Tensor]] = [[] for _ in optimizer.param_groups]
    kept, added, carried = [], [], []
    removed = [n for n, p in old_params.items() if id(p) not in new_ids and id(p) in group_of]
    for name, p in new_named:
        if id(p) in group_of:
            new_lists[group_of[id(p)]].append(p)
            kept.append(name)
            continue
        if id(p) in old_ids:  # an old parameter the optimizer never trained (frozen): still not trained
            continue
        twin = _same_tensor(name, p, old_params, removed)
        # A copied tensor (the bias of a cut layer) joins its original's group (e.g. a no-decay group
        # of biases); a new factor joins the group of the old parameter closest to it in the tree.
        old = twin if twin is not None else _closest_old(name, old_names)
        if old is None or id(old_params[old]) not in group_of:
            continue
        new_lists[group_of[id(old_params[old])]].append(p)
        if twin is not None and old_params[twin] in optimizer.state:
            # A tensor copied unchanged into the new layer (the bias of a cut layer): same state.
            optimizer.state[p] = _clone_state(optimizer.state[old_params[twin]])
            carried.append(name)
        else:
            added.append(name)

    for gi, group in enumerate(optimizer.param_groups):
        group["params"] = new_lists[gi] + foreign[gi]
    live = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for p in [p for p in optimizer.state if id(p) not in live]:
        del optimizer.state[p]
    return {"kept": kept, "carried": carried, "added": added, "removed": removed}


def _same_tensor(
    name: str, p: torch.Tensor, old_params: dict[str, nn.Parameter], removed: list[str]
) -> str | None:
    """A removed parameter of the same layer, leaf name and value as ``p`` (a bias moved into a factor)."""
    leaf = name.rpartition(".")[2]
    path = _module_path(name)
    for old in removed:
        o = old_params[old]
        same_place = path == _module_path(old) or path.startswith(_module_path(old) + ".")
        if (
            same_place
            and old.rpartition(".")[2] == leaf
            and o.shape == p.shape
            and torch.equal(o.data, p.data)
        ):
            return old
    return None


def _clone_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


# --------------------------------------------------------------------------------------------
# The callback
# --------------------------------------------------------------------------------------------


class RMTPruner:
    """Prune a model's layers to their RMT rank periodically during training (Algorithm 1).

    Call ``model, optimizer = pruner.update(model, epoch, optimizer)`` at the end of every epoch
    with the number of epochs completed so far (a plain module or a DDP-wrapped one; for a plain
    module :meth:`maybe_prune`, which cuts in place, is the same). At epochs ``start, start + every,
    ...`` each prunable layer whose bulk fits the Marchenko-Pastur law (KS distance
    ``<= ks_max``) keeps ``n_spikes + floor(f(epoch) * n_bulk)`` singular triplets and is stored
    as two thin factors; already factored layers are cut again.
    ``f`` is the constant ``keep_bulk`` or, with ``decay_T``, the linear decay
    ``max(0, 1 - epoch / decay_T)``. Every decision is appended to :attr:`history_`.

    Parameters
    ----------
    every : prune every this many epochs.
    start : first epoch that prunes; default ``every`` (so never at random initialisation unless
        ``start=0`` is asked for: an untrained layer is all bulk and would lose most of its rank).
    keep_bulk : constant fraction of the bulk kept, in [0, 1] (the 2023 notebook used 0.45).
    decay_T : if given, ``f(epoch) = max(0, 1 - epoch / decay_T)`` instead (papers: 200 or 300).
    config : a base :class:`rmtprune.CompressionConfig` (rule, gate ``ks_max``, ``min_rank``,
        ``include``/``exclude`` patterns, per-layer ``overrides``...); default ``CompressionConfig()``.
        Its ``keep_bulk`` is replaced by ``f(epoch)`` at each cut.
    **config_overrides : fields of the config to replace (``ks_max=0.2``, ``min_rank=4``, ...).
    log : called with one line per decision and per optimizer rebuild (default: silent).

    Attributes
    ----------
    history_ : list of dicts, one per layer per cut: ``epoch, layer, f, rank_before, rank_after,
        n_spikes, n_bulk, sigma2, ks, action, reason, params_before, params_after``.
    events_ : list of dicts, one per cut: ``epoch, f, params_before, params_after, seconds,
        optimizer`` (names of parameters whose optimizer state was kept / fresh).
    """

    def __init__(
        self,
        every: int = 1,
        start: int | None = None,
        keep_bulk: float = 0.45,
        decay_T: float | None = None,
        *,
        config: Any = None,
        log: LogFn | None = None,
        **config_overrides: Any,
    ) -> None:
        self.every = check_int("every", every, 1)
        self.start = self.every if start is None else check_int("start", start, 0)
        self.keep_bulk = check_number("keep_bulk", keep_bulk, 0.0, 1.0)
        if decay_T is not None:
            if not isinstance(decay_T, (int, float)) or isinstance(decay_T, bool):
                raise TypeError(f"decay_T={decay_T!r} must be a positive number or None")
            if not (decay_T > 0 and math.isfinite(decay_T)):
                raise ValueError(f"decay_T={decay_T!r} must be a positive finite number")
        self.decay_T = None if decay_T is None else float(decay_T)
        self.config = config
        self.config_overrides = dict(config_overrides)
        self.log = log
        self.history_: list[dict[str, Any]] = []
        self.events_: list[dict[str, Any]] = []
        self._base_config()  # validate the compression options now, not at the first cut

    # -- schedule ------------------------------------------------------------------------------

    def fraction(self, epoch: int) -> float:
        """``f(epoch)``: the fraction of the bulk kept by a cut at ``epoch``."""
        check_int("epoch", epoch, 0)
        if self.decay_T is None:
            return self.keep_bulk
        return max(0.0, 1.0 - epoch / self.decay_T)

    def should_prune(self, epoch: int) -> bool:
        """Whether a cut happens at the end of ``epoch`` (epochs completed so far)."""
        check_int("epoch", epoch, 0)
        return epoch >= self.start and (epoch - self.start) % self.every == 0

    def schedule(self, epochs: int) -> list[tuple[int, float]]:
        """``(epoch, f(epoch))`` for every cut in a run of ``epochs`` epochs (epoch 0 = initialisation)."""
        return [(e, self.fraction(e)) for e in range(0, epochs + 1) if self.should_prune(e)]

    # -- the cut -------------------------------------------------------------------------------

    def _base_config(self, keep_bulk: float | None = None) -> Any:
        """The compression config of a cut: ``config`` with the overrides and ``keep_bulk = f``."""
        from ..config import CompressionConfig

        fields: dict[str, Any] = dict(self.config_overrides)
        if keep_bulk is not None:
            fields["keep_bulk"] = keep_bulk
        if self.config is None:
            return CompressionConfig(**fields)
        if not isinstance(self.config, CompressionConfig):
            raise TypeError(f"config must be a rmtprune.CompressionConfig, got {type(self.config).__name__}")
        try:
            check_fields("CompressionConfig", fields, (f.name for f in dataclasses.fields(CompressionConfig)))
        except ValueError as exc:
            raise TypeError(str(exc)) from None  # a wrong keyword argument, as Python says it
        return dataclasses.replace(self.config, **fields)

    def maybe_prune(
        self, model: nn.Module, epoch: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.Optimizer | None:
        """Cut ``model`` in place if the schedule says so at ``epoch``; return the optimizer.

        The optimizer returned is the same object, its parameter groups rebuilt over the new
        parameters (see :func:`rebuild_optimizer`), so a scheduler built on it keeps working.
        """
        if self.should_prune(epoch):
            self.prune(model, epoch, optimizer)
        return optimizer

    def prune(
        self, model: nn.Module, epoch: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.Optimizer | None:
        """Cut ``model`` in place now, whatever the schedule, with ``f(epoch)``; return the optimizer."""
        from . import distributed

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        inner, wrapper = distributed.unwrap(model)
        if wrapper is not None:
            raise TypeError(
                "the model is wrapped in DistributedDataParallel, which must be rebuilt after a cut: "
                "call model, optimizer = pruner.update(model, epoch, optimizer) instead"
            )
        f = self.fraction(epoch)
        t0 = time.perf_counter()
        old = dict(model.named_parameters())
        before = sum(p.numel() for p in old.values())
        report = self._cut(model, self._base_config(keep_bulk=f))
        opt_info = None
        if optimizer is not None:
            opt_info = rebuild_optimizer(optimizer, model, old)
        seconds = time.perf_counter() - t0
        after = sum(p.numel() for p in model.parameters())
        rows = [dict(epoch=epoch, f=f, **row) for row in _report_rows(report)]
        self.history_.extend(rows)
        event = {
            "epoch": epoch,
            "f": f,
            "params_before": before,
            "params_after": after,
            "seconds": seconds,
            "optimizer": opt_info,
        }
        self.events_.append(event)
        if self.log is not None and distributed.world()[0] == 0:
            for row in rows:
                self.log(_format_decision(row))
            if opt_info is not None and opt_info["added"]:
                carried = f", {', '.join(opt_info['carried'])} take over the state of the tensor they copy"
                self.log(
                    f"epoch {epoch}: optimizer rebuilt: {len(opt_info['kept'])} parameters keep their state, "
                    f"{len(opt_info['added'])} new ({', '.join(opt_info['added'])}) start with fresh state"
                    + (carried if opt_info["carried"] else "")
                )
            self.log(f"epoch {epoch}: f={f:.3f}, parameters {before:,} -> {after:,} ({seconds:.2f} s)")
        return optimizer

    def _cut(self, model: nn.Module, config: Any) -> Any:
        """Plan and apply one cut in place; under ``torch.distributed`` rank 0 plans for every rank."""
        from ..surgery import apply, compress
        from . import distributed

        if not distributed.is_distributed():
            out, report = compress(model, config=config)
            if out is not model:
                raise RuntimeError("rmtprune.compress returned a new model; RMTPruner needs in-place surgery")
            return report
        report = distributed.plan_on_rank0(model, config)
        apply(model, report)
        distributed.broadcast_module(model)  # the factors of rank 0 on every rank, bit for bit
        return report

    def update(
        self, model: nn.Module, epoch: int, optimizer: torch.optim.Optimizer | None = None
    ) -> tuple[nn.Module, torch.optim.Optimizer | None]:
        """The one call of a loop at the end of every epoch: ``model, optimizer = pruner.update(...)``.

        Cuts if the schedule says so at ``epoch`` (epochs completed) and returns the model to train
        on and its optimizer (the same object, rebuilt over the new parameters). A plain module is
        cut in place and returned. A :class:`~torch.nn.parallel.DistributedDataParallel` model is
        cut on every rank with rank 0's decisions (see :mod:`rmtprune.training.distributed`) and a
        new DDP wrapper with the old one's settings is returned: every rank must call this at the
        same epoch. An FSDP-sharded model is refused.
        """
        from . import distributed

        inner, wrapper = distributed.unwrap(model)
        if not self.should_prune(epoch):
            return model, optimizer
        self.prune(inner, epoch, optimizer)
        return (inner if wrapper is None else distributed.rewrap(inner, wrapper)), optimizer

    def state_dict(self) -> dict[str, Any]:
        """The decision log, for checkpoints."""
        return {"history": [dict(r) for r in self.history_], "events": [dict(e) for e in self.events_]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the decision log saved by :meth:`state_dict`."""
        self.history_ = [dict(r) for r in state.get("history", [])]
        self.events_ = [dict(e) for e in state.get("events", [])]


def _format_decision(row: dict[str, Any]) -> str:
    def g(key: str, fmt: str = "{}") -> str:
        v = row.get(key)
        return "-" if v is None else fmt.format(v)

    return (
        f"epoch {row['epoch']}: {row['layer']}: {row['action']} rank {g('rank_before')} -> "
        f"{g('rank_after')} (n_spikes={g('n_spikes')}, n_bulk={g('n_bulk')}, sigma2={g('sigma2', '{:.3g}')}, "
        f"ks={g('ks', '{:.3f}')}, f={row['f']:.3f})" + (f": {row['reason']}" if row.get("reason") else "")
    )


def _report_rows(report: Any) -> list[dict[str, Any]]:
    """One flat dict per layer of a compression report (:class:`rmtprune.Plan`)."""
    rows = []
    for lp in report:
        fit = lp.fit or {}
        rows.append(
            {
                "layer": lp.name,
                "action": lp.action,
                "rank_before": lp.rank_before,
                "rank_after": lp.rank,
                "n_spikes": fit.get("n_spikes"),
                "n_bulk": fit.get("n_bulk"),
                "sigma2": fit.get("sigma2"),
                "ks": fit.get("ks"),
                "params_before": lp.params_before,
                "params_after": lp.params_after,
                "reason": lp.reason,
            }
        )
    return rows


def _layer_columns(row: dict[str, Any]) -> dict[str, Any]:
    """The per-layer metrics columns from a decision row (the rank is the one after the cut)."""
    return {
        "rank": row.get("rank_after"),
        "sigma2": row.get("sigma2"),
        "n_spikes": row.get("n_spikes"),
        "n_bulk": row.get("n_bulk"),
        "ks": row.get("ks"),
    }
