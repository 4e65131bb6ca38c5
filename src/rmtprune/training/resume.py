"""Resuming a run: read a training checkpoint back and check every field before a byte is allocated.

A checkpoint is a file a stranger can send. :func:`load_checkpoint` loads it with
``weights_only=True`` and walks it (no recursion) for its structure, types and sizes; the
recorded architecture is rebuilt on the meta device and compared with the model spec before
the pruned model is allocated; the optimizer and scheduler states are compared with fresh ones.
Every problem is a one-line :class:`~rmtprune.errors.CheckpointError` naming the file and field.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, RmtpruneError
from ..io import restructure
from .config import _RESUME_MAY_CHANGE, TrainConfig, flat_overrides, flatten, unflatten
from .pruner import LogFn
from .run_files import _CORRUPT, _FORMAT, _VERSION, CHECKPOINT, PREVIOUS_CHECKPOINT
from .setup import _meta_model, _short
from .stability import check_state as check_stability

__all__ = ["load_checkpoint", "stored_config"]

#: Bounds on what a checkpoint may hold: nesting depth (a real one has 6 levels), containers and
#: values in all (a real one has a few per parameter tensor and per epoch).
_MAX_DEPTH = 16
_MAX_NODES = 10_000_000
_SCALARS = (str, int, float, bool, type(None))
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _BadFieldError(Exception):
    """A checkpoint field that is not what a checkpoint holds (the message names it)."""


def _check_structure(obj: Any, max_bytes: int) -> None:
    """Walk everything ``torch.load`` returned without recursion: refuse a cycle, nesting deeper
    than ``_MAX_DEPTH``, more than ``_MAX_NODES`` values, any type but containers, scalars and
    dense CPU tensors, and a tensor claiming more bytes than the file holds (a zero-stride view).
    """
    on_path: set[int] = set()
    done: set[int] = set()
    stack: list[tuple[Any, int, bool]] = [(obj, 0, False)]
    nodes = 0
    while stack:
        o, depth, leaving = stack.pop()
        if leaving:
            on_path.discard(id(o))
            done.add(id(o))
            continue
        nodes += 1
        if nodes > _MAX_NODES:
            raise _BadFieldError(f"it holds more than {_MAX_NODES:,} values")
        if isinstance(o, _SCALARS):
            continue
        if isinstance(o, torch.Tensor):
            if o.layout != torch.strided or o.device.type != "cpu" or o.is_quantized:
                raise _BadFieldError(
                    f"it holds a {o.layout} tensor on {o.device.type} (only dense CPU tensors are saved)"
                )
            if o.numel() * o.element_size() > max_bytes:
                raise _BadFieldError(
                    f"a tensor of shape {tuple(o.shape)} claims more bytes than the file holds"
                )
            continue
        if not isinstance(o, (dict, list, tuple)):
            raise _BadFieldError(
                f"it holds a {type(o).__name__} (only containers, numbers, strings and tensors are saved)"
            )
        if id(o) in on_path:
            raise _BadFieldError("it holds a container that contains itself")
        if id(o) in done:
            continue
        if depth >= _MAX_DEPTH:
            raise _BadFieldError(f"it is nested deeper than {_MAX_DEPTH} levels")
        on_path.add(id(o))
        stack.append((o, depth, True))
        items = [v for kv in o.items() for v in kv] if isinstance(o, dict) else o
        stack.extend((v, depth + 1, False) for v in items)


def _want(cond: bool, what: str) -> None:
    if not cond:
        raise _BadFieldError(what)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_rows(rows: Any, name: str) -> None:
    """A list of flat dicts of scalars (a nested dict of scalars allowed one level down)."""
    _want(isinstance(rows, list), f"{name} is not a list")
    for i, row in enumerate(rows):
        _want(isinstance(row, dict) and all(isinstance(k, str) for k in row), f"{name}[{i}] is not a dict")
        for key, value in row.items():
            if isinstance(value, dict):
                for sub in value.values():
                    ok = isinstance(sub, _SCALARS) or (
                        isinstance(sub, (dict, list)) and all(isinstance(x, _SCALARS) for x in _values(sub))
                    )
                    _want(ok, f"{name}[{i}][{key!r}] holds something other than numbers and names")
            else:
                _want(isinstance(value, _SCALARS), f"{name}[{i}][{key!r}] is not a number or a name")


def _values(obj: dict | list) -> list[Any]:
    return list(obj.values()) if isinstance(obj, dict) else list(obj)


def _check_architecture(arch: Any) -> None:
    """Every factored layer of the checkpoint, by the same check as a model file's manifest."""
    from ..manifest import check_layer_record

    _want(isinstance(arch, dict), "architecture is not a dict")
    for name, spec in arch.items():
        check_layer_record(name, spec, where=f"architecture[{name!r}]", error=_BadFieldError, strict=True)


