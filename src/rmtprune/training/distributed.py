"""Pruning under ``torch.distributed`` (DDP): one decision for every rank, the same surgery everywhere.

Under :class:`~torch.nn.parallel.DistributedDataParallel` every rank holds a full copy of the model.
A cut must leave every copy with the same architecture and the same factors, or the next
gradient all-reduce mixes tensors of different shapes (or hangs). The cut here is:

1. every rank checks that the ranks hold the same architecture (an all-gather of a digest of the
   parameter names and shapes), so a mismatch is one clear error instead of a hang;
2. rank 0 alone fits the spectra and makes the :class:`~rmtprune.Plan`, and broadcasts it as JSON
   text (a failure on rank 0 is broadcast too, so the other ranks raise the same error);
3. every rank applies that plan to its own copy, then rank 0's parameters and buffers are
   broadcast, so the factors are bit-identical whatever each rank's SVD gave;
4. the caller re-wraps DDP (the old wrapper's reducer knows only the old parameters) with the same
   settings (:func:`rewrap`) and every rank rebuilds its optimizer the same way.

FSDP (``FullyShardedDataParallel``, ``fully_shard``) is refused: each rank holds a shard of every
weight, and a cut needs whole matrices (see docs/training.md, "Distributed training").

The collectives run on the CPU for ``gloo`` and on the current CUDA device for ``nccl``. Every
collective honours the process group's timeout, so a rank that died makes the others raise
:class:`~rmtprune.errors.DistributedError` instead of waiting forever.
"""

from __future__ import annotations

import hashlib
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import DistributedError

__all__ = [
    "world",
    "is_distributed",
    "unwrap",
    "rewrap",
    "broadcast_text",
    "broadcast_module",
    "all_reduce_sums",
    "check_same",
    "init_from_env",
    "leave",
    "wrap",
    "reduce_counts",
    "gather_stability",
    "DEFAULT_TIMEOUT_S",
]

#: Seconds a collective waits for the other ranks before it fails (``--dist-timeout``).
DEFAULT_TIMEOUT_S = 300.0

_ERROR_MARK = "\x00rmtprune-error\x00"


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """Whether a default process group with more than one rank is running."""
    return world()[1] > 1


def _is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - builds without distributed
        return False
    return any(isinstance(m, (FullyShardedDataParallel, FSDPModule)) for m in model.modules())


def unwrap(model: nn.Module) -> tuple[nn.Module, nn.parallel.DistributedDataParallel | None]:
    """``(module, wrapper)``: the module a DDP wrapper holds and the wrapper, or ``(model, None)``.

    Raises ``ValueError`` for a model sharded by FSDP (a cut needs whole weight matrices) and for
    ``nn.DataParallel`` (its replicas are rebuilt every forward; cut ``model.module`` instead).
    """
    if _is_fsdp(model):
        raise ValueError(
            "RMT pruning does not support FSDP-sharded models: each rank holds only a shard of every "
            "weight and a cut needs whole matrices; train with DDP (DistributedDataParallel), or gather "
            "a full state dict, cut it with rmtprune.compress and shard the factored model again"
        )
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module, model
    if isinstance(model, nn.DataParallel):
        raise ValueError("cut model.module, not the nn.DataParallel wrapper (or use DDP)")
    return model, None


DDP = nn.parallel.DistributedDataParallel


def rewrap(module: nn.Module, old: DDP) -> DDP:
    """A new DDP wrapper of ``module`` with ``old``'s settings (devices, buffers, buckets, process group).

    Needed after every cut: DDP's reducer is built over the parameters it was given, so new
    factors would never be all-reduced and removed weights would be waited for. Constructing the
    wrapper also broadcasts rank 0's parameters and buffers.
    """
    kwargs: dict[str, Any] = {
        "device_ids": old.device_ids,
        "output_device": old.output_device,
        "dim": old.dim,
        "process_group": old.process_group,
        "bucket_cap_mb": old.bucket_bytes_cap / (1024 * 1024),
        "find_unused_parameters": old.find_unused_parameters,
        "gradient_as_bucket_view": old.gradient_as_bucket_view,
        "static_graph": old.static_graph,
    }
    if hasattr(old, "forward_sync_buffers"):  # torch >= 2.12; earlier releases: broadcast_buffers
        kwargs["forward_sync_buffers"] = old.forward_sync_buffers
    elif hasattr(old, "broadcast_buffers"):
        kwargs["broadcast_buffers"] = old.broadcast_buffers
    return nn.parallel.DistributedDataParallel(module, **kwargs)


