"""Tests of rmtprune.training: the pruning schedule, optimizer surgery, regularisation, train/resume."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

import rmtprune
from rmtprune.errors import CheckpointError, RmtpruneError
from rmtprune.training import (
    CHECKPOINT,
    PREVIOUS_CHECKPOINT,
    RMTPruner,
    TrainConfig,
    load_checkpoint,
    rebuild_optimizer,
    regularization,
    train,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _factor_fc1(model: TinyMLP, rank: int = 2) -> None:
    """Hand-made surgery: fc1 becomes two thin Linear layers (what compress does)."""
    old = model.fc1
    first = nn.Linear(old.in_features, rank, bias=False)
    second = nn.Linear(rank, old.out_features)
    model.fc1 = nn.Sequential()
    model.fc1.add_module("first", first)
    model.fc1.add_module("second", second)


def _step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()


# -- schedule -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "every, start, epochs, expected",
    [
        (1, None, 4, [1, 2, 3, 4]),
        (2, None, 7, [2, 4, 6]),
        (2, 0, 5, [0, 2, 4]),  # at initialisation only when asked for
        (3, 1, 8, [1, 4, 7]),
        (5, None, 4, []),
    ],
)
def test_schedule_epochs(every, start, epochs, expected):
    pruner = RMTPruner(every=every, start=start)
    assert [e for e, _ in pruner.schedule(epochs)] == expected
    assert not RMTPruner(every=every).should_prune(0)


@pytest.mark.parametrize(
    "keep_bulk, decay_T, epoch, f",
    [
        (0.45, None, 1, 0.45),
        (0.45, None, 500, 0.45),
        (0.0, None, 3, 0.0),
        (0.45, 200, 0, 1.0),
        (0.45, 200, 50, 0.75),
        (0.45, 200, 200, 0.0),
        (0.45, 200, 300, 0.0),  # clipped at 0
    ],
)
def test_fraction(keep_bulk, decay_T, epoch, f):
    assert RMTPruner(keep_bulk=keep_bulk, decay_T=decay_T).fraction(epoch) == pytest.approx(f)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"every": 0}, ValueError, "every=0 must be >= 1"),
        ({"every": 1.5}, TypeError, "every=1.5 must be an int"),
        ({"start": -1}, ValueError, "start=-1 must be >= 0"),
        ({"keep_bulk": 1.5}, ValueError, r"keep_bulk=1.5 must be in \[0, 1\]"),
        ({"keep_bulk": "a"}, TypeError, "keep_bulk='a'"),
        ({"decay_T": 0}, ValueError, "decay_T=0 must be a positive"),
    ],
)
def test_pruner_rejects_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        RMTPruner(**kwargs)


class Spiked(nn.Module):
    """One 120 x 240 layer and a head; :meth:`plant` makes fc Gaussian noise + 3 strong spikes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(240, 120)
        self.head = nn.Linear(120, 4)

    def plant(self) -> None:
        g = torch.Generator().manual_seed(0)
        u = torch.linalg.qr(torch.randn(120, 3, generator=g))[0]
        v = torch.linalg.qr(torch.randn(240, 3, generator=g))[0]
        w = (
            torch.randn(120, 240, generator=g) / 240**0.5
            + u @ torch.diag(torch.tensor([6.0, 5.0, 4.0])) @ v.T
        )
        with torch.no_grad():
            self.fc.weight.copy_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(x)))


