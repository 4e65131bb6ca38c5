"""Accuracy stability during training: instability events and example flips, per epoch and per cut.

Training lowers the cross-entropy, but the accuracy need not rise with it: Berlyand, Jabin & Safsten
formalised this *stability of accuracy* and gave conditions for it; Shmalo made their doubling
condition uniform (arXiv 2210.08415). This module measures it in a run, so that one can ask
whether an RMT cut (METHOD.md section 7) makes training less stable.

Definitions (docs/training.md, "Accuracy stability"):

- a *measurement* is a FIXED evaluation of a split: the model in eval mode, no gradient, over every
  example of the split (for the training split a fixed seeded subset, :data:`DEFAULT_TRAIN_EXAMPLES`
  images by default), giving one correct/wrong bit per example and the summed cross-entropy. It is
  not the running accuracy of the training loop, which mixes the model's states over an epoch;
- between two measurements of a split, *flips* are the examples correct before and wrong now,
  *fixes* those wrong before and correct now (so the correct count moved by ``fixes - flips``);
- an *instability event* of a split (train or val) is a pair of consecutive measurements where the
  training loss (of the fixed evaluation of the training split) decreased, strictly, while that
  split's accuracy decreased, strictly (``flips > fixes``);
- around a cut (with ``eval_before_prune``) the measurements just before and just after the cut of
  the same epoch give the flips, fixes and event of the cut itself.

Every count is a sum over examples, so it is additive over disjoint shards of a split: each
process measures its shard (:class:`StabilityTracker` with ``shard=(rank, world)``), its
per-shard :class:`Counts` are summed (``reduce``: an all-reduce of :meth:`Counts.to_tensor`), and
the events are decided on the sums, so N shards give the counts of one process. A checkpoint holds
the whole split's vectors (:func:`interleave` of the shards'), cut back per shard on loading.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn

__all__ = [
    "Counts",
    "StabilityTracker",
    "DEFAULT_TRAIN_EXAMPLES",
    "compare",
    "correctness",
    "event",
    "summarize",
    "check_state",
    "tracker_for",
    "format_columns",
    "interleave",
]

#: Training images of the fixed evaluation by default (a seeded subset; 0 in the config: all).
DEFAULT_TRAIN_EXAMPLES = 10_000
#: Batch size of the fixed evaluation (that of the trainer's test evaluation, so val numbers match).
EVAL_BATCH = 1024
#: The splits tracked.
SPLITS = ("train", "val")


@dataclass(frozen=True)
class Counts:
    """What one measurement of one split (or one shard of it) counts against the previous one.

    Every field is a sum over examples, so the counts of disjoint shards add up to those of the
    whole split (``a + b``). The ``prev_*``, ``flips`` and ``fixes`` fields are ``nan`` when
    there is no previous measurement (the first epoch, or a run resumed from a checkpoint that
    stored none).
    """

    n: float
    correct: float
    loss_sum: float
    prev_correct: float = math.nan
    prev_loss_sum: float = math.nan
    flips: float = math.nan  # correct before, wrong now
    fixes: float = math.nan  # wrong before, correct now

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def to_tensor(self) -> torch.Tensor:
        """The fields as a float64 tensor (for ``torch.distributed.all_reduce``; nan stays nan)."""
        return torch.tensor([getattr(self, f.name) for f in fields(self)], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> Counts:
        """Inverse of :meth:`to_tensor`."""
        return cls(*(float(v) for v in t.tolist()))

    @property
    def measured(self) -> bool:
        """Whether there was a previous measurement to compare with."""
        return not math.isnan(self.flips)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else math.nan

    @property
    def loss(self) -> float:
        return self.loss_sum / self.n if self.n else math.nan


def correctness(model: nn.Module, data: Any, batch_size: int = EVAL_BATCH) -> tuple[torch.Tensor, float]:
    """Per-example correctness (bool, one per example, on the data's device) and the summed
    cross-entropy of ``model`` over a :class:`rmtprune.data.Dataset`, in eval mode without grad.

    The batches and the loss are those of :func:`rmtprune.finetune.evaluate` with
    ``reduction="sum"`` over ``batches(data, 1024)``, so the accuracy and loss it gives are the
    same numbers, bit for bit, as the trainer's evaluation of the split.
    """
    from ..zoo.data import batches

    was_training = model.training
    model.eval()
    bits, loss_sum = [], 0.0
    try:
        with torch.no_grad():
            for x, y in batches(data, batch_size):
                out = model(x)
                loss_sum += float(nn.functional.cross_entropy(out, y, reduction="sum"))
                bits.append(out.argmax(dim=-1) == y)
    finally:
        model.train(was_training)
    return (torch.cat(bits) if bits else torch.zeros(0, dtype=torch.bool)), loss_sum


def compare(
    prev: torch.Tensor | None, now: torch.Tensor, loss_sum: float, prev_loss_sum: float | None = None
) -> Counts:
    """The :class:`Counts` of a measurement ``now`` (per-example correctness) against ``prev``
    (``None``: no previous measurement, every comparison field nan)."""
    now = now.bool()
    correct = float(now.sum())
    if prev is None:
        return Counts(float(now.numel()), correct, float(loss_sum))
    prev = prev.to(now.device).bool()
    if prev.shape != now.shape:
        raise ValueError(f"the previous measurement has {prev.numel()} examples, this one {now.numel()}")
    return Counts(
        float(now.numel()),
        correct,
        float(loss_sum),
        float(prev.sum()),
        math.nan if prev_loss_sum is None else float(prev_loss_sum),
        float((prev & ~now).sum()),
        float((~prev & now).sum()),
    )


def event(train: Counts, split: Counts) -> bool | None:
    """Whether the training loss decreased while ``split``'s accuracy decreased (both strictly);
    ``None`` without a previous measurement. Decided on summed counts (all shards)."""
    if not (train.measured and split.measured) or math.isnan(train.prev_loss_sum):
        return None
    return bool(train.loss_sum < train.prev_loss_sum and split.flips > split.fixes)


def _fixed_subset(n: int, k: int, seed: int) -> torch.Tensor | None:
    """Sorted indices of ``k`` of ``n`` examples drawn with their own generator (``seed``), so the
    run's random number generators are untouched; ``None`` when ``k`` is 0 or covers ``n``."""
    if k <= 0 or k >= n:
        return None
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=gen)[:k].sort().values