def _device() -> torch.device:
    """Where the default group's collectives run: the current CUDA device for nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def lost(exc: BaseException, what: str) -> DistributedError:
    rank, size = world()
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DistributedError(
        f"rank {rank} of {size}: {what} failed, probably because another rank stopped or timed out "
        f"({text[:300]})"
    )


def broadcast_text(text: str | None, src: int = 0, what: str = "broadcast") -> str:
    """``text`` of rank ``src`` on every rank (UTF-8 bytes in a uint8 tensor, its length first)."""
    rank, _ = world()
    dev = _device()
    try:
        data = (text or "").encode() if rank == src else b""
        n = torch.tensor([len(data)], dtype=torch.int64, device=dev)
        dist.broadcast(n, src)
        buf = torch.empty(int(n.item()), dtype=torch.uint8, device=dev)
        if rank == src:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buf, src)
    except (RuntimeError, dist.DistBackendError) as exc:
        raise lost(exc, what) from exc
    return bytes(buf.cpu().tolist()).decode() if rank != src else (text or "")


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``module`` (same architecture)."""
    dev = _device()
    try:
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                if t.device == dev:
                    dist.broadcast(t.data, src)
                else:  # e.g. a CPU module under nccl
                    tmp = t.data.to(dev)
                    dist.broadcast(tmp, src)
                    t.data.copy_(tmp)
    except (RuntimeError, dist.DistBackendError) as exc:
        raise lost(exc, "broadcasting the cut model") from exc


def all_reduce_sums(values: list[float], what: str = "reducing the metrics") -> list[float]:
    """Element-wise sums of ``values`` over every rank (float64); ``values`` unchanged without a group.
    ``what`` names the step in the error of a lost rank."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    try:
        dist.all_reduce(t)
    except (RuntimeError, dist.DistBackendError) as exc:
        raise lost(exc, what) from exc
    return [float(v) for v in t.cpu()]


def _digest(text: str) -> torch.Tensor:
    h = hashlib.sha256(text.encode()).digest()[:16]
    words = [int.from_bytes(h[i : i + 8], "little", signed=True) for i in (0, 8)]
    return torch.tensor(words, dtype=torch.int64)


def check_same(text: str, what: str) -> None:
    """Raise :class:`DistributedError` unless every rank passes the same ``text`` (a digest all-gather)."""
    rank, size = world()
    if size == 1:
        return
    mine = _digest(text).to(_device())
    got = [torch.empty_like(mine) for _ in range(size)]
    try:
        dist.all_gather(got, mine)
    except (RuntimeError, dist.DistBackendError) as exc:
        raise lost(exc, f"comparing the {what}") from exc
    differ = [r for r, g in enumerate(got) if not torch.equal(g, got[0])]
    if differ:
        raise DistributedError(
            f"rank {rank} of {size}: the ranks hold different {what} (rank(s) "
            f"{', '.join(map(str, differ))} differ from rank 0); every rank must build the same model"
        )


def architecture(model: nn.Module) -> str:
    """Names, shapes and dtypes of ``model``'s parameters and buffers, a line each (:func:`check_same`)."""
    rows = [f"{n} {tuple(t.shape)} {t.dtype}" for n, t in model.named_parameters()]
    rows += [f"{n} {tuple(t.shape)} {t.dtype}" for n, t in model.named_buffers()]
    return "\n".join(rows)


def plan_on_rank0(model: nn.Module, config: Any) -> Any:
    """The :class:`~rmtprune.Plan` rank 0 makes for ``model``, on every rank (keeping its SVD on rank 0)."""
    from ..plan_record import Plan
    from ..surgery import plan

    rank, _ = world()
    check_same(architecture(model), "model architectures")
    p = None
    text = None
    if rank == 0:
        try:
            p = plan(model, config, keep_svd=True)
            text = p.to_json()
        except Exception as exc:  # tell the other ranks, then raise here
            broadcast_text(_ERROR_MARK + f"{type(exc).__name__}: {exc}", what="sending the cut plan")
            raise
    text = broadcast_text(text, what="receiving the cut plan")
    if text.startswith(_ERROR_MARK):
        raise DistributedError(f"rank {rank}: rank 0 could not plan the cut: {text[len(_ERROR_MARK) :]}")
    return p if p is not None else Plan.from_json(text)