def test_maybe_prune_cuts_on_schedule_and_rebuilds_the_optimizer():
    from rmtprune.lowrank import LowRankLinear

    model = Spiked()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.zero_grad()
    model(torch.randn(8, 240)).sum().backward()
    opt.step()  # momentum buffers for every parameter
    model.plant()  # in place: same parameter objects
    lines: list[str] = []
    pruner = RMTPruner(every=2, keep_bulk=0.0, log=lines.append, exclude=["head"])
    assert pruner.maybe_prune(model, 1, opt) is opt and isinstance(model.fc, nn.Linear)
    assert pruner.history_ == []
    assert pruner.maybe_prune(model, 2, opt) is opt
    assert isinstance(model.fc, LowRankLinear) and model.fc.rank == 3
    rows = {r["layer"]: r for r in pruner.history_}
    fc = rows["fc"]
    assert (fc["epoch"], fc["action"], fc["rank_before"], fc["rank_after"], fc["n_spikes"]) == (
        2,
        "factor",
        120,
        3,
        3,
    )
    assert fc["n_bulk"] == 117 and fc["sigma2"] == pytest.approx(1 / 240, rel=0.1) and fc["ks"] < 0.1
    assert rows["head"]["action"] == "skip"
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in model.parameters()]
    assert "momentum_buffer" in opt.state[model.head.weight]
    assert any("fresh state" in line for line in lines) and any(
        "fc: factor rank 120 -> 3" in x for x in lines
    )
    assert "momentum_buffer" in opt.state[model.fc.second.bias]  # the bias kept its momentum
    assert model.fc.first.weight not in opt.state
    event = pruner.events_[-1]
    assert event["params_after"] == 3 * (240 + 120) + 120 + 120 * 4 + 4 < event["params_before"]


# -- optimizer surgery --------------------------------------------------------------------------


def test_rebuild_keeps_hyperparameters_and_momentum_of_untouched_parameters():
    torch.manual_seed(0)
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    _step(model, opt)
    fc2_buf = opt.state[model.fc2.weight]["momentum_buffer"].clone()
    old = dict(model.named_parameters())
    _factor_fc1(model)
    info = rebuild_optimizer(opt, model, old)

    assert info["removed"] == ["fc1.weight", "fc1.bias"]
    assert info["added"] == ["fc1.first.weight", "fc1.second.weight", "fc1.second.bias"]  # bias not copied
    assert info["kept"] == ["fc2.weight", "fc2.bias"] and info["carried"] == []
    group = opt.param_groups[0]
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (
        0.1,
        0.9,
        1e-4,
        True,
    )
    assert torch.equal(opt.state[model.fc2.weight]["momentum_buffer"], fc2_buf)
    assert model.fc1.first.weight not in opt.state  # fresh state
    assert all(p not in opt.state for p in old.values() if p not in set(model.parameters()))
    _step(model, opt)  # the optimizer trains the new parameters
    assert "momentum_buffer" in opt.state[model.fc1.first.weight]


def test_rebuild_carries_the_state_of_a_bias_copied_into_the_new_layer():
    torch.manual_seed(0)
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _step(model, opt)
    buf = opt.state[model.fc1.bias]["momentum_buffer"].clone()
    old = dict(model.named_parameters())
    bias = model.fc1.bias.detach().clone()
    _factor_fc1(model)
    with torch.no_grad():
        model.fc1.second.bias.copy_(bias)  # what compress does: the bias moves into the second factor
    info = rebuild_optimizer(opt, model, old)
    assert info["carried"] == ["fc1.second.bias"]
    assert info["added"] == ["fc1.first.weight", "fc1.second.weight"]
    assert torch.equal(opt.state[model.fc1.second.bias]["momentum_buffer"], buf)


def test_rebuild_puts_new_parameters_in_the_group_of_the_layer_they_replace():
    model = TinyMLP()
    opt = torch.optim.AdamW(
        [{"params": model.fc1.parameters(), "lr": 0.01}, {"params": model.fc2.parameters(), "lr": 0.5}]
    )
    _step(model, opt)
    old = dict(model.named_parameters())
    _factor_fc1(model)
    rebuild_optimizer(opt, model, old)
    assert [len(g["params"]) for g in opt.param_groups] == [3, 2]
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.5]
    assert opt.state[model.fc2.weight]["step"] == 1
    _step(model, opt)
    assert opt.state[model.fc1.first.weight]["step"] == 1