@dataclass
class _Measure:
    """One measurement: per split this shard's correctness vector and loss sum, and the counts
    summed over all shards (``counts[s].loss_sum`` is the global loss sum)."""

    bits: dict[str, torch.Tensor]
    loss_sums: dict[str, float]
    counts: dict[str, Counts]


def interleave(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The whole split's vector from its shards' (shard ``r`` of ``w`` holds examples ``r::w``):
    what a checkpoint of a sharded run stores (gather the shards, then interleave them)."""
    world = len(parts)
    out = torch.empty(sum(p.numel() for p in parts), dtype=parts[0].dtype, device=parts[0].device)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


class StabilityTracker:
    """Fixed evaluations of the training and validation splits, compared measurement to measurement.

    ``train_ds``/``val_ds`` are :class:`rmtprune.data.Dataset` (``val_ds`` may be ``None``); the
    training split is reduced to ``train_examples`` images drawn with ``seed`` (0: all of it).
    ``every`` > 0 also measures every ``every`` optimizer steps (a chain of its own). ``shard`` =
    ``(rank, world)`` keeps examples ``rank::world`` of each evaluated split, and ``reduce`` turns
    this process's :class:`Counts` into the sums over all shards (identity in one process);
    ``device``: where the evaluated examples are kept (the model's).

    Per epoch: :meth:`epoch_columns` after the epoch (its cut included), with the measurement
    :meth:`measure` took just before the cut when there was one; :meth:`step` from the training
    loop. :meth:`state_dict` holds the previous measurements (uint8 tensors) so a resumed run
    continues the same chains.
    """

    def __init__(
        self,
        train_ds: Any,
        val_ds: Any = None,
        *,
        train_examples: int = DEFAULT_TRAIN_EXAMPLES,
        seed: int = 0,
        every: int = 0,
        shard: tuple[int, int] = (0, 1),
        reduce: Callable[[Counts], Counts] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        rank, world = shard
        if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
            raise ValueError(f"shard={shard!r} must be (rank, world) with 0 <= rank < world")
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"every={every!r} must be an int >= 0")
        index = _fixed_subset(len(train_ds), int(train_examples), seed)
        train = train_ds if index is None else train_ds.subset(index)
        self.data = {"train": train, "val": val_ds}
        self.sizes = {k: None if d is None else len(d) for k, d in self.data.items()}  # before sharding
        self.shard = (rank, world)
        if world > 1:
            self.data = {
                k: None if d is None else d.subset(slice(rank, None, world)) for k, d in self.data.items()
            }
        if device is not None:
            self.data = {k: None if d is None else d.to(device) for k, d in self.data.items()}
        self.every = every
        self.reduce = reduce or (lambda c: c)
        self.prev: dict[str, dict[str, Any]] = {"epoch": {}, "step": {}}
        self._steps: list[dict[str, Any]] = []
        self.seconds = 0.0  # spent measuring at steps (inside the training loop), since the last pop

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(s for s in SPLITS if self.data[s] is not None)

    def _reduce(self, c: Counts, prev_loss_sum: float | None) -> Counts:
        """This shard's counts summed over the shards, with the previous global loss sum."""
        total = self.reduce(c)
        return replace(total, prev_loss_sum=math.nan if prev_loss_sum is None else float(prev_loss_sum))

    def measure(self, model: nn.Module, prev: dict[str, Any] | None = None) -> _Measure:
        """Evaluate every split; counts against ``prev`` (a chain's last measurement), reduced."""
        prev = prev or {}
        bits, sums, counts = {}, {}, {}
        for s in self.splits:
            bits[s], sums[s] = correctness(model, self.data[s])
            counts[s] = self._reduce(compare(prev.get(s), bits[s], sums[s]), prev.get(s + "_loss_sum"))
        return _Measure(bits, sums, counts)

    def _advance(self, chain: str, m: _Measure) -> None:
        """``m`` becomes the chain's previous measurement: this shard's vectors, the global loss sums."""
        self.prev[chain] = {**m.bits, **{s + "_loss_sum": c.loss_sum for s, c in m.counts.items()}}

    def epoch_columns(self, model: nn.Module, before_cut: _Measure | None = None) -> tuple[dict, _Measure]:
        """Measure after the epoch; return its metrics columns and the measurement (whose val counts
        give the epoch's val loss and accuracy). ``before_cut``: the measurement just before the cut."""
        m = self.measure(model, self.prev["epoch"])
        self._advance("epoch", m)
        train = m.counts["train"]
        row: dict[str, Any] = {"train_eval_loss": train.loss, "train_eval_acc": train.accuracy}
        for s in SPLITS:
            c = m.counts.get(s)
            row[f"flips_{s}"] = _int(c.flips) if c is not None else None
            row[f"fixes_{s}"] = _int(c.fixes) if c is not None else None
            row[f"event_{s}"] = event(train, c) if c is not None else None
        cut = self._cut(before_cut, m) if before_cut is not None else {}
        for s in SPLITS:
            c = cut.get(s)
            row[f"cut_flips_{s}"] = _int(c.flips) if c is not None else None
            row[f"cut_fixes_{s}"] = _int(c.fixes) if c is not None else None
            row[f"cut_event_{s}"] = event(cut["train"], c) if c is not None else None
        if self.every:
            row.update(self._step_columns())
        return row, m

    def _cut(self, before: _Measure, after: _Measure) -> dict[str, Counts]:
        out = {}
        for s in self.splits:
            c = compare(before.bits[s], after.bits[s], after.loss_sums[s])
            out[s] = self._reduce(c, before.counts[s].loss_sum)
        return out

    def step(self, model: nn.Module, global_step: int) -> None:
        """Called after optimizer step ``global_step`` (1-based over the run): measures every ``every``."""
        if not self.every or global_step % self.every:
            return
        import time

        t0 = time.perf_counter()
        m = self.measure(model, self.prev["step"])
        self._advance("step", m)
        train = m.counts["train"]
        self._steps.append({s: (c, event(train, c)) for s, c in m.counts.items()})
        self.seconds += time.perf_counter() - t0

    def _step_columns(self) -> dict[str, Any]:
        steps, self._steps = self._steps, []
        row: dict[str, Any] = {"step_measures": len(steps)}
        for s in SPLITS:
            got = [m[s] for m in steps if s in m and m[s][0].measured]
            row[f"step_events_{s}"] = sum(bool(e) for _, e in got) if got else None
            row[f"step_flips_{s}"] = _int(sum(c.flips for c, _ in got)) if got else None
        return row

    def state_dict(self) -> dict[str, Any]:
        """The previous measurements of both chains: this shard's correctness as uint8 CPU tensors
        and the global loss sums. A sharded run saves the whole split's vectors (gather the ranks'
        and :func:`interleave` them); :meth:`load_state_dict` takes either."""
        return {
            chain: {k: v.to("cpu", torch.uint8) if torch.is_tensor(v) else v for k, v in prev.items()}
            for chain, prev in self.prev.items()
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a whole split's vector is cut to this shard's); a vector of
        another length is a ``ValueError``."""
        check_state(state)
        rank, world = self.shard
        for chain in ("epoch", "step"):
            prev = {}
            for k, v in state.get(chain, {}).items():
                if torch.is_tensor(v):
                    if world > 1 and v.numel() == self.sizes.get(k):
                        v = v[rank::world]
                    if self.data.get(k) is None or v.numel() != len(self.data[k]):
                        size = (
                            "no such split" if self.data.get(k) is None else f"{len(self.data[k])} examples"
                        )
                        raise ValueError(f"stability[{chain!r}][{k!r}] has {v.numel()} values ({size})")
                    v = v.to(self.data[k].y.device).bool()
                prev[k] = v
            self.prev[chain] = prev


def tracker_for(
    cfg: Any,
    train_ds: Any,
    val_ds: Any,
    shard: tuple[int, int] = (0, 1),
    reduce: Callable[[Counts], Counts] | None = None,
) -> StabilityTracker | None:
    """The tracker of a run with :class:`~rmtprune.training.TrainConfig` ``cfg`` (``None`` when
    ``cfg.track_stability`` is off): ``stability_train_examples`` images drawn with the run's seed;
    ``shard`` and ``reduce`` as in :class:`StabilityTracker` (a data-parallel run's rank)."""
    if not cfg.track_stability:
        return None
    return StabilityTracker(
        train_ds,
        val_ds,
        train_examples=cfg.stability_train_examples,
        seed=cfg.seed,
        every=cfg.stability_every,
        shard=shard,
        reduce=reduce,
        device=cfg.device,
    )


def format_columns(row: dict[str, Any]) -> str:
    """The stability part of an epoch's log line: flips train/val, and the events (``!``)."""
    if row.get("flips_train") is None:
        return ""
    parts = []
    for s in SPLITS:
        if row.get(f"flips_{s}") is not None:
            parts.append(f"{s} {row[f'flips_{s}']}" + ("!" if row.get(f"event_{s}") else ""))
    return "  flips " + " ".join(parts)


def check_state(state: Any) -> None:
    """Raise ``ValueError`` unless ``state`` has the shape of :meth:`StabilityTracker.state_dict`
    (checked before it is used: a checkpoint is a file a stranger can send)."""
    if not isinstance(state, dict) or not set(state) <= {"epoch", "step"}:
        raise ValueError("stability is not a dict of 'epoch' and 'step'")
    keys = {*SPLITS, *(s + "_loss_sum" for s in SPLITS)}
    for chain, prev in state.items():
        if not isinstance(prev, dict) or not set(prev) <= keys:
            raise ValueError(f"stability[{chain!r}] has fields other than {sorted(keys)}")
        for k, v in prev.items():
            if k in SPLITS:
                ok = torch.is_tensor(v) and v.dim() == 1 and v.dtype in (torch.uint8, torch.bool)
                if not ok or bool((v.to(torch.uint8) > 1).any()):
                    raise ValueError(f"stability[{chain!r}][{k!r}] is not a vector of 0/1 values")
            elif not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
                raise ValueError(f"stability[{chain!r}][{k!r}]={v!r} is not a finite number")


def _int(x: float) -> int | None:
    return None if math.isnan(x) else int(x)


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """A run's stability from its metrics rows: events per split, and flips per epoch over all
    epochs, the epochs with a cut, the others, and the cuts themselves (measured ones only)."""

    def part(rows: list[dict[str, Any]], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {"count": 0}
        for s in SPLITS:
            got = [r for r in rows if r.get(f"{prefix}flips_{s}") is not None]
            out["count"] = max(out["count"], len(got))
            out[f"events_{s}"] = sum(bool(r.get(f"{prefix}event_{s}")) for r in got) if got else None
            out[f"flips_{s}"] = _mean([r[f"{prefix}flips_{s}"] for r in got])
            out[f"fixes_{s}"] = _mean([r[f"{prefix}fixes_{s}"] for r in got])
        return out

    rows = [r for r in metrics if "flips_train" in r]
    cut = [r for r in rows if r.get("pruned")]
    other = [r for r in rows if not r.get("pruned")]
    return {
        "all": part(rows),
        "cut_epochs": part(cut),
        "other_epochs": part(other),
        "cuts": part(cut, "cut_"),
    }
