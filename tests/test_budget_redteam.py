"""Red team of issue 13's budget path: compress(target=), calibration, whitening, the guard, the CLI.

Each test here is a bug the red team confirmed (failing on cefb099^) and fixed in f5b35ec: a
regression test. The docstrings still say "BUG:", what was wrong and what is expected. Things
that were checked and hold (SVD-LLM factors, GPT-2 Conv1D, budgets as stored without an example
input, JSON round trips, the refused re-apply of a whitened plan, float16/bfloat16, padding masks)
are in the red-team report, not here.
"""

from __future__ import annotations

import argparse
import json
import math
import textwrap
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import rmtprune
from rmtprune.calibration import collect
from rmtprune.cli import main
from rmtprune.layers import handler_for


def _stored(model: nn.Module, names: list[str]) -> int:
    """Parameters of the named layers as stored (a factored layer counts its two factors)."""
    return sum(p.numel() for name in names for p in model.get_submodule(name).parameters())


def _mlp(n_in: int = 60, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(n_in, 150),
        nn.ReLU(),
        nn.Linear(150, 120),
        nn.ReLU(),
        nn.Linear(120, 90),
        nn.ReLU(),
        nn.Linear(90, 40),
    )


def _conv() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(8, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 6 * 6, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


# ------------------------------------------------------------------------------ budgets as stored
def test_parameter_target_with_an_example_input_counts_parameters() -> None:
    """BUG: with ``example_input`` (always given on the CLI for a zoo spec such as ``--model cnn``),
    ``_budget_plan`` builds every Candidate with the layer's output positions whatever the budget,
    so ``target=`` (parameters) is allocated in MACs: here 55% of the parameters are kept at
    target=0.5 and ``budget["before"]`` (553,088, reported as "selected-layer parameters") is the
    MAC count, not the 85,376 parameters. On the CLI, ``compress --model cnn --dataset mnist
    --target 0.5`` (first conv excluded) keeps 97.5% of the parameters while the summary says 49.5%.
    Expected: positions only weigh the costs for ``target_macs``; ``target`` counts parameters."""
    names = ["0", "2", "5"]
    model = _conv()
    before = _stored(model, names)
    x = torch.randn(2, 8, 8, 8)
    _, p = rmtprune.compress(model, target=0.5, include=names, example_input=x, allocation="uniform")
    assert p.budget["before"] == before
    assert _stored(model, names) <= math.floor(0.5 * before)


def test_a_layer_too_small_to_fit_takes_part_in_the_budget() -> None:
    """BUG: a selected layer with ``p = min(m, n) < 10`` (verdict ``too-small``, no spectrum) makes
    ``compress(target=...)`` raise ``ValueError: layer '0': 1 singular values for a 64x9 matrix``
    (``_Layer`` builds a Candidate from ``la.s``, which analysis never computed). The zoo's own
    ``--model cnn --target 0.5`` fails this way on its first convolution (1 channel, 3x3: 32x9).
    docs/compression.md promises: "a layer too small to fit uses Gavish-Donoho's median threshold
    as its edge (the report says which)". Expected: the plan is made, the budget met."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 64, 3, padding=1),  # a grayscale stem: 64 x 9
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 6 * 6, 10),
    )
    names = ["0", "2"]
    before = _stored(model, names)
    _, p = rmtprune.compress(model, target=0.5, include=names)
    assert p["0"].action in ("keep", "factor") and p["0"].reason
    assert _stored(model, names) <= math.floor(0.5 * before)


@pytest.mark.parametrize("calibrated", [False, True])
def test_factored_layers_are_recut_with_a_target(calibrated: bool) -> None:
    """BUG: re-cutting an already factored model with a target (docs: "Works on already compressed
    models too") raises ``layer '0' has no noise edge for the rmt allocation`` (the default
    allocation) as soon as a factored rank is below ``p / 2`` and the censored fit gives no sigma2:
    the fallback edge, Gavish-Donoho's ``omega * median(s)``, is taken over the zero-padded
    spectrum (``s_full`` in analysis), whose median is 0. Whitened, the same median is float
    rounding of the rank-k ``(A B) S`` (edge ~1e-16, every score ~5e15): no error, but the
    allocation is meaningless. Expected: an edge on the layer's scale (e.g. from its k non-zero
    values), the re-cut done, the budget met."""
    names = ["0", "2", "4"]
    model = _mlp()
    rmtprune.compress(model, rule="fixed", ratio=0.2, include=names, factor_only_if_smaller=False)
    before = _stored(model, names)
    cal = [torch.randn(32, 60, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    _, p = rmtprune.compress(model, target=0.5, include=names, calibration=cal if calibrated else None)
    assert _stored(model, names) <= math.floor(0.5 * before)
    # an edge of float rounding (whitened: ~1e-16, scores ~5e15) is as wrong as an edge of 0
    assert all(0 < p[n].decision["top_score"] < 1e6 for n in names)


def test_gavish_donoho_allocation_of_factored_layers_gives_finite_scores_and_strict_json() -> None:
    """BUG (same root as above): with ``allocation="gavish_donoho"`` the zero median makes every
    direction of a factored layer score ``inf``: the allocation is a tie broken by layer order, and
    the report's ``decision["top_score"]`` is ``inf``, written as ``Infinity`` (not JSON; the
    project writes strict JSON elsewhere, and ``threshold`` is already mapped to None for this
    reason). Expected: finite scores, ``json.dumps(plan.to_dict(), allow_nan=False)`` works."""
    names = ["0", "2", "4"]
    model = _mlp()
    rmtprune.compress(model, rule="fixed", ratio=0.2, include=names, factor_only_if_smaller=False)
    _, p = rmtprune.compress(model, target=0.5, include=names, allocation="gavish_donoho")
    json.dumps(p.to_dict(), allow_nan=False)
    assert all(math.isfinite(p[n].decision["top_score"]) for n in names)


def test_a_zero_initialised_layer_does_not_break_the_rmt_allocation() -> None:
    """BUG: a selected layer whose weight is all zeros (zero-initialised projections are common:
    adaLN-zero, ControlNet's zero convolutions, LoRA's B) has no BEMA sigma2 and a Gavish-Donoho
    edge of 0, so ``compress(target=0.5)`` raises ``layer '2' has no noise edge for the rmt
    allocation`` for the whole model. Expected: the layer takes part (its directions carry
    nothing: it is cut to ``min_rank``) and the budget is met."""
    model = _mlp()
    with torch.no_grad():
        model[2].weight.zero_()
    names = ["0", "2", "4"]
    before = _stored(model, names)
    _, p = rmtprune.compress(model, target=0.5, include=names)
    assert p["2"].rank == 1
    assert _stored(model, names) <= math.floor(0.5 * before)


def test_budget_plan_reports_no_conv_macs_without_an_example_input() -> None:
    """BUG: without ``example_input`` a convolution's MACs are unknown; the data-free plan says
    None, but the budgeted plan fills ``macs_before`` / ``macs_after`` with the parameter count
    (``Candidate.positions`` defaults to 1), so the summary prints a bogus "MACs/sample" line.
    Expected: None, as in the data-free plan."""
    model = _conv()
    free = rmtprune.plan(model, rmtprune.CompressionConfig(include=["0", "2"]))
    budget = rmtprune.plan(model, rmtprune.CompressionConfig(target=0.5, include=["0", "2"]))
    assert free["0"].macs_before is None
    assert budget["0"].macs_before is None and budget["2"].macs_after is None


# ------------------------------------------------------------------------------ calibration
class _Branches(nn.Module):
    """Two convolutions reading the same tensor with different geometry (Inception / ResNet)."""

    def __init__(self, pad_b: int, k_b: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(8, 16, 3, padding=1)
        self.b = nn.Conv2d(8, 16, k_b, padding=pad_b)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.a(x).mean((2, 3)) + self.b(x).mean((2, 3)))


@pytest.mark.parametrize(("pad_b", "k_b"), [(0, 3), (0, 1)])
def test_convolutions_sharing_an_input_get_their_own_patch_statistics(pad_b: int, k_b: int) -> None:
    """BUG: ``collect``'s hook reuses the unfolded rows of the previous layer when it reads the same
    tensor with the same handler class (meant for q/k/v), but two convolutions on one input unfold
    it differently. A 3x3 ``padding=0`` branch beside a 3x3 ``padding=1`` one silently gets the
    other's 432 patch rows instead of its 192 (wrong whitening); a 1x1 shortcut beside a 3x3 conv
    (every ResNet block with a downsample) gets 72-wide rows for its 8 features, and compress then
    fails with "calibration of layer 'b' has 72 features, the layer 8". Expected: the cache is
    keyed on the unfolding (kernel, stride, padding, dilation), each layer's statistics exact."""
    model = _Branches(pad_b, k_b)
    xs = [torch.randn(4, 8, 6, 6) for _ in range(3)]
    cal = collect(model, xs, held_out=0, matmul_dtype=torch.float64)
    h = handler_for(model.b)
    rows = torch.cat([h.input_rows(model.b, x) for x in xs]).double()
    assert cal["b"].n == rows.shape[1] and cal["b"].rows == rows.shape[0]
    torch.testing.assert_close(cal["b"].xtx, rows.T @ rows)