def test_rebuild_keeps_a_copied_bias_in_its_own_group():
    """A no-weight-decay group of biases (the Hugging Face Trainer's) keeps the bias of a cut layer."""
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(16, 64))
    model.add_module("fc2", nn.Linear(64, 3))
    named = list(model.named_parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if not n.endswith("bias")], "weight_decay": 0.1},
            {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0},
        ]
    )
    opt.zero_grad()
    model(torch.randn(4, 16)).pow(2).mean().backward()
    opt.step()
    old = dict(model.named_parameters())
    rmtprune.compress(model, rule="fixed", rank=2, include=["fc1"])
    info = rebuild_optimizer(opt, model, old)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in opt.param_groups]
    assert groups[1] == ["fc1.second.bias", "fc2.bias"] and "fc1.first.weight" in groups[0]
    assert info["carried"] == ["fc1.second.bias"]
    assert opt.state[model.fc1.second.bias]["step"] == 1


def test_rebuild_leaves_frozen_layers_untrained():
    model = TinyMLP()
    model.fc1.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    old = dict(model.named_parameters())
    _factor_fc1(model)
    info = rebuild_optimizer(opt, model, old)
    assert info["added"] == [] and len(opt.param_groups[0]["params"]) == 2


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6),
        lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8),
    ],
)
def test_learning_rate_schedule_continues_after_rebuild(make_scheduler):
    torch.manual_seed(0)
    ref_model, model = TinyMLP(), TinyMLP()
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.2, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    ref_sched, sched = make_scheduler(ref_opt), make_scheduler(opt)
    ref_lrs, lrs = [], []
    for epoch in range(1, 7):
        _step(ref_model, ref_opt)
        _step(model, opt)
        ref_sched.step()
        sched.step()
        if epoch == 3:
            old = dict(model.named_parameters())
            _factor_fc1(model)
            rebuild_optimizer(opt, model, old)
        ref_lrs.append(ref_opt.param_groups[0]["lr"])
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx(ref_lrs)


def test_rebuild_rejects_a_non_optimizer():
    model = TinyMLP()
    with pytest.raises(TypeError, match="must be a torch.optim.Optimizer"):
        rebuild_optimizer("sgd", model, dict(model.named_parameters()))


# -- regularisation -----------------------------------------------------------------------------


def test_regularization_covers_weights_and_factors_not_biases():
    model = TinyMLP()
    _factor_fc1(model)
    weights = [model.fc1.first.weight, model.fc1.second.weight, model.fc2.weight]
    expected = sum(2e-6 * w.abs().sum() + 3e-6 * w.pow(2).sum() for w in weights)
    assert float(regularization(model, l1=2e-6, l2=3e-6).detach()) == pytest.approx(float(expected.detach()))
    assert float(regularization(model)) == 0.0


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [({"l1": -1.0}, ValueError, "l1=-1.0 must be"), ({"l2": "x"}, TypeError, "l2='x' must be a number")],
)
def test_regularization_rejects_bad_weights(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        regularization(TinyMLP(), **kwargs)


# -- config -------------------------------------------------------------------------------------


def test_config_json_round_trip():
    cfg = TrainConfig(dataset="digits", model="mlp:32", decay_T=200, exclude=["head"], l1=1e-6)
    assert TrainConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"optimizer": "lbfgs"}, ValueError, "optimizer='lbfgs' must be one of sgd, adamw"),
        ({"lr_schedule": "poly"}, ValueError, "lr_schedule='poly' must be one of"),
        ({"epochs": 0}, ValueError, "epochs=0 must be >= 1"),
        ({"lr": 0.0}, ValueError, "lr=0.0 must be > 0"),
        ({"keep_bulk": 2.0}, ValueError, "keep_bulk=2.0"),
        ({"l1": float("nan")}, ValueError, "l1=nan"),
        ({"batch_size": 12.5}, TypeError, "batch_size=12.5 must be an int"),
    ],
)
def test_config_rejects_bad_values(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        TrainConfig(**kwargs)


def test_config_from_dict_names_unknown_fields():
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"epocs": 3})


# -- train and resume ---------------------------------------------------------------------------

#: A tiny, fast run on the bundled digits (1437 train / 360 test images).
TINY = dict(
    dataset="digits",
    model="mlp:48",
    epochs=4,
    lr=0.05,
    batch_size=64,
    seed=3,
    prune_every=2,
    keep_bulk=0.2,
    min_rank=1,
    lr_schedule="step",
    lr_step=1,
    lr_gamma=0.7,
    l1=1e-5,
    l2=1e-5,
)
COMPARED = ("train_loss", "train_acc", "test_loss", "test_acc", "params", "lr", "pruned", "layers")