def _check_rng(rng: Any) -> None:
    _want(isinstance(rng, dict), "rng is not a dict")
    size = torch.get_rng_state().numel()
    for key in ("torch", "loader"):
        t = rng.get(key)
        _want(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and tuple(t.shape) == (size,),
            f"rng[{key!r}] is not a generator state ({size} bytes)",
        )
    npst = rng.get("numpy")
    _want(isinstance(npst, dict), "rng['numpy'] is not a dict")
    keys = npst.get("keys")
    _want(npst.get("kind") == "MT19937", "rng['numpy'] kind is not MT19937")
    _want(
        isinstance(keys, torch.Tensor) and keys.dtype == torch.int64 and tuple(keys.shape) == (624,),
        "rng['numpy'] keys are not 624 int64 values",
    )
    _want(bool(((keys >= 0) & (keys < 2**32)).all()), "rng['numpy'] keys are not 32-bit values")
    _want(_is_int(npst.get("pos")) and 0 <= npst["pos"] <= 624, "rng['numpy'] pos is not in [0, 624]")
    _want(npst.get("has_gauss") in (0, 1), "rng['numpy'] has_gauss is not 0 or 1")
    _want(_is_num(npst.get("cached_gaussian")), "rng['numpy'] cached_gaussian is not a number")
    py = rng.get("python")
    _want(
        isinstance(py, (list, tuple))
        and len(py) == 3
        and py[0] == 3
        and isinstance(py[1], (list, tuple))
        and len(py[1]) == 625
        and all(_is_int(v) and 0 <= v < 2**32 for v in py[1])
        and (py[2] is None or _is_num(py[2])),
        "rng['python'] is not a Python random state",
    )
    cuda = rng.get("cuda", [])
    _want(
        isinstance(cuda, list) and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda),
        "rng['cuda'] is not a list of generator states",
    )


def _check_optimizer_state(opt: Any) -> None:
    _want(isinstance(opt, dict), "optimizer is not a dict")
    groups, st = opt.get("param_groups"), opt.get("state")
    _want(
        isinstance(groups, list) and all(isinstance(g, dict) for g in groups),
        "optimizer param_groups is not a list",
    )
    _want(isinstance(st, dict), "optimizer state is not a dict")
    for i, g in enumerate(groups):
        for key, value in g.items():
            where = f"optimizer param_groups[{i}][{key!r}]"
            if key == "params":
                _want(
                    isinstance(value, list) and all(_is_int(v) for v in value),
                    f"{where} is not a list of ints",
                )
            elif isinstance(value, (list, tuple)):
                _want(all(_is_num(v) and math.isfinite(v) for v in value), f"{where} is not finite numbers")
            else:
                _want(isinstance(value, _SCALARS), f"{where} is not a number")
                _want(not _is_num(value) or math.isfinite(value), f"{where}={value!r} is not finite")
        lr = g.get("lr")
        _want(_is_num(lr) and lr >= 0, f"optimizer param_groups[{i}] lr={lr!r} is not a number >= 0")
    for key, entry in st.items():
        _want(
            _is_int(key) and isinstance(entry, dict), f"optimizer state[{key!r}] is not a parameter's state"
        )
        for name, value in entry.items():
            _want(
                isinstance(value, torch.Tensor) or _is_num(value),
                f"optimizer state[{key}][{name!r}] is not a tensor or a number",
            )