def test_unbatched_conv1d_input_rows() -> None:
    """BUG: an unbatched ``(C, L)`` input to a Conv1d (valid in torch) makes ``_unfold_rows`` raise
    ``IndexError: Dimension out of range`` (it unsqueezes to ``(C, 1, L)``, which ``F.unfold``
    reads as unbatched and returns 2-D), and IndexError escapes collect's ``except ValueError``
    and the CLI's one-line handler. Conv2d's ``(C, H, W)`` is handled. Expected: rows whose
    product with the weight is the convolution."""
    conv = nn.Conv1d(4, 6, 3, bias=False)
    x = torch.randn(4, 11)
    rows = handler_for(conv).input_rows(conv, x)
    torch.testing.assert_close(rows @ conv.weight.reshape(6, -1).T, conv(x).T, rtol=1e-5, atol=1e-5)


def test_collect_streams_its_batches() -> None:
    """BUG: ``collect`` starts with ``batches = list(batches)``: every batch of a generator or data
    loader is held in memory at once (to count the held-out tail), so memory grows with the sample
    count, against the docstring ("stream batches") and issue 13 ("memory independent of the
    sample count"). Expected: at most a couple of batches alive at any time (e.g. hold out every
    k-th batch, or the tail only when ``len(batches)`` is known)."""
    alive = [0]
    peak = [0]

    def gen() -> Iterator[torch.Tensor]:
        for _ in range(12):
            x = torch.randn(8, 60)
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
            weakref.finalize(x, lambda: alive.__setitem__(0, alive[0] - 1))
            yield x
            del x

    collect(_mlp(), gen(), held_out=0.25)
    assert peak[0] <= 3, f"{peak[0]} calibration batches were alive at once"