def _compare(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        assert {k: ra[k] for k in COMPARED} == {k: rb[k] for k in COMPARED}


def test_train_writes_metrics_plots_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    res = train(out=out, **{**TINY, "epochs": 2, "prune": False})
    assert [r["epoch"] for r in res.metrics] == [1, 2]
    for name in (
        "config.json",
        "metrics.csv",
        "metrics.json",
        "decisions.csv",
        "accuracy.png",
        "params.png",
        "ranks.png",
        CHECKPOINT,
        PREVIOUS_CHECKPOINT,
    ):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text())[-1]["test_acc"] == res.final["test_acc"]
    assert TrainConfig.from_json((out / "config.json").read_text()) == res.config
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "params"} <= set(header)
    assert res.final["test_acc"] > 0.8
    assert not list(out.glob(".*.tmp"))  # no temporary files left behind


def test_resume_after_a_kill_mid_epoch_matches_an_uninterrupted_run(tmp_path):
    full = train(out=tmp_path / "full", **TINY)

    def kill(epoch: int, batch: int) -> None:
        if epoch == 3 and batch == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(out=tmp_path / "cut", batch_callback=kill, **TINY)
    state, path = load_checkpoint(tmp_path / "cut")
    assert state["epoch"] == 2 and path.name == CHECKPOINT
    resumed = train(out=tmp_path / "cut", resume=True)
    assert resumed.resumed_from == 2
    assert type(full.model.fc1).__name__ == "LowRankLinear"  # the resumed model was restructured
    assert resumed.model.fc1.rank == full.model.fc1.rank < 48
    _compare(full.metrics, resumed.metrics)
    full_sd, res_sd = full.model.state_dict(), resumed.model.state_dict()
    assert list(full_sd) == list(res_sd)
    assert all(torch.equal(full_sd[k], res_sd[k]) for k in full_sd)
    saved = rmtprune.load(tmp_path / "cut" / "model.safetensors")  # rebuilt from the recorded spec
    assert saved.fc1.rank == full.model.fc1.rank
    assert all(torch.equal(saved.state_dict()[k], full_sd[k]) for k in full_sd)


def test_resume_refuses_a_changed_configuration_but_allows_more_epochs(tmp_path):
    out = tmp_path / "run"
    train(out=out, **{**TINY, "epochs": 1, "prune": False})
    with pytest.raises(RmtpruneError, match=r"lr=0.5 differs from the run being resumed \(lr=0.05\)"):
        train(out=out, resume=True, lr=0.5)
    res = train(out=out, resume=True, epochs=2)
    assert [r["epoch"] for r in res.metrics] == [1, 2]


def test_existing_run_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    train(out=out, **{**TINY, "epochs": 1, "prune": False})
    with pytest.raises(RmtpruneError, match="already holds a run"):
        train(out=out, **{**TINY, "epochs": 1, "prune": False})


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path):
    out = tmp_path / "run"
    train(out=out, **{**TINY, "epochs": 2, "prune": False})
    (out / CHECKPOINT).write_bytes(b"PK\x03\x04 truncated")
    lines: list[str] = []
    state, path = load_checkpoint(out, log=lines.append)
    assert path.name == PREVIOUS_CHECKPOINT and state["epoch"] == 1
    assert "is not a readable checkpoint" in lines[0] and "previous checkpoint" in lines[0]
    assert (out / PREVIOUS_CHECKPOINT).is_file()  # the good one is kept
    assert (out / "checkpoint.corrupt.pt").is_file()  # the bad one is kept aside, not deleted
    res = train(out=out, resume=True, log=lines.append)
    assert [r["epoch"] for r in res.metrics] == [1, 2]


def test_no_usable_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint to resume"):
        train(out=out, resume=True)
    (out / CHECKPOINT).write_bytes(b"garbage")
    (out / PREVIOUS_CHECKPOINT).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot resume: .*checkpoint.pt.*checkpoint.prev.pt"):
        train(out=out, resume=True)