def _check_state(state: Any, max_bytes: int) -> None:
    """Everything about a checkpoint that does not need the model; raise :class:`_BadFieldError`."""
    _check_structure(state, max_bytes)
    _want(
        isinstance(state, dict) and state.get("format") == _FORMAT,
        "it is not an rmtprune training checkpoint",
    )
    _want(state.get("version") == _VERSION, f"checkpoint version {state.get('version')!r} is not {_VERSION}")
    missing = [
        k
        for k in ("epoch", "config", "architecture", "model", "optimizer", "scheduler", "rng")
        if k not in state
    ]
    _want(not missing, f"it lacks {', '.join(missing)}")
    _want(isinstance(state["config"], dict), "config is not a dict")
    try:
        cfg, _ = stored_config(state["config"])
    except (TypeError, ValueError) as exc:
        raise _BadFieldError(f"it holds an invalid run configuration: {exc}") from None
    epoch = state["epoch"]
    _want(_is_int(epoch) and 1 <= epoch <= cfg.epochs, f"epoch={epoch!r} is not in [1, epochs={cfg.epochs}]")
    _want(state.get("data_dir") is None or isinstance(state["data_dir"], str), "data_dir is not a path")
    _check_architecture(state["architecture"])
    sd = state["model"]
    _want(isinstance(sd, dict) and bool(sd), "model is not a state dict")
    for key, t in sd.items():
        _want(isinstance(key, str) and isinstance(t, torch.Tensor), f"model[{key!r}] is not a named tensor")
        _want(t.dtype in _FLOAT_DTYPES, f"model[{key!r}] has dtype {t.dtype}, not a float type")
    _check_optimizer_state(state["optimizer"])
    sched = state["scheduler"]
    _want(isinstance(sched, dict) and all(isinstance(k, str) for k in sched), "scheduler is not a dict")
    _check_rng(state["rng"])
    metrics = state.get("metrics", [])
    _check_rows(metrics, "metrics")
    _want(len(metrics) == epoch, f"metrics has {len(metrics)} rows for {epoch} epochs")
    for i, row in enumerate(metrics):
        _want(row.get("epoch") == i + 1, f"metrics[{i}] epoch={row.get('epoch')!r} is not {i + 1}")
        for key in ("lr", "train_loss", "train_acc", "test_loss", "test_acc", "params"):
            _want(_is_num(row.get(key)), f"metrics[{i}][{key!r}]={row.get(key)!r} is not a number")
        _want(isinstance(row.get("layers", {}), dict), f"metrics[{i}]['layers'] is not a dict")
    pruner = state.get("pruner", {})
    _want(isinstance(pruner, dict), "pruner is not a dict")
    for key in ("history", "events"):
        _check_rows(pruner.get(key, []), f"pruner[{key!r}]")
    try:
        check_stability(state.get("stability", {}))
    except ValueError as exc:
        raise _BadFieldError(str(exc)) from None


#: Fields a run configuration saved by an earlier release may lack, with the value the run was
#: trained with. ``val_size`` (the validation split, added later) is 0, not its default None: such a
#: run trained on the whole training file, and None would resume it on 5,000 images fewer.
_UNRECORDED = {"val_size": 0}


def stored_config(data: dict[str, Any]) -> tuple[TrainConfig, tuple[str, ...]]:
    """The run configuration a checkpoint holds, and the fields it did not record (filled in with the
    values the run was trained with, :data:`_UNRECORDED`: a config saved before ``val_size`` existed
    resumes with ``val_size=0``, the whole training file it started on)."""
    missing = tuple(k for k in _UNRECORDED if k not in data)
    return TrainConfig.from_dict({**data, **{k: _UNRECORDED[k] for k in missing}}), missing


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """Load and check a checkpoint (no code runs: ``weights_only``); every problem is a one-line
    :class:`CheckpointError` naming the file and the field."""
    try:
        size = path.stat().st_size
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{str(path)!r} does not exist") from None
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"{str(path)!r} is not a readable checkpoint ({_short(exc)})") from exc
    try:
        _check_state(state, size)
    except _BadFieldError as exc:
        raise CheckpointError(f"{str(path)!r} is not a valid rmtprune training checkpoint: {exc}") from None
    except RecursionError:  # pragma: no cover - the walk above has no recursion; belt and braces
        raise CheckpointError(f"{str(path)!r} is nested too deeply to be a checkpoint") from None
    return state