def test_a_calibration_batch_that_does_not_fit_the_model_is_named() -> None:
    """BUG: a batch the model cannot take raises the model's own error (here ``RuntimeError: mat1
    and mat2 shapes cannot be multiplied``; a BertModel given images raises ``ValueError: too many
    values to unpack``), naming neither the calibration nor the batch. Expected, as
    ``_positions`` does for ``example_input``: ``ValueError`` naming the calibration batch and its
    shape."""
    with pytest.raises(ValueError, match=r"calibration batch 0"):
        collect(_mlp(), [torch.randn(4, 7)])


def test_non_finite_calibration_inputs_are_named() -> None:
    """BUG: a NaN or Inf in a calibration batch (or a float16 activation overflow) ends in
    ``ValueError: the calibration covariance is not positive definite even with damping``, which
    names neither the layer nor the cause. Expected: the message says the inputs are not finite
    and names the layer (or batch)."""
    xs = [torch.randn(16, 60) for _ in range(4)]
    xs[1][0, 3] = float("nan")
    model = _mlp()
    with pytest.raises(ValueError, match=r"(?i)(nan|inf|finite).*'0'|'0'.*(nan|inf|finite)|batch 1"):
        rmtprune.compress(model, target=0.5, calibration=xs, include=["0", "2", "4"])
    assert isinstance(model[0], nn.Linear)


