"""Security matrix of issue 10: every reproduced problem run as a user would, outcome per case.

Each case (a crafted file, a command that could lose a file, an absurd number, a kill during a
save, a full disk, ...) is set up in a fresh temporary directory and run as a subprocess with
``PYTHONPATH=<tree>/src``: ``python -P -m rmtprune.cli ...`` for CLI cases (``-P``: the current
directory is not put on ``sys.path``, exactly as for the ``rmtprune`` console script), or
``python -P CASE.py`` (a script kept outside the case directory) for Python-API cases. Every
case runs with stdin closed, a 60 s timeout and a 6 GiB address-space cap (``RLIMIT_AS``).

Outcomes, first match wins:

- *code executed*: the marker file a malicious factory/module writes exists, the ``input()``
  prompt or the ``(Pdb)`` prompt was printed, or ``EOFError``/``BdbQuit`` (stdin is closed);
- *partial file / data loss*: a file that existed before changed or vanished (each case names
  the files it may replace, normally only OUT, and only when it succeeds), something new is left
  after a failure (temp files, ``OUT.json`` without OUT, a created directory tree), a temp file
  survives the next run after a SIGKILL, or the output model silently lost a layer's
  parametrization;
- *huge allocation*: ``MemoryError`` / ``can't allocate memory`` / ``bad_alloc`` under the cap;
- *hang*: still running after the timeout;
- *crash*: a Python traceback, an exit status other than 0/1/2/130, or an error that is not one
  line (an API call raising anything but an ``rmtprune.errors.RmtpruneError``);
- *silently accepted*: success on input that must be refused (half a shard set analysed, an
  index reading a file outside its directory, ...);
- *clean error*: exit status 2 with exactly one stderr line ``rmtprune[ CMD]: error: ...``
  (130 and one line for the Ctrl-C case), or an ``RmtpruneError`` from the API;
- *loaded*: success where success is correct.

    python benchmarks/security_matrix.py                      # this working tree
    python benchmarks/security_matrix.py --rev 77f9c77        # a git revision (temporary worktree)
    python benchmarks/security_matrix.py --compare 77f9c77    # that revision and this tree, side by
                                                              # side; writes results/security_matrix.md
    python benchmarks/security_matrix.py --case st-dtype-int -v   # one case (substring), with stderr

Setup runs once per revision in a subprocess of that revision (``rmtprune.save`` of that revision
writes the legitimate model files; crafted files are written byte by byte, the same for both).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import datetime as dt
import fnmatch
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CAP_BYTES = 6 * 2**30
TIMEOUT_S = 60
OUTCOMES = (
    "code executed",
    "partial file / data loss",
    "huge allocation",
    "hang",
    "crash",
    "silently accepted",
    "clean error",
    "loaded",
)
SHORT = {
    "code executed": "CODE",
    "partial file / data loss": "PARTIAL",
    "huge allocation": "HUGE-ALLOC",
    "hang": "HANG",
    "crash": "CRASH",
    "silently accepted": "ACCEPTED",
    "clean error": "clean error",
    "loaded": "loaded",
}
MARKER = "pwned.txt"
TRAIN = ["--model", "mlp:16", "--dataset", "mnist", "--epochs", "2", "--train-subset", "512"]
TRAIN += ["--test-subset", "256", "--no-progress", "--quiet"]
SPARSIFY_DATA = ["--dataset", "mnist", "--train-subset", "256", "--cycles", "1", "--cycle-steps", "3"]
SPARSIFY_DATA += ["--no-progress", "--quiet"]


# ------------------------------------------------------------------------------------------ cases


@dataclass
class Case:
    group: str
    name: str
    setup: str  # a function of SETUPS, run in a subprocess of the revision under test
    argv: list[str] | None = None  # CLI arguments after ``rmtprune``
    code: str | None = None  # Python-API case: the body of a script run in the case directory
    expect: str = "error"  # "error": must be refused; "ok": must succeed
    replace: tuple[str, ...] = ()  # pre-existing paths it may replace when it succeeds
    creates: tuple[str, ...] = ()  # globs of new paths allowed when it succeeds
    clean_rc: int = 2
    env: dict[str, str] = field(default_factory=dict)
    special: str | None = None  # "tmpfs" or "kill:<point>"
    what: str = ""  # one line for the report

    def command(self) -> str:
        if self.argv is not None:
            return "rmtprune " + " ".join(self.argv)
        return self.what


def _outs(stem: str) -> tuple[str, ...]:
    return (f"{stem}.safetensors", f"{stem}.json", f"{stem}.report.json", f"{stem}.report.md")


def cases() -> list[Case]:
    C: list[Case] = []
    g = "code execution"
    evil = [
        ("os-system", "os:system, factory_args command='echo ran > pwned.txt'"),
        ("evilmod-cwd", "evilmod:make, evilmod.py in the current directory writes pwned.txt on import"),
        ("breakpoint", "builtins:breakpoint"),
        ("input", "builtins:input"),
        ("subprocess-run", "subprocess:run, args ['touch', 'pwned.txt']"),
    ]
    for key, desc in evil:
        C.append(
            Case(
                g,
                f"load-{key}",
                f"evil_{key.replace('-', '_')}",
                code="import rmtprune\nrmtprune.load('evil.safetensors')\n",
                what=f"rmtprune.load('evil.safetensors')  # factory {desc}",
            )
        )
        C.append(
            Case(
                g,
                f"compress-dry-run-{key}",
                f"evil_{key.replace('-', '_')}",
                argv=["compress", "evil.safetensors", "out.safetensors", "--dry-run", "--no-progress"],
            )
        )
    for key in ("os-system", "evilmod-cwd"):
        C.append(
            Case(
                g,
                f"sparsify-{key}",
                f"evil_{key.replace('-', '_')}",
                argv=["sparsify", "evil.safetensors", "o.safetensors", "--no-progress"],
            )
        )

    g = "data loss"
    C += [
        Case(
            g,
            "compress-in-place-report-md-is-dir",
            "net_report_dir",
            argv=["compress", "net.safetensors", "net.safetensors", "--no-progress"],
            replace=_outs("net"),
            creates=_outs("net"),
        ),
        Case(
            g,
            "sparsify-in-place-report-md-is-dir",
            "net_report_dir",
            argv=["sparsify", "net.safetensors", "net.safetensors", "--no-progress", "--quiet"],
            replace=_outs("net"),
            creates=_outs("net"),
        ),
        Case(
            g,
            "compress-in-place-ctrl-c-in-report",
            "net",
            code=textwrap.dedent(
                """\
                import builtins, io, sys
                real = io.open
                def interrupted(file, mode="r", *a, **k):
                    if ".report.md" in str(file) and any(c in mode for c in "wax"):
                        raise KeyboardInterrupt
                    return real(file, mode, *a, **k)
                builtins.open = io.open = interrupted
                from rmtprune.cli import main
                sys.exit(main(["compress", "net.safetensors", "net.safetensors", "--no-progress", "--quiet"]))
                """
            ),
            clean_rc=130,
            replace=_outs("net"),
            creates=_outs("net"),
            what="rmtprune compress net.safetensors net.safetensors  # Ctrl-C when the report .md is opened",
        ),
        Case(
            g,
            "analyze-json-is-input",
            "net",
            argv=["analyze", "net.safetensors", "--json", "net.safetensors", "--no-progress"],
        ),
        Case(
            g,
            "analyze-csv-is-input",
            "net",
            argv=["analyze", "net.safetensors", "--csv", "net.safetensors", "--no-progress"],
        ),
        Case(
            g,
            "analyze-json-over-users-file",
            "net_user_notes",
            argv=["analyze", "net.safetensors", "--json", "notes.json", "--no-progress"],
        ),
        Case(
            g,
            "compress-sidecar-is-config",
            "net_config_out_json",
            argv=["compress", "net.safetensors", "out.safetensors", "--config", "out.json", "--no-progress"],
        ),
        Case(
            g,
            "compress-sidecar-over-users-file",
            "net_user_out_json",
            argv=["compress", "net.safetensors", "out.safetensors", "--no-progress"],
        ),
        Case(
            g,
            "save-json-over-users-file",
            "user_model_json",
            code="import rmtprune\nfrom torch import nn\n"
            "rmtprune.save(nn.Linear(2, 2), 'model.safetensors')\n",
            what="rmtprune.save(nn.Linear(2, 2), 'model.safetensors')  # the user's model.json beside it",
        ),
        Case(
            g,
            "compress-out-is-dir",
            "net_out_dir",
            argv=["compress", "net.safetensors", "o.safetensors", "--no-progress"],
        ),
        Case(
            g,
            "sparsify-out-is-dir",
            "net_out_dir",
            argv=["sparsify", "net.safetensors", "o.safetensors", "--no-progress", "--quiet"],
        ),
    ]
    kill_argv = ["compress", "net.safetensors", "net.safetensors", "--rule", "fixed", "--ratio", "0.5"]
    kill_argv += ["--no-progress", "--quiet"]
    for point, desc in [
        ("half", "SIGKILL at half the uninterrupted run time (during the analysis)"),
        ("save-start", "SIGKILL on entering safetensors' save (nothing serialised yet)"),
        ("save-mid", "SIGKILL 5 ms into safetensors' save (weights half written)"),
        ("save-done", "SIGKILL when safetensors' save returns, before any rename"),
        ("rename-1", "SIGKILL right after the first os.replace/os.rename"),
        ("rename-2", "SIGKILL right after the second os.replace/os.rename"),
    ]:
        C.append(
            Case(
                "SIGKILL during save",
                f"kill-compress-in-place-{point}",
                "bignet",
                argv=kill_argv,
                expect="ok",
                replace=_outs("net"),
                creates=_outs("net"),
                special=f"kill:{point}",
                what=f"{desc}, then the same command again",
            )
        )

    g = "crafted input"
    for key, entry in [
        ("dtype-int", '"dtype": 5, "shape": [2, 2]'),
        ("dtype-list", '"dtype": ["F32"], "shape": [2, 2]'),
        ("dtype-null", '"dtype": null, "shape": [2, 2]'),
        ("shape-infinity", '"dtype": "F32", "shape": [Infinity, 2]'),
        ("shape-1e400", '"dtype": "F32", "shape": [1e400, 2]'),
    ]:
        C.append(
            Case(
                g,
                f"st-{key}",
                "st_header:" + entry,
                argv=["analyze", "bad.safetensors", "--no-progress"],
                what=f"header entry {{{entry}}}",
            )
        )
    C += [
        Case(
            g,
            "torch-zip-named-safetensors",
            "torch_zip",
            argv=["analyze", "zip.safetensors", "--no-progress"],
            expect="ok",  # read as the torch file it is (by its magic bytes), or refused in one line
        ),
        Case(g, "pt-self-referential-dict", "pt_selfref", argv=["analyze", "x.pt", "--no-progress"]),
        Case(g, "pt-5000-deep-dict", "pt_deep", argv=["analyze", "x.pt", "--no-progress"]),
        Case(g, "pt-sparse-tensor", "pt_sparse", argv=["analyze", "x.pt", "--no-progress"]),
        Case(g, "pt-meta-tensor", "pt_meta", argv=["analyze", "x.pt", "--no-progress"]),
    ]
    load_given = "import rmtprune\nfrom torch import nn\n"
    load_given += "rmtprune.load('m.safetensors', nn.Sequential(nn.Linear(8, 8)))\n"
    for key in ("layers-list", "layer-no-matrix-shape", "negative-rank", "matrix-shape-1d", "rank-1e9"):
        C.append(
            Case(
                g,
                f"manifest-{key}",
                f"manifest:{key}",
                code=load_given,
                what=f"rmtprune.load('m.safetensors', nn.Sequential(nn.Linear(8, 8)))  # manifest {key}",
            )
        )
    C += [
        Case(
            g,
            "manifest-integer-factory-load",
            "manifest:int-factory",
            code="import rmtprune\nrmtprune.load('m.safetensors')\n",
            what="rmtprune.load('m.safetensors')  # manifest factory=3",
        ),
        Case(
            g,
            "manifest-integer-factory-compress",
            "manifest:int-factory",
            argv=["compress", "m.safetensors", "o.safetensors", "--no-progress"],
        ),
        Case(
            g,
            "spec-mlp4000000-small-file-load",
            "huge_spec",
            code="import rmtprune\nrmtprune.load('big.safetensors')\n",
            what="rmtprune.load('big.safetensors')  # factory mlp:4000000, one 10x10 tensor",
        ),
        Case(
            g,
            "spec-mlp4000000-small-file-compress",
            "huge_spec",
            argv=["compress", "big.safetensors", "o.safetensors", "--no-progress"],
        ),
        Case(
            g, "shards-missing-second-no-index", "shards_missing", argv=["analyze", "shards", "--no-progress"]
        ),
        Case(g, "index-points-to-parent", "index_parent", argv=["analyze", "shards", "--no-progress"]),
        Case(
            g, "index-points-to-absolute-path", "index_absolute", argv=["analyze", "shards", "--no-progress"]
        ),
        Case(
            g,
            "train-resume-self-referential-checkpoint",
            "resume_selfref",
            argv=["train", "--out", "run", "--resume", *TRAIN],
        ),
    ]

    g = "numbers"
    C += [
        Case(g, "train-lr-1e30", "empty", argv=["train", "--out", "run", *TRAIN, "--lr", "1e30"]),
        Case(g, "train-lr-1e308", "empty", argv=["train", "--out", "run", *TRAIN, "--lr", "1e308"]),
        Case(
            g,
            "sparsify-lr-inf",
            "empty",
            argv=["sparsify", "--model", "mlp:16", "o.safetensors", *SPARSIFY_DATA, "--lr", "inf"],
        ),
        Case(g, "train-device-meta", "empty", argv=["train", "--out", "run", *TRAIN, "--device", "meta"]),
        Case(g, "train-seed-1e20", "empty", argv=["train", "--out", "run", *TRAIN, "--seed", "1e20"]),
        Case(
            g,
            "compress-model-mlp-1e20",
            "empty",
            argv=["compress", "--model", "mlp:99999999999999999999", "--dataset", "mnist", "--dry-run"],
        ),
    ]

    C.append(
        Case(
            "data",
            "train-data-dir-missing-download-refused",
            "cache_dir",
            argv=["train", "--out", "run", *TRAIN, "--data-dir", "nonexistent/a/b"],
            env={"RMTPRUNE_DATA": "", "RMTPRUNE_CACHE": "{d}/cache"},
            what="",
        )
    )

    g = "layers"
    wn_check = textwrap.dedent(
        """\
        from torch.nn.utils import parametrize
        def kept(m):
            if old_style:
                return hasattr(m, "weight_g") and hasattr(m, "weight_v")
            return parametrize.is_parametrized(m, "weight")
        if not kept(model[0]):
            print("@@CORRUPT layer 0 lost its weight_norm: now", type(model[0]).__name__)
        """
    )
    head = "import torch, rmtprune\nfrom torch import nn\ntorch.manual_seed(0)\n"
    new_wn = "from torch.nn.utils.parametrizations import weight_norm\nold_style = False\n"
    old_wn = "from torch.nn.utils import weight_norm\nold_style = True\n"
    body = "model = nn.Sequential(weight_norm(nn.Linear(64, 64)), nn.ReLU(),"
    body += " nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))\n"
    C += [
        Case(
            g,
            "compress-weight-norm-parametrization",
            "empty",
            code=head
            + new_wn
            + body
            + "model, p = rmtprune.compress(model, rule='fixed', ratio=0.25)\n"
            + wn_check,
            expect="ok",
            what="rmtprune.compress(Sequential(parametrizations.weight_norm(Linear(64, 64)), ...), "
            "rule='fixed', ratio=0.25)",
        ),
        Case(
            g,
            "compress-weight-norm-old-hook",
            "empty",
            code=head
            + old_wn
            + body
            + "model, p = rmtprune.compress(model, rule='fixed', ratio=0.25)\n"
            + wn_check,
            expect="ok",
            what="rmtprune.compress(Sequential(nn.utils.weight_norm(Linear(64, 64)), ...), "
            "rule='fixed', ratio=0.25)",
        ),
        Case(
            g,
            "sparsify-weight-norm-parametrization",
            "empty",
            code=head
            + new_wn
            + body
            + "model, r = rmtprune.sparsify(model, rmtprune.SparsifyConfig(target=0.5, n_cycles=1))\n"
            + wn_check,
            expect="ok",
            what="rmtprune.sparsify(Sequential(parametrizations.weight_norm(Linear(64, 64)), ...), "
            "target=0.5)",
        ),
    ]

    C.append(
        Case(
            "disk full",
            "compress-to-256k-tmpfs",
            "disk_full",
            argv=["compress", "big.safetensors", "tiny/out.safetensors", "--rule", "fixed", "--ratio", "0.9"]
            + ["--no-progress"],
            special="tmpfs",
        )
    )

    g = "controls (must succeed)"
    C += [
        Case(g, "analyze-net", "net", argv=["analyze", "net.safetensors", "--no-progress"], expect="ok"),
        Case(
            g,
            "load-reference-spec",
            "net",
            code="import rmtprune\nrmtprune.load('net.safetensors')\n",
            expect="ok",
            what="rmtprune.load('net.safetensors')  # factory mlp:64, no model given",
        ),
        Case(
            g,
            "compress-in-place",
            "net",
            argv=["compress", "net.safetensors", "net.safetensors", "--no-progress"],
            expect="ok",
            replace=_outs("net"),
            creates=_outs("net"),
        ),
        Case(
            g,
            "sparsify-to-new-file",
            "net",
            argv=["sparsify", "net.safetensors", "out.safetensors", "--no-progress", "--quiet"],
            expect="ok",
            creates=_outs("out"),
        ),
        Case(
            g,
            "analyze-json-twice",
            "net_own_json",
            argv=["analyze", "net.safetensors", "--json", "a.json", "--no-progress"],
            expect="ok",
            replace=("a.json",),
            what="",
        ),
    ]
    return C


# ------------------------------------------------------------------------- setup (revision's process)


def _manifest(factory, factory_args=None, layers=None, **over) -> dict:
    m = {
        "format": "rmtprune-checkpoint",  # the format's name before 0.2: read by every revision compared
        "format_version": 1,
        "rmtprune_version": "0.1.0",
        "torch_version": "2.0",
        "model_class": "torch.nn.modules.container.Sequential",
        "factory": factory,
        "factory_args": factory_args or {},
        "params": 420,
        "layers": layers or {},
        "rule": None,
        "config": None,
        "fits": {},
    }
    m.update(over)
    return m


def _st(path: Path, tensors: dict, manifest, sidecar: bool = False) -> None:
    from safetensors.torch import save_file

    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    save_file(tensors, str(path), metadata={"rmtprune": text})
    if sidecar:
        path.with_suffix(".json").write_text(json.dumps(json.loads(text), indent=2) + "\n")


def _evil(d: Path, factory: str, args: dict) -> None:
    import torch

    t = {"0.weight": torch.zeros(20, 20), "0.bias": torch.zeros(20)}
    _st(d / "evil.safetensors", t, _manifest(factory, args), sidecar=True)


def _net(d: Path, name: str = "net", spec: str = "mlp:64", shape=(1, 8, 8), classes: int = 4) -> None:
    import torch

    import rmtprune

    try:
        from rmtprune.zoo.models import build_model
    except ImportError:  # a revision before the zoo (--compare)
        from rmtprune.models import build_model

    torch.manual_seed(0)
    fargs = {"input_shape": list(shape), "num_classes": classes}
    rmtprune.save(
        build_model(spec, shape, classes), d / f"{name}.safetensors", factory=spec, factory_args=fargs
    )


_BIG: dict = {}


def _setup(d: Path, key: str) -> None:
    import torch

    name, _, arg = key.partition(":")
    if name == "empty":
        return
    if name == "evil_os_system":
        _evil(d, "os:system", {"command": f"echo ran > {MARKER}"})
    elif name == "evil_evilmod_cwd":
        (d / "evilmod.py").write_text(f"open({MARKER!r}, 'w').write('imported')\ndef make():\n    pass\n")
        _evil(d, "evilmod:make", {})
    elif name == "evil_breakpoint":
        _evil(d, "builtins:breakpoint", {})
    elif name == "evil_input":
        _evil(d, "builtins:input", {})
    elif name == "evil_subprocess_run":
        _evil(d, "subprocess:run", {"args": ["touch", MARKER]})
    elif name == "net":
        _net(d)
    elif name == "net_report_dir":
        _net(d)
        (d / "net.report.md").mkdir()
    elif name == "net_user_notes":
        _net(d)
        (d / "notes.json").write_text('{"my": "notes"}\n')
    elif name == "net_own_json":
        _net(d)
        env = dict(os.environ)
        cmd = [sys.executable, "-P", "-m", "rmtprune.cli", "analyze", "net.safetensors", "--json", "a.json"]
        subprocess.run(cmd + ["--no-progress"], cwd=d, env=env, check=True, capture_output=True)
    elif name == "net_config_out_json":
        _net(d)
        (d / "out.json").write_text(json.dumps({"rule": "bema", "keep_bulk": 0.1}) + "\n")
    elif name == "net_user_out_json":
        _net(d)
        (d / "out.json").write_text('{"my": "notes about out"}\n')
    elif name == "user_model_json":
        (d / "model.json").write_text('{"my": "notes"}\n')
    elif name == "net_out_dir":
        _net(d)
        (d / "o.safetensors").mkdir()
    elif name == "bignet":
        if "dir" not in _BIG:
            _BIG["dir"] = d
            _net(d, spec="mlp:1500,1000", shape=(1, 28, 28), classes=10)  # 2.7M parameters, 11 MB
        else:
            for p in _BIG["dir"].iterdir():
                shutil.copy2(p, d / p.name)
    elif name == "st_header":
        header = '{"w": {' + arg + ', "data_offsets": [0, 16]}}'
        raw = header.encode()
        raw += b" " * (-len(raw) % 8)
        (d / "bad.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(16))
    elif name == "torch_zip":
        torch.save({"w": torch.randn(16, 16)}, d / "zip.safetensors")
    elif name == "pt_selfref":
        obj: dict = {"w": torch.randn(16, 16)}
        obj["self"] = obj
        torch.save(obj, d / "x.pt")
    elif name == "pt_deep":
        sys.setrecursionlimit(100_000)
        root = cur = {}
        for _ in range(5000):
            cur["a"] = {}
            cur = cur["a"]
        cur["w"] = torch.randn(16, 16)
        torch.save(root, d / "x.pt")
    elif name == "pt_sparse":
        torch.save({"w": torch.randn(16, 16).to_sparse()}, d / "x.pt")
    elif name == "pt_meta":
        torch.save({"w": torch.empty(16, 16, device="meta")}, d / "x.pt")
    elif name == "manifest":
        layer = {"type": "LowRankLinear", "original_type": "Linear", "rank": 2, "matrix_shape": [8, 8]}
        layer |= {"weight_shape": [8, 8], "bias": True}
        bad = {
            "layers-list": {"layers": []},
            "layer-no-matrix-shape": {
                "layers": {"0": {k: v for k, v in layer.items() if k != "matrix_shape"}}
            },
            "negative-rank": {"layers": {"0": {**layer, "rank": -1}}},
            "matrix-shape-1d": {"layers": {"0": {**layer, "matrix_shape": [8]}}},
            "rank-1e9": {"layers": {"0": {**layer, "rank": 10**9}}},
            "int-factory": {"factory": 3},
        }[arg]
        _st(d / "m.safetensors", {"0.weight": torch.zeros(8, 8)}, {**_manifest(None), **bad})
    elif name == "huge_spec":
        fargs = {"input_shape": [1, 28, 28], "num_classes": 10}
        _st(d / "big.safetensors", {"fc1.weight": torch.zeros(10, 10)}, _manifest("mlp:4000000", fargs))
    elif name in ("shards_missing", "index_parent", "index_absolute"):
        from safetensors.torch import save_file

        (d / "shards").mkdir()
        if name == "shards_missing":
            save_file({"w": torch.randn(16, 16)}, str(d / "shards" / "model-00001-of-00002.safetensors"))
        else:
            save_file({"a": torch.randn(16, 16)}, str(d / "shards" / "model-00001-of-00001.safetensors"))
            (d / "outside").mkdir()
            save_file({"w": torch.randn(16, 16)}, str(d / "outside" / "x.safetensors"))
            target = (
                "../outside/x.safetensors" if name == "index_parent" else str(d / "outside" / "x.safetensors")
            )
            index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00001.safetensors", "w": target}}
            (d / "shards" / "model.safetensors.index.json").write_text(json.dumps(index))
    elif name == "resume_selfref":
        (d / "run").mkdir()
        obj = {"epoch": 1}
        obj["self"] = obj
        torch.save(obj, d / "run" / "checkpoint.pt")
    elif name == "cache_dir":
        (d / "cache").mkdir()
    elif name == "disk_full":
        _net(d, name="big", spec="mlp:512", shape=(1, 16, 16), classes=10)  # 0.5 MB of float32
        (d / "tiny").mkdir()
    else:
        raise SystemExit(f"unknown setup {key!r}")


def setup_main(root: Path, names: list[str]) -> None:
    """In the revision's own interpreter: say which rmtprune this is, then make each case's folder."""
    import rmtprune

    print("RMTPRUNE_FILE", rmtprune.__file__, flush=True)
    by_name = {c.name: c for c in cases()}
    for n in names:
        d = root / n
        d.mkdir(parents=True)
        _setup(d, by_name[n].setup)


# ------------------------------------------------------------------------------------------ running


API_WRAPPER = """\
import json, sys, traceback
try:
    from rmtprune.errors import RmtpruneError
