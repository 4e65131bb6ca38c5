"""The real-model harness (benchmarks/real_models.py, _real_data.py): the held-out split, the text
extraction, the metrics on tiny random Hugging Face models, and a ``--quick`` run on the real cache
(skipped with the reason when ``benchmarks/fetch_real.sh`` has not been run)."""

from __future__ import annotations

import json
import math
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
    return tmp_path


# ====================================================================== the split
def test_split_is_a_fixed_hash() -> None:
    # Pinned: a changed salt or hash would silently move documents between the splits.
    assert [D.split_of(f"doc:f{i}.rst.txt") for i in (0, 1, 8, 9)] == ["calib", "eval", "eval", "calib"]
    ids = [f"doc:{i}" for i in range(20000)]
    assert [D.split_of(i) for i in ids] == [D.split_of(i) for i in ids]
    share = sum(D.split_of(i) == "eval" for i in ids) / len(ids)
    assert abs(share - D.EVAL_PERCENT / 100) < 0.02


def test_calibration_never_overlaps_evaluation(fake_cache: Path) -> None:
    docs = D.python_docs(fake_cache)
    assert len(docs) == 40
    by_split = {s: {d.id for d in docs if d.split == s} for s in D.SPLITS}
    assert by_split["calib"] and by_split["eval"] and not by_split["calib"] & by_split["eval"]
    # Each document's text lands in its own split only: module numbers never cross.
    nums = {s: {t.split("module number ")[1].split()[0] for t in D.doc_text(s, fake_cache)} for s in D.SPLITS}
    assert not nums["calib"] & nums["eval"] and len(nums["calib"] | nums["eval"]) == 40
    for split in D.SPLITS:
        expect = {d.id.split("mod")[1].split(".")[0] for d in docs if d.split == split}
        assert nums[split] == expect
    pairs = {s: {w for _, w in D.definition_pairs(s, cache=fake_cache)} for s in D.SPLITS}
    assert pairs["calib"] and pairs["eval"] and not pairs["calib"] & pairs["eval"]
    sents = {s: set(D.sentences(s, 20, fake_cache)) for s in D.SPLITS}
    assert not sents["calib"] & sents["eval"]
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
    bench.data.update(sentences=texts, definitions=texts, words=texts)
    emb = R.embed(model, tok, texts, batch=4)
    assert emb.shape == (6, 32) and torch.allclose(emb.norm(dim=1), torch.ones(6), atol=1e-5)
    # Batch order and padding do not change an embedding (masked mean pooling).
    assert torch.allclose(R.embed(model, tok, texts[:1]), emb[:1], atol=1e-5)
    bench.ref["emb"] = emb
    m = R.minilm_metrics(bench, model)
    assert m["cosine"] == pytest.approx(1.0, abs=1e-6) and m["spearman"] == pytest.approx(1.0, abs=1e-9)
    assert m["r1"] == 1.0 and m["r10"] == 1.0
    assert len(R.block_linears(model, "encoder.")) == 12  # 2 blocks x (q, k, v, o, up, down); no pooler
    # A different model is measurably different.
    noisy = type(model)(model.config).eval()
    m2 = R.minilm_metrics(bench, noisy)
    assert m2["cosine"] < 0.999


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
    # The tied LM head is counted once.
    assert R.unique_params(model) == sum(v.numel() for v in model.state_dict().values()) - 50 * 32


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