def load_checkpoint(
    out: str | os.PathLike[str], log: LogFn | None = None, *, move: bool = True
) -> tuple[dict[str, Any], Path]:
    """The newest usable checkpoint of the run in directory ``out``, and its path.

    If ``checkpoint.pt`` is damaged (a truncated write, a full disk, a bad copy) it is moved aside to
    ``checkpoint.corrupt.pt`` (``move=False``: left where it is, for a reader that must not write:
    the launcher's preflight, a rank other than 0) and ``checkpoint.prev.pt`` is used, saying so
    through ``log``.
    Raises :class:`CheckpointError` naming both files when neither can be used.
    """
    out = Path(out).expanduser()
    latest, prev = out / CHECKPOINT, out / PREVIOUS_CHECKPOINT
    if not latest.exists() and not prev.exists():
        raise CheckpointError(
            f"no checkpoint to resume in {str(out)!r} (looked for {CHECKPOINT}, {PREVIOUS_CHECKPOINT})"
        )
    problems = []
    try:
        return _read_checkpoint(latest), latest
    except CheckpointError as exc:
        problems.append(str(exc))
    try:
        state = _read_checkpoint(prev)
    except CheckpointError as exc:
        problems.append(str(exc))
        raise CheckpointError("cannot resume: " + "; ".join(problems)) from None
    if move and latest.exists():
        os.replace(latest, out / _CORRUPT)
        problems[0] += f" (moved to {_CORRUPT})"
    if log is not None:
        log(
            f"warning: {problems[0]}; resuming from the previous checkpoint {str(prev)!r} "
            f"(epoch {state['epoch']})"
        )
    return state, prev


def _resumed_model(
    cfg: TrainConfig, state: dict[str, Any], path: Path, input_shape: Any, num_classes: int
) -> tuple[nn.Module, int]:
    """The checkpoint's (pruned) model, checked against ``cfg.model`` on the meta device first.

    Every recorded factored layer must name a layer of the model with the recorded matrix shape
    and a rank within ``min(m, n)``, and every tensor of the checkpoint must have exactly the
    shape of the model's; only then is memory allocated, and only for the pruned model. Returns
    the model and the parameter count of the model as first built (before any cut).
    """
    meta = _meta_model(cfg, input_shape, num_classes)
    initial = sum(p.numel() for p in meta.parameters())

    where = f"{str(path)!r} does not fit model {cfg.model!r} on {cfg.dataset}"
    try:
        restructure(meta, state["architecture"])
    except (CheckpointError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{where}: {_short(exc) if not isinstance(exc, RmtpruneError) else exc}"
        ) from None
    expected = meta.state_dict()
    got = state["model"]
    for key, t in expected.items():
        if key not in got:
            raise CheckpointError(
                f"{where}: tensor {key!r} ({tuple(t.shape)}) is missing from the checkpoint"
            )
        if tuple(got[key].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{where}: tensor {key!r} is {tuple(got[key].shape)} in the checkpoint, "
                f"{tuple(t.shape)} in the model"
            )
    extra = sorted(set(got) - set(expected))
    if extra:
        raise CheckpointError(f"{where}: the checkpoint has tensor {extra[0]!r}, which the model has not")
    saved = {k for k, _ in meta.named_parameters()} | {k for k, _ in meta.named_buffers()}
    if saved != set(expected):  # a non-persistent buffer the state dict would not fill: build for real
        from ..zoo.models import build_model

        with torch.random.fork_rng(devices=[]):
            model = build_model(cfg.model, input_shape, num_classes)
        restructure(model, state["architecture"])
    else:
        model = meta.to_empty(device="cpu")
    try:
        model.load_state_dict(got)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{where}: {_short(exc)}") from None
    return model.to(cfg.device), initial