# ------------------------------------------------------------------------------ the guard
class _Routed(nn.Module):
    """A layer used only on some inputs (an MoE expert, a conditional branch)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(40, 80)
        self.b = nn.Linear(40, 80)
        self.head = nn.Linear(80, 5)

    def forward(self, x: torch.Tensor, use_b: bool = True) -> torch.Tensor:
        return self.head(self.b(x) if use_b else self.a(x))


def test_guard_with_a_layer_absent_from_the_held_out_slice() -> None:
    """BUG: a layer that saw fit batches but none of the held-out ones (an MoE expert the held-out
    tokens were not routed to) crashes the guard with ``AttributeError: 'NoneType' object has no
    attribute 'second_moment'`` (``_Layer.held`` is None in ``guard_error``); the guard is on by
    default (0.2) since 077743c, so any calibrated compress of such a model fails, and on the CLI
    with a traceback. Expected: that layer is left unguarded (named in a warning), the plan made."""
    model = _Routed()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 40, generator=g), i % 2 == 0) for i in range(6)]
    batches += [(torch.randn(16, 40, generator=g), True)] * 2  # the held-out tail never uses 'a'
    _, p = rmtprune.compress(model, target=0.5, calibration=batches, guard=0.1)
    assert p.budget["after"] <= p.budget["wanted"]


# ------------------------------------------------------------------------------ the CLI
FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn

    def wide():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(),
                             nn.Linear(32, 10))
    """
)


def test_cli_calibration_that_does_not_fit_the_model_is_one_line_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """BUG: ``compress --model M:F --target 0.5 --calibration digits`` for a model taking 784
    features raises ``RuntimeError: mat1 and mat2 shapes cannot be multiplied`` out of ``main``
    (a traceback, exit 1): cli.main re-raises a RuntimeError that is not out-of-memory. docs/
    security.md: bad input gets one line naming the culprit and exit status 2, nothing written.
    (A BertModel directory with ``--calibration digits`` gets exit 2 but the line is "too many
    values to unpack (expected 2)".) Expected: exit 2, one line naming the calibration."""
    (tmp_path / "rtfactory.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    argv = ["compress", "--model", "rtfactory:wide", "--target", "0.5", "--calibration", "digits"]
    rc = main([*argv, "--calibration-samples", "8", "out.safetensors", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "calibration" in lines[0], err
    assert not list(tmp_path.glob("out*"))


def test_cli_calibration_accepts_the_dataset_names_its_help_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    """BUG: ``--calibration``'s help and module docstring name ``mnist, fashion, digits``, but the
    check is ``src.lower() in DATASETS`` (``fashion-mnist``), so ``--calibration fashion`` is
    refused as "neither a dataset ... nor a file" although ``load_dataset`` accepts the alias.
    Expected: the names the help gives are accepted (or the help names ``fashion-mnist``)."""
    import rmtprune.zoo.data as zdata
    from rmtprune.commands import _calibration

    asked = []

    class _Fake:
        x = torch.zeros(10, 1, 28, 28)

        def __len__(self) -> int:
            return 10

    def fake_load(name: str, **_: object) -> _Fake:
        asked.append(name)
        return _Fake()

    monkeypatch.setattr(zdata, "load_dataset", fake_load)
    help_text = next(
        a.help
        for a in _parser_actions(_calibration)
        if "--calibration" in a.option_strings  # the help lists the accepted names
    )
    assert "fashion" in help_text
    args = argparse.Namespace(
        calibration="fashion", calibration_samples=4, calibration_seq_len=256, calibration_seed=0
    )
    batches = _calibration.calibration_batches(args, None)
    assert asked and batches is not None


def _parser_actions(module: object) -> list[argparse.Action]:
    p = argparse.ArgumentParser()
    module.add_calibration_args(p)  # type: ignore[attr-defined]
    return list(p._actions)
