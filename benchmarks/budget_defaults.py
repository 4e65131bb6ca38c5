"""How compress(target=...)'s defaults were chosen: allocation, damping, guard on MiniLM-L6, validation only.

Calibration: 512 sentences of the harness's calibration split (the last 64 held out for the guard).
Score: mean cosine of 400 *validation-split* sentence embeddings to the dense model's (never the
evaluation split). Needs the real-model cache (benchmarks/fetch_real.sh). One JSON line per run (with the
git revision) on stdout and in ``benchmarks/results/budget_defaults_minilm_<grid>.jsonl``.

Run: ``python benchmarks/budget_defaults.py alloc|free|damping|guard [ALLOCS] [TARGETS]``, e.g.
``python benchmarks/budget_defaults.py alloc uniform,rmt,energy,gavish_donoho,spikes 0.8,0.6``.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _real_data as data  # noqa: E402
from _env import git_revision  # noqa: E402

import rmtprune  # noqa: E402
from rmtprune.calibration import collect  # noqa: E402

ALLOCS = ("uniform", "rmt", "energy", "gavish_donoho", "spikes")


def main(argv: list[str]) -> int:
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(1)
    grid = argv[0] if argv else "alloc"
    allocs = argv[1].split(",") if len(argv) > 1 else ALLOCS
    targets = [float(v) for v in argv[2].split(",")] if len(argv) > 2 else [0.8, 0.6]
    path = data.item_path("minilm-l6", None)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")]

    def batch(texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt"))

    @torch.no_grad()
    def embed(m: nn.Module, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), 64):
            enc = batch(texts[i : i + 64])
            h = m(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(out)

    val = data.sentences("validation", 400, None)
    calib = data.sentences("calib", 512, None)
    ref = embed(model, val)
    cal = collect(
        model, [batch(calib[i : i + 32]) for i in range(0, len(calib), 32)], layers=layers, held_out=0.125
    )
    rows: list[dict[str, Any]] = []
    revision = git_revision()  # every row names the code it ran on

    def run(**kw: Any) -> None:
        m = copy.deepcopy(model)
        t = time.time()
        _, p = rmtprune.compress(m, include=layers, **kw)
        cos = float((embed(m, val) * ref).sum(1).mean())
        r = {k: v for k, v in kw.items() if k != "calibration"}
        r.update(whiten=kw.get("calibration") is not None, cos=round(cos, 4), kept=round(p.budget["kept"], 4))
        r.update(sec=round(time.time() - t, 1), guard_changes=len(p.budget["guard_changes"]))
        r.update(revision=revision)
        print(json.dumps(r), flush=True)
        rows.append(r)

    for target in targets:
        if grid == "alloc":
            for alloc in allocs:
                run(target=target, allocation=alloc, calibration=cal, guard=None)
        elif grid == "free":
            for alloc in allocs:
                run(target=target, allocation=alloc)
        elif grid == "damping":
            for d in (1e-4, 1e-3, 1e-2, 1e-1):
                for alloc in allocs:
                    run(target=target, allocation=alloc, calibration=cal, damping=d, guard=None)
        elif grid == "guard":
            for g in (None, 0.1, 0.2, 0.3, 0.5):
                run(target=target, allocation="rmt", calibration=cal, guard=g)
        else:
            raise SystemExit(f"unknown grid {grid!r}: alloc, free, damping or guard")
    out = Path(__file__).resolve().parent / "results" / f"budget_defaults_minilm_{grid}.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