except Exception:
    RmtpruneError = ()
try:
{body}
except SystemExit:
    raise
except BaseException as exc:
    clean = isinstance(exc, RmtpruneError)
    kind = "clean" if clean else "crash"
    first = (str(exc).splitlines() or [""])[0][:400]
    print(f"@@RESULT {{kind}} {{type(exc).__module__}}.{{type(exc).__qualname__}}: {{first}}", flush=True)
    if not clean:
        traceback.print_exc()
    sys.exit(2 if clean else 3)
else:
    print("@@RESULT ok", flush=True)
"""


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CAP_BYTES, CAP_BYTES))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(src: Path, root: Path, extra: dict[str, str], d: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RMTPRUNE_", "PYTHONBREAKPOINT"))}
    env.update(
        PYTHONPATH=str(src),
        PYTHONDONTWRITEBYTECODE="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        RMTPRUNE_DATA="/work/shared/data",
        RMTPRUNE_CACHE=str(root / "_cache"),
        RMTPRUNE_MIRRORS=f"http://127.0.0.1:{_closed_port()}/{{name}}/",
    )
    for k, v in extra.items():
        if v == "":
            env.pop(k, None)
        else:
            env[k] = v.replace("{d}", str(d))
    return env


def _argv(case: Case, root: Path) -> list[str]:
    if case.argv is not None:
        return [sys.executable, "-P", "-m", "rmtprune.cli", *case.argv]
    script = root / "_scripts" / f"{case.name}.py"
    script.parent.mkdir(exist_ok=True)
    script.write_text(API_WRAPPER.format(body=textwrap.indent(case.code, "    ")))
    return [sys.executable, "-P", str(script)]


def _run(argv: list[str], d: Path, env: dict, timeout: float) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        cwd=d,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_limit,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        hang = False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        hang = True
    return {
        "rc": proc.returncode,
        "stdout": out.decode(errors="replace"),
        "stderr": err.decode(errors="replace"),
        "hang": hang,
        "seconds": time.perf_counter() - t0,
    }


def snapshot(d: Path) -> dict[str, str]:
    """Relative path -> sha256 (files), ``<dir>`` or ``<link>`` for everything under ``d``."""
    out = {}
    for base, dirs, files in os.walk(d):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        for x in dirs:
            p = Path(base, x)
            out[p.relative_to(d).as_posix()] = "<link>" if p.is_symlink() else "<dir>"
        for x in files:
            p = Path(base, x)
            rel = p.relative_to(d).as_posix()
            if p.is_symlink():
                out[rel] = "<link>"
                continue
            try:
                h = hashlib.sha256()
                with open(p, "rb") as fh:
                    for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                        h.update(chunk)
                out[rel] = h.hexdigest()
            except OSError as exc:
                out[rel] = f"<unreadable {exc.errno}>"
    return out


def _match(rel: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(rel, g) or fnmatch.fnmatchcase(rel, g + "/*") for g in globs)


def file_damage(case: Case, pre: dict, post: dict, ok: bool) -> list[str]:
    """What the run did to the case directory that it should not have."""
    bad = []
    for rel in sorted(pre):
        if rel not in post:
            bad.append(f"{rel} vanished")
        elif pre[rel] != post[rel] and not (ok and _match(rel, case.replace)):
            bad.append(f"{rel} changed")
    new = sorted(rel for rel in post if rel not in pre)
    left = [rel for rel in new if not (ok and _match(rel, case.creates))]
    # report a created tree by its top
    tops = [r for r in left if not any(r.startswith(o + "/") for o in left if o != r)]
    if tops:
        bad.append("left behind: " + ", ".join(tops[:6]) + (" ..." if len(tops) > 6 else ""))
    return bad


_HUGE = ("MemoryError", "can't allocate memory", "Cannot allocate memory", "bad_alloc", "OutOfMemoryError")
_ONE_LINE = re.compile(r"^rmtprune(?: [a-z]+)?: (error|interrupted)")


def classify(case: Case, res: dict, d: Path, damage: list[str]) -> tuple[str, str]:
    out, err, rc = res["stdout"], res["stderr"], res["rc"]
    lines = [x for x in err.splitlines() if x.strip()]
    first = lines[0] if lines else ""
    result = next((x[len("@@RESULT ") :] for x in out.splitlines() if x.startswith("@@RESULT ")), None)
    markers = [p.relative_to(d).as_posix() for p in d.rglob(MARKER)]
    if markers:
        return "code executed", f"{markers[0]} was written"
    called = re.search(r"(system\(\)|Popen\.__init__\(\)) missing \d* ?required", err + (result or ""))
    if called:
        return "code executed", (
            f"the file's factory was called ({called.group(1)} ran without the recorded arguments, "
            "which this CLI path drops; a factory needing none runs as is)"
        )
    if "(Pdb)" in out or "BdbQuit" in err or "bdb.py" in err:
        return "code executed", "pdb started"
    if "EOF when reading a line" in err + (result or ""):
        return "code executed", "input() was called (EOFError on closed stdin)"
    corrupt = [x for x in out.splitlines() if x.startswith("@@CORRUPT ")]
    if corrupt:
        return "partial file / data loss", corrupt[0][len("@@CORRUPT ") :]
    if damage:
        return "partial file / data loss", "; ".join(damage)
    failed = res["hang"] or rc != 0
    if failed and any(h in err or h in out for h in _HUGE):
        hit = next(x for x in err.splitlines() + out.splitlines() if any(h in x for h in _HUGE))
        return "huge allocation", hit.strip()[:200]
    if res["hang"]:
        return "hang", f"still running after {TIMEOUT_S} s"
    if case.argv is None and result is None and rc not in (0, case.clean_rc):
        return "crash", f"exit status {rc}, no result: {lines[-1] if lines else ''}"[:300]
    if "Traceback (most recent call last)" in err:
        last = next((x for x in reversed(lines) if x and not x.startswith(" ")), first)
        return "crash", f"traceback: {last}"[:300]
    if rc not in (0, 1, 2, 130):
        return "crash", f"exit status {rc}: {first}"[:300]
    if case.argv is None and case.code and "from rmtprune.cli import main" not in case.code:
        if result is None:
            return "crash", f"exit status {rc}, no result line"
        if result.startswith("crash"):
            return "crash", result[len("crash ") :][:300]
        if result.startswith("clean"):
            return "clean error", result[len("clean ") :][:300]
    elif rc != 0:
        if rc == case.clean_rc and len(lines) == 1 and _ONE_LINE.match(first):
            return "clean error", first[:300]
        what = f"{len(lines)} stderr lines" if len(lines) != 1 else "not 'rmtprune: error:'"
        return "crash", f"exit status {rc}, {what}: {(lines[-1] if lines else '')}"[:300]
    if case.expect == "ok":
        return "loaded", ""
    return "silently accepted", "exit status 0"


def run_case(case: Case, src: Path, root: Path, verbose: bool = False) -> dict:
    d = root / case.name
    env = _env(src, root, case.env, d)
    argv = _argv(case, root)
    mounted = False
    try:
        if case.special == "tmpfs":
            r = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d / "tiny")], capture_output=True
            )
            mounted = r.returncode == 0
            if not mounted:
                return _row(case, "skipped", "mount not allowed here", {})
        if case.special and case.special.startswith("kill:"):
            return run_kill(case, argv, d, env, root, verbose)
        pre = snapshot(d)
        res = _run(argv, d, env, TIMEOUT_S)
        post = snapshot(d)
        ok = res["rc"] == 0 and not res["hang"]
        outcome, detail = classify(case, res, d, file_damage(case, pre, post, ok))
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(d / "tiny")], capture_output=True)
    if verbose:
        print(
            f"--- {case.name}: rc {res['rc']} ({res['seconds']:.1f} s)\n"
            f"{res['stdout'][-3000:]}{res['stderr'][-3000:]}"
        )
    return _row(case, outcome, detail, res)


def _row(case: Case, outcome: str, detail: str, res: dict) -> dict:
    return {
        "group": case.group,
        "case": case.name,
        "command": case.command(),
        "what": case.what,
        "outcome": outcome,
        "detail": detail,
        "rc": res.get("rc"),
        "seconds": round(res.get("seconds", 0.0), 1),
        "stderr": res.get("stderr", "")[-2000:],
    }


_KILL_REF: dict[str, dict] = {}


KILLER = """\
import os, signal, sys, threading