def init_from_env(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group the launcher described in the environment; whether this call joined it.

    ``False`` when there is none, or when the caller had already initialized one (it is used and
    left to the caller to destroy).

    ``torchrun`` (and ``rmtprune train --nproc N``) set ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT`` and ``LOCAL_RANK``. The backend is ``nccl`` for a CUDA device (each rank on
    ``cuda:LOCAL_RANK``) and ``gloo`` otherwise; ``timeout_s`` bounds every collective.
    """
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return False
    if dist.is_initialized():
        return False  # the caller's group: used as it is, and left to the caller to destroy
    if not dist.is_available():  # pragma: no cover
        raise DistributedError("this torch build has no torch.distributed; run one process")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    try:
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError, dist.DistBackendError) as exc:
        raise DistributedError(f"could not join the process group ({backend}): {exc}") from exc
    return True


def leave() -> None:
    """Leave the default process group (the end of a run that joined it)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module) -> DDP:
    """``module`` in a DDP wrapper (on ``cuda:LOCAL_RANK`` when its parameters are on a GPU)."""
    dev = next(module.parameters()).device
    if dev.type != "cuda":
        return DDP(module)
    ids = [dev.index if dev.index is not None else torch.cuda.current_device()]
    return DDP(module, device_ids=ids)


def lost_rank(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed (a rank stopped, a timeout), not a bug of this rank."""
    if isinstance(exc, DistributedError):
        return False  # already says so
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        k in text for k in ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout")
    )


def reduce_counts(counts: Any) -> Any:
    """A :class:`~rmtprune.training.stability.Counts` summed over the ranks (identity on one rank)."""
    if not is_distributed():
        return counts
    sums = all_reduce_sums(counts.to_tensor().tolist(), "reducing the stability counts")
    return type(counts).from_tensor(torch.tensor(sums, dtype=torch.float64))


def _all_gather_1d(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's 1-D ``t`` (lengths may differ by rank), on the CPU, in rank order."""
    _, size = world()
    dev = _device()
    n = torch.tensor([t.numel()], dtype=torch.int64, device=dev)
    ns = [torch.empty_like(n) for _ in range(size)]
    dist.all_gather(ns, n)
    longest = int(max(int(x) for x in ns))
    buf = torch.zeros(longest, dtype=t.dtype, device=dev)
    buf[: t.numel()] = t.to(dev)
    out = [torch.empty_like(buf) for _ in range(size)]
    dist.all_gather(out, buf)
    return [o[: int(k)].cpu() for o, k in zip(out, ns, strict=True)]


def gather_stability(state: dict[str, Any]) -> dict[str, Any]:
    """A stability tracker's state with each split's whole vector rebuilt from every rank's shard.

    Every rank calls it (a collective); the shards hold examples ``rank::world`` and are
    interleaved back (:func:`rmtprune.training.stability.interleave`).
    """
    from .stability import interleave

    out: dict[str, Any] = {}
    try:
        for chain in sorted(state):
            prev = state[chain]
            out[chain] = {}
            for k in sorted(prev):
                v = prev[k]
                out[chain][k] = interleave(_all_gather_1d(v.reshape(-1))) if torch.is_tensor(v) else v
    except (RuntimeError, dist.DistBackendError) as exc:
        raise lost(exc, "gathering the stability state") from exc
    return out


#: Test hook: ``RANK:EPOCH`` makes that rank kill itself (SIGKILL) at the second step of that epoch.
_KILL_RANK_ENV = "_RMTPRUNE_TEST_KILL_RANK"


def should_die(rank: int, epoch: int) -> bool:
    """Whether the test hook asks this rank to die in this epoch."""
    spec = os.environ.get(_KILL_RANK_ENV, "")
    try:
        r, e = (int(v) for v in spec.split(":"))
    except ValueError:
        return False
    return r == rank and e == epoch and is_distributed()


def kill_self() -> None:  # pragma: no cover - the process ends here
    """SIGKILL this process (the test hook of a rank that dies without a word)."""
    import signal

    os.kill(os.getpid(), signal.SIGKILL)