def test_not_a_training_checkpoint(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / CHECKPOINT)
    with pytest.raises(CheckpointError, match="not an rmtprune training checkpoint"):
        load_checkpoint(tmp_path)


def test_unwritable_output_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RmtpruneError, match="cannot create output directory"):
        train(out=blocker / "run", **{**TINY, "epochs": 1})


def test_full_disk_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"

    def fail_on_second(epoch: int, batch: int) -> None:
        if epoch == 2 and batch == 0:

            def no_space(*args, **kwargs):
                raise OSError(28, "No space left on device")

            monkeypatch.setattr(torch, "save", no_space)

    with pytest.raises(RmtpruneError, match="No space left on device.*last complete checkpoint"):
        train(out=out, batch_callback=fail_on_second, **{**TINY, "epochs": 2, "prune": False})
    monkeypatch.undo()
    assert load_checkpoint(out)[0]["epoch"] == 1
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dataset": "cifar"}, "unknown dataset 'cifar'; valid datasets: mnist, fashion-mnist, digits"),
        ({"model": "resnet:18"}, "unknown model family 'resnet'.*valid: mlp, cnn, vit"),
        ({"model": "cnn:8,8,8,8"}, "conv blocks halve image_size"),  # too deep for 8x8 digits
        ({"train_subset": 10**6}, "train_subset=1000000 is larger than"),
        ({"device": "abacus"}, "device='abacus' is not a torch device"),
        pytest.param(
            {"device": "cuda"},
            "CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here"),
        ),
    ],
)
def test_bad_dataset_or_model_is_a_clear_error(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        train(out=tmp_path / "run", **{**TINY, "epochs": 1, **kwargs})
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match="unknown option.*epocs"):
        train(epocs=3)


def test_train_without_output_directory():
    res = train(**{**TINY, "epochs": 1, "prune": False})
    assert res.out is None and len(res.metrics) == 1
    assert math.isfinite(res.final["test_loss"])


# ---------------------------------------------------------------------- crafted checkpoints
# A checkpoint is a file a stranger can send: --resume must check every recorded size against the
# model spec (built on the meta device) before allocating, and say what is wrong in one line.


@pytest.fixture(scope="module")
def good_state(tmp_path_factory):
    """The checkpoint of a 2-epoch run whose fc1 was cut at epoch 2 (a factored layer inside)."""
    out = tmp_path_factory.mktemp("good") / "run"
    torch.set_num_threads(1)
    train(out=out, **{**TINY, "epochs": 2})
    state = torch.load(out / CHECKPOINT, weights_only=True)
    assert state["architecture"]["fc1"]["type"] == "LowRankLinear"
    return state


def _deep(depth: int) -> dict:
    root = cur = {}
    for _ in range(depth):
        cur["a"] = {}
        cur = cur["a"]
    return root


def _self_ref() -> dict:
    d: dict = {"history": []}
    d["events"] = [d]
    return d


def _key(obj, key: str):
    """``key`` as the container indexes it: lists and the optimizer's state take ints."""
    return int(key) if key.isdigit() and (isinstance(obj, list) or int(key) in obj) else key


def _set(path: str, value):
    """A mutation: set ``state[a][b]...`` (keys separated by '/'; digits index lists) to ``value``."""

    def mutate(state: dict) -> None:
        *parents, last = path.split("/")
        obj = state
        for key in parents:
            obj = obj[_key(obj, key)]
        key = _key(obj, last)
        obj[key] = value(obj[key]) if callable(value) else value

    return mutate


def _drop(path: str):
    def mutate(state: dict) -> None:
        *parents, last = path.split("/")
        obj = state
        for key in parents:
            obj = obj[key]
        del obj[last]

    return mutate