point = sys.argv[1]


def die(why):
    sys.stderr.write(f"@@KILLED {why}\\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


import safetensors.torch as st

depth = [0]


def wrap_save(fn):
    def inner(*a, **k):
        depth[0] += 1
        outer = depth[0] == 1
        target = a[1] if len(a) > 1 else k.get("filename", "?")
        if outer and point == "save-start":
            die(f"entering {fn.__name__}({os.path.basename(str(target))})")
        if outer and point == "save-mid":
            why = f"5 ms into {fn.__name__}({os.path.basename(str(target))})"
            threading.Timer(0.005, die, (why,)).start()
        try:
            out = fn(*a, **k)
        finally:
            depth[0] -= 1
        if outer and point == "save-done":
            die(f"after {fn.__name__}({os.path.basename(str(target))}) returned")
        return out

    inner.__name__ = fn.__name__
    return inner


st.save_file = wrap_save(st.save_file)
st.save_model = wrap_save(st.save_model)
renames = [0]


def wrap_rename(fn):
    def inner(src, dst, *a, **k):
        out = fn(src, dst, *a, **k)
        renames[0] += 1
        if point == f"rename-{renames[0]}":
            die(f"after rename {renames[0]}: {os.path.basename(str(src))} -> {os.path.basename(str(dst))}")
        return out

    return inner


os.replace = wrap_rename(os.replace)
os.rename = wrap_rename(os.rename)
from rmtprune.cli import main

sys.exit(main(sys.argv[2:]))
"""


def run_kill(case: Case, argv: list[str], d: Path, env: dict, root: Path, verbose: bool) -> dict:
    """SIGKILL ``compress NET NET`` at one point; NET must be the old or new file; rerun cleans up."""
    old = snapshot(d)
    key = str(root)
    if key not in _KILL_REF:  # the complete new file, from an uninterrupted run on a copy
        ref = root / "_killref"
        shutil.copytree(d, ref)
        r = _run(argv, ref, env, 300)
        new = snapshot(ref)
        _KILL_REF[key] = {"new": new, "seconds": r["seconds"], "rc": r["rc"]}
    ref = _KILL_REF[key]
    if ref["rc"] != 0:
        return _row(case, "crash", f"the uninterrupted run failed with exit status {ref['rc']}", {})
    point = case.special.split(":", 1)[1]
    run_argv = argv
    if point != "half":
        killer = root / "_scripts" / "killer.py"
        killer.parent.mkdir(exist_ok=True)
        killer.write_text(KILLER)
        run_argv = [sys.executable, "-P", str(killer), point, *case.argv]
    proc = subprocess.Popen(
        run_argv,
        cwd=d,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_limit,
        start_new_session=True,
    )
    if point == "half":
        time.sleep(0.5 * ref["seconds"])
    else:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=3 * ref["seconds"] + 30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    kill_err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    hit = re.search(r"@@KILLED (.*)", kill_err)
    after_kill = snapshot(d)
    left_kill = sorted(r for r in after_kill if r not in old and not _match(r, case.creates))
    left_kill = [r for r in left_kill if not any(r.startswith(o + "/") for o in left_kill if o != r)]
    net_state = after_kill.get("net.safetensors")
    json_state = after_kill.get("net.json")
    if json_state not in (old.get("net.json"), ref["new"].get("net.json")):
        return _row(case, "partial file / data loss", "after SIGKILL net.json is neither old nor new", {})
    pair = (
        ""
        if (json_state == old.get("net.json")) == (net_state == old["net.safetensors"])
        else (" (net.json: the other one, the pair is mixed)")
    )
    if point == "half":
        where = "killed at half time" if proc.returncode == -signal.SIGKILL else "finished before half time"
    else:
        where = f"killed {hit.group(1)}" if hit else f"point never reached (exit status {proc.returncode})"
    if net_state not in (old["net.safetensors"], ref["new"].get("net.safetensors")):
        state = "vanished" if net_state is None else "neither the old nor the new file"
        return _row(
            case, "partial file / data loss", f"after SIGKILL net.safetensors is {state} ({where})", {}
        )
    res = _run(argv, d, env, 300)
    post = snapshot(d)
    if verbose:
        print(
            f"--- {case.name}: {where}; after kill left {left_kill}; rerun rc {res['rc']}\n"
            f"{res['stderr'][-2000:]}"
        )
    if res["rc"] != 0 or res["hang"]:
        outcome, detail = classify(case, res, d, [])
        return _row(case, outcome, f"rerun after SIGKILL: {detail}", res)
    survivors = sorted(r for r in post if r not in old and not _match(r, case.creates))
    state = "old" if net_state == old["net.safetensors"] else "new"
    left = f"left {left_kill}" if left_kill else "nothing else left"
    kill_note = f"{where}; after the kill net.safetensors was the {state} file{pair}, {left}"
    if survivors:
        tops = [r for r in survivors if not any(r.startswith(o + "/") for o in survivors if o != r)]
        return _row(
            case, "partial file / data loss", f"{kill_note}; still there after the rerun: {tops}", res
        )
    return _row(case, "loaded", f"{kill_note}; nothing left after the rerun", res)


def run_revision(src: Path, label: str, selected: list[Case], jobs: int, verbose: bool) -> dict:
    """Set up and run every selected case against the rmtprune in ``src``."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rmtprune-secmatrix-") as tmp:
        root = Path(tmp)
        (root / "_cache").mkdir()
        env = _env(src, root, {}, root)
        r = subprocess.run(
            [sys.executable, "-P", str(Path(__file__).resolve()), "--_setup", str(root)]
            + [c.name for c in selected],
            env=env,
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise SystemExit(f"setup failed for {label}:\n{r.stdout}\n{r.stderr}")
        where = next(x.split(" ", 1)[1] for x in r.stdout.splitlines() if x.startswith("RMTPRUNE_FILE "))
        if not Path(where).resolve().is_relative_to(src.resolve()):
            raise SystemExit(f"{label}: imported rmtprune from {where}, not from {src}")
        print(f"[{label}] rmtprune from {where}", flush=True)
        serial = [c for c in selected if c.special]
        parallel = [c for c in selected if not c.special]
        rows: dict[str, dict] = {}

        def one(c: Case) -> None:
            row = run_case(c, src, root, verbose)
            rows[c.name] = row
            print(
                f"[{label}] {c.group:22s} {c.name:42s} {row['outcome']:24s} {row['detail'][:90]}", flush=True
            )

        with cf.ThreadPoolExecutor(max(1, jobs)) as pool:
            list(pool.map(one, parallel))
        for c in serial:
            one(c)
    return {
        "label": label,
        "src": str(src),
        "seconds": time.perf_counter() - t0,
        "rows": [rows[c.name] for c in selected],
    }


# ------------------------------------------------------------------------------------------ reports


def counts(result: dict) -> dict[str, Counter]:
    out: dict[str, Counter] = {}
    for row in result["rows"]:
        out.setdefault(row["group"], Counter())[row["outcome"]] += 1
    return out


def summary_table(runs: list[dict]) -> list[str]:
    cols = [o for o in OUTCOMES if any(counts(r)[g][o] for r in runs for g in counts(r))]
    cols = cols or list(OUTCOMES)
    lines = [
        "| group | inputs | " + " | ".join(cols) + " |",
        "|---|---:|" + "---:|" * len(cols),
    ]
    groups = list(dict.fromkeys(row["group"] for row in runs[0]["rows"]))
    tot = [Counter() for _ in runs]
    for g in groups:
        cs = [counts(r).get(g, Counter()) for r in runs]
        for t, c in zip(tot, cs, strict=True):
            t.update(c)
        n = sum(cs[0].values())
        cells = [" / ".join(str(c[o]) for c in cs) for o in cols]
        lines.append(f"| {g} | {n} | " + " | ".join(cells) + " |")
    n = sum(tot[0].values())
    lines.append(
        f"| **all** | **{n}** | "
        + " | ".join("**" + " / ".join(str(t[o]) for t in tot) + "**" for o in cols)
        + " |"
    )
    return lines


def _cell(s: str, n: int = 300) -> str:
    s = s.replace("|", "\\|").replace("`", "'").replace("\n", " ")
    return s if len(s) <= n else s[: n - 3] + "..."


def case_table(runs: list[dict]) -> list[str]:
    heads = " | ".join(f"{r['label']}" for r in runs)
    lines = [f"| group | case | command | {heads} |", "|---|---|---|" + "---|" * len(runs)]
    for i, row in enumerate(runs[0]["rows"]):
        cells = []
        for r in runs:
            x = r["rows"][i]
            o = x["outcome"]
            o = f"**{o}**" if o not in ("clean error", "loaded") else o
            cells.append(o + (f": {_cell(x['detail'])}" if x["detail"] else ""))
        cmd = row["command"] if row["command"] else row["what"]
        if row["what"] and row["command"] != row["what"]:
            cmd += f"  ({row['what']})"
        lines.append(f"| {row['group']} | {row['case']} | `{_cell(cmd, 220)}` | " + " | ".join(cells) + " |")
    return lines


def bad_after(run: dict) -> list[str]:
    out = []
    for row in run["rows"]:
        if row["outcome"] in ("clean error", "loaded"):
            continue
        out += [
            f"### {row['case']} ({row['group']}): {row['outcome']}",
            "",
            f"- command: `{row['command']}`"
            + (f" ({row['what']})" if row["what"] and row["what"] != row["command"] else ""),
            f"- exit status: {row['rc']}; {row['detail']}",
            "",
            "```",
            row["stderr"].strip()[-1500:] or "(no stderr)",
            "```",
            "",
        ]
    return out or ["None: every case after the fix is a clean error or loaded."]


def unexpected_errors(run: dict, selected: list[Case]) -> list[str]:
    by = {c.name: c for c in selected}
    return [
        f"- {r['case']}: {r['detail']}"
        for r in run["rows"]
        if by[r["case"]].expect == "ok" and r["outcome"] == "clean error"
    ]


def print_console(runs: list[dict]) -> None:
    for r in runs:
        print(f"\n== {r['label']} ({r['seconds']:.0f} s)")
        for row in r["rows"]:
            print(f"{row['group']:24s} {row['case']:42s} {row['outcome']}")
    if len(runs) > 1:
        print("\nside by side:")
        for i, row in enumerate(runs[0]["rows"]):
            print(
                f"{row['group']:24s} {row['case']:42s} "
                + "  ->  ".join(SHORT.get(r["rows"][i]["outcome"], r["rows"][i]["outcome"]) for r in runs)
            )
    print(
        "\nsummary (outcome counts per group"
        + (", " + " / ".join(r["label"] for r in runs) if len(runs) > 1 else "")
        + "):"
    )
    print("\n".join(summary_table(runs)))


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


@contextlib.contextmanager
def worktree(rev: str):
    tmp = Path(tempfile.mkdtemp(prefix="rmtprune-secmatrix-tree-"))
    tree = tmp / "tree"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev],
        check=True,
        capture_output=True,
    )
    try:
        yield tree
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True
        )
        shutil.rmtree(tmp, ignore_errors=True)