def _check_optimizer_fits(optimizer: torch.optim.Optimizer, saved: dict[str, Any], where: str) -> None:
    """The saved optimizer state has the groups of ``optimizer`` and per-parameter tensors of the
    parameters' shapes (torch would broadcast a wrong-shaped momentum silently or fail mid-epoch)."""
    fresh = optimizer.state_dict()
    groups = saved["param_groups"]
    if len(groups) != len(fresh["param_groups"]):
        raise CheckpointError(
            f"{where}: {len(groups)} optimizer parameter group(s), the model has {len(fresh['param_groups'])}"
        )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, (g, f) in enumerate(zip(groups, fresh["param_groups"], strict=True)):
        if g["params"] != f["params"]:
            raise CheckpointError(
                f"{where}: optimizer group {i} lists parameters {g['params'][:8]}, "
                f"the model {f['params'][:8]}"
            )
    for key, entry in saved["state"].items():
        if not 0 <= key < len(params):
            raise CheckpointError(
                f"{where}: optimizer state names parameter {key}, the model has {len(params)}"
            )
        shape = tuple(params[key].shape)
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.ndim and tuple(value.shape) != shape:
                raise CheckpointError(
                    f"{where}: optimizer state {name!r} of parameter {key} is {tuple(value.shape)}, "
                    f"the parameter {shape}"
                )
            if isinstance(value, torch.Tensor) and not value.ndim == 0 and value.dtype not in _FLOAT_DTYPES:
                raise CheckpointError(
                    f"{where}: optimizer state {name!r} of parameter {key} has dtype {value.dtype}"
                )


def _check_scheduler_fits(scheduler: Any, saved: dict[str, Any], where: str) -> None:
    """The saved scheduler state sets only the attributes a fresh one has, with values of the same kind
    (``load_state_dict`` copies every key into the scheduler's ``__dict__``)."""
    fresh = scheduler.state_dict()
    for key, value in saved.items():
        if key not in fresh:
            raise CheckpointError(f"{where}: scheduler state has unknown field {key!r}")
        ref = fresh[key]
        if isinstance(ref, list):
            ok = (
                isinstance(value, list)
                and len(value) == len(ref)
                and all(
                    (v is None and r is None) or (_is_num(v) and _is_num(r) and math.isfinite(v))
                    for v, r in zip(value, ref, strict=True)
                )
            )
        elif isinstance(ref, bool):
            ok = isinstance(value, bool)
        elif _is_num(ref):
            ok = _is_num(value) and math.isfinite(value) and (not _is_int(ref) or _is_int(value))
        else:
            ok = type(value) is type(ref)
        if not ok:
            raise CheckpointError(
                f"{where}: scheduler state {key}={value!r} does not fit ({type(ref).__name__} expected)"
            )


def _resume_config(
    stored: TrainConfig,
    config: TrainConfig | None,
    overrides: dict[str, Any],
    done: int,
    unrecorded: tuple[str, ...] = (),
) -> TrainConfig:
    """The stored config, with the few changes a resume allows (more epochs, another device).

    ``unrecorded`` names the fields the stored config lacked (:func:`stored_config`): a ``config``
    holding their default (a script written before they existed) keeps the stored value; only an
    override (``val_size=...``) asks for another."""
    merged = flatten(stored.to_dict())
    asked = flatten(config.to_dict() if config is not None else stored.to_dict())
    defaults = flatten(TrainConfig().to_dict())
    for key in unrecorded:
        if asked.get(key) == defaults.get(key):
            asked[key] = merged[key]
    asked |= flat_overrides(overrides)
    for key, value in asked.items():
        if key not in merged:
            raise TypeError(f"train() got unknown option {key!r}")
        if value == merged[key]:
            continue
        if key not in _RESUME_MAY_CHANGE:
            raise RmtpruneError(
                f"{key}={value!r} differs from the run being resumed ({key}={merged[key]!r}); a resumed run "
                f"continues its stored configuration (only {', '.join(_RESUME_MAY_CHANGE)} may change)"
            )
        merged[key] = value
    cfg = TrainConfig.from_dict(unflatten(merged))
    if cfg.epochs != stored.epochs and cfg.lr_schedule == "cosine":
        raise RmtpruneError(
            f"epochs={cfg.epochs} differs from the run being resumed (epochs={stored.epochs}) and its cosine "
            "learning-rate schedule is fixed to that length"
        )
    if cfg.epochs < done:
        raise RmtpruneError(
            f"epochs={cfg.epochs} is fewer than the {done} epochs the checkpoint already holds"
        )
    return cfg