CRAFTED = {
    "rank 1e9": (
        _set("architecture/fc1/rank", 10**9),
        r"architecture\['fc1'\] rank=1000000000 must be an int in \[1",
    ),
    "negative rank": (_set("architecture/fc1/rank", -1), r"rank=-1 must be an int"),
    "rank as float": (_set("architecture/fc1/rank", 3.0), r"rank=3.0 must be an int"),
    "huge matrix": (
        _set("architecture/fc1/matrix_shape", [10**6, 10**6]),
        "does not fit model 'mlp:48'.*layer 'fc1'",
    ),
    "1-D matrix_shape": (
        _set("architecture/fc1/matrix_shape", [48]),
        "matrix_shape=\\[48\\] is not two positive ints",
    ),
    "unknown layer type": (_set("architecture/fc1/type", "os.system"), "type='os.system' is not one of"),
    "architecture is a list": (_set("architecture", [1, 2]), "architecture is not a dict"),
    "layer not in the model": (
        _set("architecture", lambda a: {"nowhere": a["fc1"]}),
        "layer 'nowhere'.*missing from the model",
    ),
    "spec of 3 billion weights": (_set("config/model", "mlp:4000000"), "does not fit model 'mlp:4000000'"),
    "wrong tensor shape": (
        _set("model/head.weight", torch.zeros(3, 3)),
        r"'head.weight' is \(3, 3\) in the checkpoint",
    ),
    "missing tensor": (_drop("model/head.bias"), "tensor 'head.bias'.*is missing from the checkpoint"),
    "extra tensor": (_set("model/evil", torch.zeros(2)), "the checkpoint has tensor 'evil'"),
    "integer weights": (_set("model/head.bias", torch.zeros(10, dtype=torch.int64)), "not a float type"),
    "zero-stride view of 10^8": (
        _set("model/head.bias", torch.zeros(1).expand(10**8)),
        "claims more bytes than the file holds",
    ),
    "sparse tensor": (
        _set("model/head.bias", torch.zeros(10).to_sparse()),
        "sparse_coo tensor",
    ),
    "meta tensor": (_set("model/head.bias", torch.empty(10, device="meta")), "tensor on meta"),
    "momentum of the wrong shape": (
        _set(
            "optimizer/state", lambda st: {k: {**v, "momentum_buffer": torch.zeros(7)} for k, v in st.items()}
        ),
        r"optimizer state 'momentum_buffer' of parameter \d+ is \(7,\)",
    ),
    "optimizer state for a missing parameter": (
        _set("optimizer/state", lambda st: {**st, 99: {"momentum_buffer": torch.zeros(1)}}),
        "optimizer state names parameter 99",
    ),
    "NaN learning rate in the optimizer": (
        _set("optimizer/param_groups/0/lr", math.nan),
        r"param_groups\[0\]\['lr'\]=nan is not finite",
    ),
    "scheduler sets an unknown attribute": (
        _set("scheduler", lambda s: {**s, "optimizer": 5}),
        "scheduler state has unknown field 'optimizer'",
    ),
    "scheduler step count as a string": (_set("scheduler/last_epoch", "2"), "scheduler state last_epoch='2'"),
    "short torch RNG state": (_set("rng/torch", torch.zeros(5, dtype=torch.uint8)), r"rng\['torch'\] is not"),
    "numpy keys of the wrong size": (
        _set("rng/numpy/keys", torch.zeros(3, dtype=torch.int64)),
        r"rng\['numpy'\] keys are not 624",
    ),
    "python RNG state": (_set("rng/python", (3, (1, 2), None)), r"rng\['python'\] is not"),
    "epoch beyond the run": (_set("epoch", 10**9), r"epoch=1000000000 is not in \[1, epochs=2\]"),
    "epoch as a string": (_set("epoch", "2"), r"epoch='2' is not in"),
    "metrics for other epochs": (_set("metrics", lambda m: m[:1]), "metrics has 1 rows for 2 epochs"),
    "invalid configuration": (_set("config/lr", -1.0), "invalid run configuration: lr=-1.0"),
    "configuration is a list": (_set("config", [1]), "config is not a dict"),
    "5000-deep dict": (_set("pruner", _deep(5000)), "nested deeper than 16 levels"),
    "self-referential dict": (_set("pruner", _self_ref()), "contains itself"),
    "self-referential metrics": (_set("metrics", lambda m: m.append(m) or m), "contains itself"),
    "not a dict at all": (
        lambda s: s.clear() or s.update({"format": 1}),
        "not an rmtprune training checkpoint",
    ),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_checkpoint_is_a_clear_error_before_any_allocation(tmp_path, good_state, case):
    import copy
    import resource
    import sys

    mutate, match = CRAFTED[case]
    state = copy.deepcopy(good_state)
    mutate(state)
    out = tmp_path / "run"
    out.mkdir()
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20_000))  # torch.save of the 5000-deep case recurses
    try:
        torch.save(state, out / CHECKPOINT)
    finally:
        sys.setrecursionlimit(limit)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match=match) as info:
        train(out=out, resume=True)
    assert "\n" not in str(info.value)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200, f"{case}: peak memory grew by {grown_mb:.0f} MB"
    assert sorted(p.name for p in out.iterdir()) == [CHECKPOINT]  # nothing written, nothing moved