def write_report(
    path: Path,
    runs: list[dict],
    rev: str,
    head: str,
    dirty: bool,
    selected: list[Case],
    cmd: str,
    total: float,
) -> None:
    sys.path.insert(0, str(HERE))
    from _env import git_revision, machine_line

    before, after = runs
    lines = [
        "# Security matrix (issue 10): before and after",
        "",
        f"- Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        machine_line(),
        f"- revision: {git_revision()}",
        f"- Revisions: before = `{rev}`, after = `{head}`"
        + (" plus uncommitted changes in src/" if dirty else ""),
        f"- Command: `{cmd}` (total {total:.0f} s: before {before['seconds']:.0f} s, "
        f"after {after['seconds']:.0f} s)",
        f"- Inputs: {len(selected)} cases, every item of issue 10 that can be reproduced on this machine, "
        "plus a few controls that must keep working. Each runs in a fresh temporary directory as a "
        "subprocess with `PYTHONPATH=<tree>/src` (the old revision from a temporary git worktree): "
        "`python -P -m rmtprune.cli ...` for CLI cases (the current directory is not on `sys.path`, as for "
        "the `rmtprune` console script), `python -P CASE.py` (a script outside the case directory) for "
        f"Python-API cases; stdin closed, {TIMEOUT_S} s timeout, {CAP_BYTES // 2**30} GiB address-space "
        "cap (`RLIMIT_AS`), `RMTPRUNE_DATA=/work/shared/data`, downloads pointed at a refused "
        "`127.0.0.1` port. Files a stranger could send are the same bytes for both revisions; the "
        "legitimate models are written by each revision's own `rmtprune.save`. Malicious files are "
        "run without `--trust-factory` / `trust_factory=True`.",
        "- Outcomes (first match wins): *code executed* (the marker file of the factory/module exists, "
        "or the `input()`/pdb prompt was reached: `EOFError`/`BdbQuit` with stdin closed); *partial file "
        "/ data loss* (a file that existed changed or vanished, except OUT when the command succeeds; "
        "anything new left after a failure: temp files, `OUT.json` without OUT, a created tree; a "
        "temp file that survives the next run after a SIGKILL; a model that silently lost a layer's "
        "parametrization); *huge allocation* (`MemoryError`/`can't allocate memory` under the cap; "
        "checked before *crash*, since such a failure also prints a traceback); *hang*; *crash* (a "
        "traceback, an exit status other than 0/1/2/130, an error message that is not one line, "
        "an API exception that is not an `RmtpruneError`); *silently accepted* (exit 0 on input that "
        "must be refused); *clean error* (exit 2 and exactly one stderr line `rmtprune[ CMD]: error: "
        "...`, 130 and one line for Ctrl-C, or an `RmtpruneError` from the API); *loaded* (success "
        "where success is correct).",
        "- Note: an argparse rejection in the old revision (`--seed 1e20`) printed the usage block "
        "plus the error, exit 2: by the rule above (not one line) it counts as *crash*.",
        "",
        "## Summary: outcome counts per group, before / after",
        "",
        f"Each cell is `{rev}` / `{head}`; columns with no case in either run are omitted.",
        "",
        *summary_table(runs),
        "",
        "## Every case, before and after",
        "",
        *case_table(runs),
        "",
        f"## After (`{head}`): cases that are not a clean error or loaded",
        "",
        *bad_after(after),
        "",
    ]
    unexpected = unexpected_errors(after, selected)
    lines += [
        "## After: controls refused",
        "",
        *(unexpected or ["None: every control that must succeed succeeded."]),
        "",
        "## Rerun",
        "",
        "```",
        cmd,
        "python benchmarks/security_matrix.py --case NAME -v   # one case against this tree, with its output",
        "```",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", help="git revision to test (temporary worktree); default: this working tree")
    ap.add_argument("--compare", metavar="REV", help="run REV and this working tree; write --out")
    ap.add_argument("--out", default=str(HERE / "results" / "security_matrix.md"))
    ap.add_argument("--case", action="append", help="only cases whose name contains this (repeatable)")
    ap.add_argument(
        "--jobs", type=int, default=2, help="cases run at once (default 2; kill/tmpfs cases run alone)"
    )
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each case's output")
    ap.add_argument("--_setup", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args._setup:
        setup_main(Path(args._setup), rest)
        return
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    selected = [c for c in cases() if not args.case or any(s in c.name for s in args.case)]
    if args.list:
        for c in selected:
            print(f"{c.group:24s} {c.name:42s} {c.command()}")
        return
    if not selected:
        raise SystemExit("no case matches")
    t0 = time.perf_counter()
    if args.compare:
        rev = _git("rev-parse", "--short", args.compare)
        head = _git("rev-parse", "--short", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--", "src"))
        with worktree(rev) as tree:
            before = run_revision(tree / "src", f"before {rev}", selected, args.jobs, args.verbose)
        after = run_revision(
            REPO / "src", f"after {head}" + ("+" if dirty else ""), selected, args.jobs, args.verbose
        )
        before["label"], after["label"] = f"before `{rev}`", f"after `{head}`"
        runs = [before, after]
        print_console(runs)
        cmd = f"python benchmarks/security_matrix.py --compare {args.compare}"
        if args.case:
            cmd += "".join(f" --case {c}" for c in args.case)
        write_report(Path(args.out), runs, rev, head, dirty, selected, cmd, time.perf_counter() - t0)
        return
    if args.rev:
        rev = _git("rev-parse", "--short", args.rev)
        with worktree(rev) as tree:
            runs = [run_revision(tree / "src", rev, selected, args.jobs, args.verbose)]
    else:
        runs = [run_revision(REPO / "src", "working tree", selected, args.jobs, args.verbose)]
    print_console(runs)
    if runs[0]["rows"]:
        print("\nnot a clean error or loaded:")
        print("\n".join(bad_after(runs[0])))


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