def test_crafted_checkpoint_on_the_command_line_is_one_line(tmp_path, good_state, capsys):
    import copy

    from rmtprune.cli import main

    state = copy.deepcopy(good_state)
    state["architecture"]["fc1"]["rank"] = 10**9
    out = tmp_path / "run"
    out.mkdir()
    torch.save(state, out / CHECKPOINT)
    assert main(["train", "--out", str(out), "--resume", "--quiet", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rmtprune: error: ") and "rank=1000000000" in err


def test_the_good_checkpoint_still_resumes(tmp_path, good_state):
    out = tmp_path / "run"
    out.mkdir()
    torch.save(good_state, out / CHECKPOINT)
    res = train(out=out, resume=True)
    assert res.resumed_from == 2 and res.model.fc1.rank == good_state["architecture"]["fc1"]["rank"]


# -- the nested compression config and the flat layout of earlier releases -----------------------


def _flat_layout(cfg: dict) -> dict:
    """A config dict as releases before the nested ``compression`` wrote it."""
    flat = {k: v for k, v in cfg.items() if k != "compression"}
    comp = cfg["compression"]
    flat.update(
        keep_bulk=comp["keep_bulk"],
        ks_max=comp["ks_max"],
        min_rank=comp["min_rank"],
        exclude=comp["exclude"],
        keep_output_rank=comp["protect_last"],
    )
    return flat


def test_config_nests_a_compression_config():
    cfg = TrainConfig(compression=rmtprune.CompressionConfig(keep_bulk=0.3, rule="energy", exclude=["head"]))
    d = cfg.to_dict()
    assert d["compression"]["rule"] == "energy" and "keep_bulk" not in d
    assert TrainConfig().compression.keep_bulk == 0.45  # the trainer's default f
    assert TrainConfig(compression={"ks_max": 0.2}).compression.keep_bulk == 0.45  # a dict: some fields
    with pytest.raises(ValueError, match="unknown CompressionConfig field"):
        TrainConfig(compression={"kep_bulk": 0.2})


def test_flat_fields_are_deprecated_aliases():
    with pytest.warns(DeprecationWarning, match="compression="):
        cfg = TrainConfig(keep_bulk=0.3, ks_max=0.2, min_rank=2, exclude=["head"], keep_output_rank=False)
    comp = cfg.compression
    assert (comp.keep_bulk, comp.ks_max, comp.min_rank, comp.exclude, comp.protect_last) == (
        0.3, 0.2, 2, ["head"], False,
    )  # fmt: skip
    # The flat layout of old config.json files and checkpoints is read (no warning: a file cannot change).
    assert TrainConfig.from_dict(_flat_layout(cfg.to_dict())) == cfg


def test_a_checkpoint_of_the_flat_layout_resumes(tmp_path, good_state):
    import copy

    state = copy.deepcopy(good_state)
    state["config"] = _flat_layout(state["config"])
    out = tmp_path / "run"
    out.mkdir()
    torch.save(state, out / CHECKPOINT)
    res = train(out=out, resume=True)
    assert res.resumed_from == 2 and res.config == TrainConfig.from_dict(good_state["config"])
    assert "compression" in json.loads((out / "config.json").read_text())  # rewritten in the new layout
    with pytest.raises(RmtpruneError, match=r"ks_max=0.3 differs from the run being resumed \(ks_max=0.1\)"):
        train(out=out, resume=True, compression={"ks_max": 0.3})


def test_a_checkpoint_saved_before_val_size_resumes_on_the_whole_training_file(tmp_path, monkeypatch):
    """A config saved before the validation split existed has no ``val_size``: that run trained on the
    whole training file, and resuming it must not switch to the default hold-out (1294 of 1438)."""
    import shutil

    from rmtprune.training import opening

    out = tmp_path / "run"
    train(out=out, **{**TINY, "epochs": 1, "prune": False, "val_size": 0})  # the layout it trained with
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):  # as an earlier release wrote them
        if (out / name).exists():
            state = torch.load(out / name, weights_only=True)
            del state["config"]["val_size"]
            torch.save(state, out / name)
    old = json.loads((out / "config.json").read_text())
    del old["val_size"]
    (out / "config.json").write_text(json.dumps(old))
    assert "val_size" not in load_checkpoint(out)[0]["config"]
    shutil.copytree(out, tmp_path / "copy")

    seen = []

    def load_data(cfg, data_dir):
        seen.append(trainer_load_data(cfg, data_dir))
        return seen[-1]

    trainer_load_data = opening._load_data
    monkeypatch.setattr(opening, "_load_data", load_data)
    with pytest.raises(
        RmtpruneError, match=r"val_size=None differs from the run being resumed \(val_size=0\)"
    ):
        train(out=out, resume=True, val_size=None)  # asking for the default hold-out is a change
    lines: list[str] = []
    res = train(out=out, resume=True, epochs=2, log=lines.append)
    assert res.resumed_from == 1 and res.config.val_size == 0
    train_ds, val_ds, _ = seen[-1]
    assert len(train_ds) == 1438 and val_ds is None  # the whole training file, no validation split
    assert [r.get("val_acc") for r in res.metrics] == [None, None]
    assert any("no val_size" in line and "val_size=0" in line for line in lines)
    assert json.loads((out / "config.json").read_text())["val_size"] == 0  # recorded from now on
    assert torch.load(out / CHECKPOINT, weights_only=True)["config"]["val_size"] == 0
    full = train(**{**TINY, "epochs": 2, "prune": False, "val_size": 0})  # never interrupted
    _compare(full.metrics, res.metrics)
    # A script's config of before val_size existed holds its default (None): it keeps the stored layout.
    script = TrainConfig.from_dict({**old, "val_size": None})
    again = train(config=script, out=tmp_path / "copy", resume=True)
    assert again.config.val_size == 0 and len(seen[-1][0]) == 1438


def test_train_takes_compression_fields():
    res = train(
        **{**TINY, "epochs": 2, "compression": {"rule": "energy", "energy": 0.5, "exclude": ["head"]}}
    )
    assert res.config.compression.rule == "energy" and res.config.compression.keep_bulk == 0.2
    assert {d["layer"]: d["action"] for d in res.decisions}["head"] == "skip"
    with pytest.raises(ValueError, match="unknown CompressionConfig field"):
        train(**{**TINY, "compression": {"rules": "energy"}})


def test_deprecated_flat_fields_read_back_the_nested_value() -> None:
    """``cfg.keep_bulk`` (deprecated) reads ``cfg.compression.keep_bulk``, not the InitVar's None."""
    import dataclasses

    from rmtprune.config import CompressionConfig

    with pytest.warns(DeprecationWarning):
        cfg = TrainConfig(keep_bulk=0.3)
    with pytest.warns(DeprecationWarning, match="compression.keep_bulk"):
        assert cfg.keep_bulk == 0.3
    with pytest.warns(DeprecationWarning, match="compression.protect_last"):
        assert TrainConfig().keep_output_rank is True
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        # dataclasses.replace copies the nested config, and the flat names do not override it
        new = dataclasses.replace(cfg, compression=CompressionConfig(keep_bulk=0.2))
        assert new.compression.keep_bulk == 0.2 and dataclasses.replace(cfg, epochs=3).epochs == 3
