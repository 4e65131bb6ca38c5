"""Hugging Face ``transformers`` models in and out: read a model directory, write a compressed one.

A Hugging Face model directory (``config.json`` plus ``model.safetensors`` or a sharded
``model.safetensors.index.json`` set) is read by :func:`load_pretrained`: the architecture comes
from ``config.json`` through ``AutoConfig`` and the class its ``architectures`` names (looked up in
``transformers`` by name, never ``trust_remote_code``), the weights through transformers' own
loader with ``use_safetensors=True`` (no pickle is ever opened). A directory whose weights lack a
tensor the architecture needs is refused: transformers would initialise it at random.

:func:`save_pretrained` writes a compressed model to a directory that **transformers alone must not
load**, because its factored and sparse layers are not the architecture ``config.json`` describes:

- ``rmtprune.safetensors`` and ``rmtprune.json``: the weights and manifest of :func:`rmtprune.save`,
  the manifest recording the transformers class (``hf.class``), never a Python factory;
- ``config.json``: the model's config with ``transformers_weights`` set to a sentence saying how to
  load the directory, so ``AutoModel.from_pretrained(DIR)`` stops with that sentence instead of
  loading random layers;
- the tokenizer, generation and sentence-transformers files of the source directory, copied along,
  and ``RMTPRUNE.md``, a note on what the directory holds.

``rmtprune.load(DIR)`` (:func:`load`) reads it back into a working transformers model whose outputs
equal the compressed model's before saving. ``transformers`` is the optional extra
``rmtprune[hf]``; nothing here imports it before it is needed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._atomic import atomic_dir
from ._hf_guard import guard_save_pretrained, is_transformers_model
from .errors import CheckpointError, RmtpruneError
from .io import _check_storage, write_model
from .io import load as load_file
from .manifest import FORMAT, LEGACY_FORMATS, factored_layers, read_manifest
from .zoo.files import sha256_file

__all__ = [
    "WEIGHTS_NAME",
    "MANIFEST_NAME",
    "NOTE_NAME",
    "is_compressed_dir",
    "is_hf_model",
    "load_pretrained",
    "from_pretrained",
    "save_pretrained",
    "load",
    "save",
    "check_out_dir",
]

#: The compressed model's weights and manifest inside an output directory.
WEIGHTS_NAME = "rmtprune.safetensors"
MANIFEST_NAME = "rmtprune.json"
#: A note for people who open the directory.
NOTE_NAME = "RMTPRUNE.md"
#: What ``config.json`` of a compressed directory says to transformers (its error message).
LOAD_HINT = (
    "rmtprune: this directory holds a model compressed by rmtprune (factored or sparse layers that "
    "this config does not describe); transformers cannot load it by itself, load it with "
    "rmtprune.load(DIR) (pip install 'rmtprune[hf]')"
)
#: Files of a source directory never copied: weights (the compressed ones replace them) and ours.
_WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".pkl",
    ".pickle", ".npz", ".npy", ".ot", ".tflite", ".joblib", ".index.json",
)  # fmt: skip
#: The commands' reports inside an output directory (written after the manifest, so not in its record).
REPORTS = ("report.json", "report.md")
_OURS = {WEIGHTS_NAME, MANIFEST_NAME, NOTE_NAME, "config.json", *REPORTS}
_MAX_COPY_BYTES = 256 << 20  # a tokenizer.json is tens of MB at most
_MAX_COPY_FILES = 1000
_MAX_CONFIG_BYTES = 4 << 20
#: A plain directory's architecture may be at most this many times its weight files (float32 of a
#: bfloat16 checkpoint is 2x), and always up to 1 GB: a crafted config asking for 100 GB is refused.
_MAX_EXPANSION = 8


def transformers_module() -> Any:
    """``transformers``, or a one-line error saying which extra installs it."""
    try:
        import transformers
    except ImportError:
        raise RmtpruneError(
            "Hugging Face model directories need transformers: pip install 'rmtprune[hf]'"
        ) from None
    return transformers


def is_compressed_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory written by :func:`save_pretrained`."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / WEIGHTS_NAME).is_file()


#: Whether a model is a transformers ``PreTrainedModel`` (checked without importing transformers).
is_hf_model = is_transformers_model


# ---------------------------------------------------------------------- reading
def _read_config(d: Path) -> dict[str, Any]:
    path = d / "config.json"
    if path.stat().st_size > _MAX_CONFIG_BYTES:
        raise CheckpointError(
            f"{str(path)!r} is larger than {_MAX_CONFIG_BYTES >> 20} MB: not a model config"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        why = f"{type(exc).__name__}: {_line(exc)}"
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({why})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise CheckpointError(f"{str(path)!r} has no model_type: not a transformers model config")
    if raw.get("auto_map"):
        raise CheckpointError(
            f"{str(path)!r} asks for custom code (auto_map); rmtprune never runs a model's own code "
            "(trust_remote_code): build the model yourself and pass it to rmtprune in Python"
        )
    return raw


def _auto_config(d: Path) -> Any:
    tf = transformers_module()
    try:
        config = tf.AutoConfig.from_pretrained(str(d), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers and huggingface_hub raise their own types (StrictDataclassError)
        raise CheckpointError(f"{str(d / 'config.json')!r}: {type(exc).__name__}: {_line(exc)}") from None
    if hasattr(config, "transformers_weights"):  # our own directory's hint to transformers
        del config.transformers_weights
    return config


def _model_class_names() -> set[str]:
    """Names of the concrete model classes transformers' auto mappings know (``BertModel``,
    ``LlamaForCausalLM``, ...): a config or manifest may name one of these, never a base class, a
    tokenizer, a pipeline or a module path."""
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for attr, value in vars(modeling_auto).items():
        if attr.endswith("_MAPPING_NAMES") and isinstance(value, dict):
            for v in value.values():
                names.update([v] if isinstance(v, str) else [x for x in v if isinstance(x, str)])
    return names


def _resolve_class(names: list[str], config: Any, where: str) -> type:
    """The transformers model class: the first of ``names`` that is a concrete transformers model
    class taking this config, else the ``AutoModel`` class of the config. Only names, never paths."""
    tf = transformers_module()
    known = _model_class_names()
    for name in names:
        if name not in known:
            continue
        try:
            cls = getattr(tf, name)
        except (AttributeError, ImportError, RuntimeError):
            continue
        config_class = getattr(cls, "config_class", None)
        if (
            isinstance(cls, type)
            and issubclass(cls, tf.PreTrainedModel)
            and cls.__module__.startswith("transformers.")
            and isinstance(config_class, type)
            and isinstance(config, config_class)
        ):
            return cls
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        return MODEL_MAPPING[type(config)]
    except KeyError:
        raise CheckpointError(
            f"{where}: no transformers model class for model_type {config.model_type!r} "
            f"(architectures {names or 'not given'})"
        ) from None


def _build(cls: type, config: Any, dtype: torch.dtype | None) -> nn.Module:
    """The architecture from its config (random weights); the model's own checks of the config
    (zero heads, negative sizes) become one :class:`CheckpointError`."""
    try:
        model = cls._from_config(config)  # type: ignore[attr-defined]
    except Exception as exc:  # the model's own code validates its config with any exception type
        raise CheckpointError(
            f"config.json does not build a {cls.__name__}: {type(exc).__name__}: {_line(exc)}"
        ) from None
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "")[:300]


def _weight_files(d: Path) -> list[Path]:
    single = d / "model.safetensors"
    if single.is_file():
        return [single]
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            shards = sorted(set(data["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{str(index)!r} is not a safetensors index ({exc})") from None
        bad = [s for s in shards if not isinstance(s, str) or Path(s).name != s or not (d / s).is_file()]
        if bad:
            raise CheckpointError(
                f"{str(index)!r} names the shard {bad[0]!r}, which is not a file in {str(d)!r}"
            )
        return [d / s for s in shards]
    pickled = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json") if (d / n).is_file()]
    if pickled:
        raise CheckpointError(
            f"{str(d)!r} holds only pickled weights ({pickled[0]}); rmtprune never unpickles a model "
            "directory: convert it to safetensors first"
        )
    raise CheckpointError(f"{str(d)!r} has no model.safetensors (or model.safetensors.index.json)")


#: Config keys giving a number of layers: each layer holds at least one tensor of the files.
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers")


def _check_headers(raw: dict[str, Any], files: list[Path], where: str) -> int:
    """Read every weight file's header (one-line error on a corrupt one) and refuse a config whose
    layer count exceeds the files' tensor count, before anything is built: a crafted
    ``num_hidden_layers: 1000000`` would otherwise take hours to build. Returns the tensor count."""
    from .manifest import read_header

    n = sum(len(read_header(f)[1]) for f in files)
    for key in _LAYER_KEYS:
        v = raw.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > n:
            raise CheckpointError(
                f"{where}: config.json has {key}={v} but the weight files hold {n} tensors; "
                "refused as inconsistent"
            )
    return n


def _load_plain(d: Path, model_class: str | None, dtype: torch.dtype | None) -> nn.Module:
    raw = _read_config(d)
    files = _weight_files(d)
    _check_headers(raw, files, repr(str(d)))
    config = _auto_config(d)
    archs = [a for a in raw.get("architectures") or [] if isinstance(a, str)]
    names = [model_class] if model_class else archs
    cls = _resolve_class(names, config, str(d))
    if model_class and cls.__name__ != model_class:
        raise CheckpointError(f"model class {model_class!r} is not a transformers model for {str(d)!r}")
    with torch.device("meta"):
        skeleton = _build(cls, config, dtype)
    dense = sum(p.numel() * p.element_size() for p in skeleton.parameters())
    size = sum(f.stat().st_size for f in files)
    del skeleton
    if dense > max(1 << 30, _MAX_EXPANSION * size):
        raise CheckpointError(
            f"{str(d)!r}: config.json describes {dense / 1e9:.1f} GB of parameters but the weight files "
            f"hold {size / 1e9:.3f} GB; refused as inconsistent"
        )
    tf = transformers_module()
    kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    verbosity = tf.logging.get_verbosity()
    tf.logging.set_verbosity_error()  # the loading report is checked below, not printed
    try:
        model, info = cls.from_pretrained(  # type: ignore[attr-defined]
            str(d),
            config=config,
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
            output_loading_info=True,
            **kwargs,
        )
    except Exception as exc:  # safetensors, transformers and the model's code raise their own types
        raise CheckpointError(f"{str(d)!r}: {type(exc).__name__}: {_line(exc)}") from None
    finally:
        tf.logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise CheckpointError(
            f"{str(d)!r}: the weights lack {len(missing)} tensor(s) that {cls.__name__} needs (first: "
            f"{missing[0]!r}); transformers would initialise them at random"
        )
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or ())
    if mismatched:
        raise CheckpointError(f"{str(d)!r}: tensor {mismatched[0]!r} has another shape than {cls.__name__}'s")
    from .io import non_persistent_buffers

    unexpected = sorted(set(info.get("unexpected_keys") or ()) - non_persistent_buffers(model))
    if unexpected:
        raise CheckpointError(
            f"{str(d)!r}: the weights hold {len(unexpected)} tensor(s) that {cls.__name__} does not have "
            f"(first: {unexpected[0]!r}); transformers would drop them, so the model would not be the file's"
        )
    return model.eval()


_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def _dtype(name: Any, where: str) -> torch.dtype:
    if not isinstance(name, str) or name not in _DTYPES:
        raise CheckpointError(f"{where}: manifest hf.dtype={name!r} must be one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _load_compressed(d: Path, dtype: torch.dtype | None) -> nn.Module:
    path = d / WEIGHTS_NAME
    manifest = read_manifest(path)
    where = f"{str(d)!r}"
    if manifest is None or not isinstance(manifest.get("hf"), dict):
        raise CheckpointError(f"{where}: {WEIGHTS_NAME} has no rmtprune manifest with a transformers class")
    if not (d / "config.json").is_file():
        raise CheckpointError(f"{where} has {WEIGHTS_NAME} but no config.json")
    raw = _read_config(d)
    _check_headers(raw, [path], where)
    config = _auto_config(d)
    hf = manifest["hf"]
    cls = _resolve_class([hf["class"]], config, where)
    if cls.__name__ != hf["class"]:
        raise CheckpointError(f"{where}: manifest hf.class {hf['class']!r} is not a transformers model class")
    dtype = dtype if dtype is not None else _dtype(hf.get("dtype", "float32"), where)
    model = load_file(path, build=lambda: _build(cls, config, dtype))
    if manifest.get("layers"):
        guard_save_pretrained(model)
    return model.eval()


def load_pretrained(
    path: str | os.PathLike[str], *, model_class: str | None = None, dtype: torch.dtype | None = None
) -> nn.Module:
    """A transformers model from a directory: a plain Hugging Face one or one :func:`save_pretrained` wrote.

    ``model_class`` names the transformers class to build (default: the config's ``architectures``,
    else the ``AutoModel`` class of its model type); ``dtype`` casts the model (default: the
    checkpoint's). A directory that asks for custom code, holds only pickled weights, or whose
    weights miss a tensor of the architecture is refused with a one-line
    :class:`~rmtprune.errors.CheckpointError`. The model comes back in eval mode.
    """
    d = Path(path).expanduser()
    if not d.is_dir():
        raise CheckpointError(f"{str(path)!r} is not a directory")
    if not (d / "config.json").is_file() and not is_compressed_dir(d):
        raise CheckpointError(f"{str(path)!r} has no config.json: not a Hugging Face model directory")
    transformers_module()
    if is_compressed_dir(d):
        if model_class is not None:
            raise ValueError(
                "model_class goes with plain Hugging Face directories; this one records its class"
            )
        return _load_compressed(d, dtype)
    return _load_plain(d, model_class, dtype)


#: The name transformers users look for.
from_pretrained = load_pretrained


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The tokenizer saved in model directory ``path`` (local files only, never the model's own code).

    Used to turn a calibration text into token windows (``rmtprune compress DIR OUT --calibration
    FILE.txt``). ``ValueError`` naming the directory when it holds no tokenizer transformers can read.
    """
    d = Path(path).expanduser()
    tf = transformers_module()
    try:
        return tf.AutoTokenizer.from_pretrained(str(d), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for a missing tokenizer
        raise ValueError(
            f"model directory {str(d)!r} has no tokenizer transformers can read ({_line(exc)})"
        ) from None


def load(path: str | os.PathLike[str], model: nn.Module | None = None, **kwargs: Any) -> nn.Module:
    """:func:`rmtprune.load`: a directory loads with :func:`load_pretrained`, a file with
    :func:`rmtprune.io.load` (see there for ``model``, ``trust_factory`` and ``factory_args``)."""
    if isinstance(path, (str, os.PathLike)) and Path(path).expanduser().is_dir():
        if model is not None:
            raise ValueError(
                "a model directory builds its own transformers model: call rmtprune.load(DIR) without a model"
            )
        return load_pretrained(path, **kwargs)
    return load_file(path, model, **kwargs)


# ---------------------------------------------------------------------- writing
def _side_files(source: Path | None) -> list[str]:
    """The tokenizer, generation and sentence-transformers files of ``source`` to copy along
    (relative paths): every regular file except weights, index files, dot files and ours."""
    if source is None or not source.is_dir():
        return []
    out: list[str] = []
    for root, dirs, files in os.walk(source, followlinks=False):
        rel_root = Path(root).relative_to(source)
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and len(rel_root.parts) < 3)
        for name in sorted(files):
            rel = (rel_root / name).as_posix()
            p = Path(root) / name
            if name.startswith(".") or p.is_symlink() or not p.is_file():
                continue
            if rel in _OURS or name.endswith(_WEIGHT_SUFFIXES) or p.stat().st_size > _MAX_COPY_BYTES:
                continue
            out.append(rel)
            if len(out) >= _MAX_COPY_FILES:
                return out
    return out


def _ours(d: Path) -> dict[str, str] | None:
    """The files (name -> sha256) a directory written by :func:`save_pretrained` recorded, or None
    if it is not one."""
    try:
        manifest = read_manifest(d / WEIGHTS_NAME) if (d / WEIGHTS_NAME).is_file() else None
    except CheckpointError:
        return None
    if not manifest or manifest.get("format") not in (FORMAT, *LEGACY_FORMATS):
        return None
    files = (manifest.get("hf") or {}).get("files")
    return dict(files) if isinstance(files, dict) else None


def _existing(d: Path) -> list[str]:
    return sorted((Path(root) / n).relative_to(d).as_posix() for root, _, files in os.walk(d) for n in files)


def check_out_dir(
    out: str | os.PathLike[str], *, inputs: list[Path] | None = None, force: bool = False
) -> Path:
    """Check an output directory before any work: its parent exists, it is not a file, it does not
    hold an input, and it is empty, absent, or a directory rmtprune wrote holding nothing else
    (``force`` replaces any directory). Returns the path; raises a one-line error naming the culprit."""
    p = Path(out).expanduser()
    where = f"OUT {str(out)!r}"
    if p.suffix == ".safetensors":
        raise ValueError(f"{where}: a Hugging Face model is written to a directory, not a .safetensors file")
    if not p.parent.is_dir():
        raise CheckpointError(f"{where}: directory {str(p.parent)!r} does not exist")
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        raise CheckpointError(f"{where} exists and is not a directory; choose a directory name")
    resolved = p.resolve()
    for inp in inputs or []:
        r = Path(inp).expanduser().resolve()
        if r != resolved and resolved in r.parents:
            raise CheckpointError(f"{where} contains the input {str(inp)!r}; choose another directory")
        if r != resolved and r in resolved.parents and r.is_dir():
            raise CheckpointError(
                f"{where} is inside the input directory {str(inp)!r} (its next copy would carry it "
                "along); choose a directory outside it"
            )
    if not p.exists() or force:
        return p
    existing = _existing(p)
    if not existing:
        return p
    recorded = _ours(p)
    if recorded is None:
        raise CheckpointError(
            f"{where} exists and was not written by rmtprune (it holds {existing[0]!r}); choose a new "
            "directory, or pass --force (force=True) to replace it"
        )
    # A file is ours when we wrote it with these bytes (its recorded sha256), or is one of our own
    # names (the weights and manifest hold the record; the reports are written after it).
    foreign = [
        f
        for f in existing
        if f not in (WEIGHTS_NAME, MANIFEST_NAME, *REPORTS)
        and (f not in recorded or (p / f).is_symlink() or sha256_file(p / f) != recorded[f])
    ]
    if foreign:
        raise CheckpointError(
            f"{where} holds {foreign[0]!r}, which rmtprune did not write there (or was changed since); "
            "move it, or pass --force (force=True) to replace the directory"
        )
    return p


def _note(model: nn.Module, manifest_layers: int) -> str:
    return (
        "# Compressed by rmtprune\n\n"
        f"This directory holds a `{type(model).__name__}` whose linear layers were compressed by "
        f"rmtprune ({manifest_layers} factored layer(s); sparse layers are stored sparsely).\n"
        "The layers are not the architecture `config.json` describes, so `transformers` alone cannot "
        "load it (its `from_pretrained` stops with a message saying so). Load it with:\n\n"
        "```python\nimport rmtprune\n\nmodel = rmtprune.load(DIR)  # a transformers model\n```\n\n"
        f"`{WEIGHTS_NAME}` holds the weights, `{MANIFEST_NAME}` the manifest (ranks, config, fits); "
        "the tokenizer files are copied from the source directory.\n"
    )


def save_pretrained(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    plan: Any = None,
    source: str | os.PathLike[str] | None = None,
    force: bool = False,
    reports: Callable[[int], dict[str, str]] | None = None,
    storage: str = "auto",
) -> Path:
    """Write a (compressed or not) transformers model to ``out_dir`` for :func:`load` to read back.

    ``plan`` records the compression in the manifest; ``source`` is the Hugging Face directory the
    model came from, whose tokenizer, generation and sentence-transformers files are copied along
    (weights never are). The directory is written under a temporary name and renamed into place
    only when complete; an existing ``out_dir`` is replaced only when it is empty or rmtprune wrote
    it and it holds nothing else (``force`` replaces any). ``reports(size_of_weights)`` gives the
    texts of ``report.json`` / ``report.md`` (the commands' reports), written in the same directory.
    ``storage`` is the sparse format of masked weights (:func:`rmtprune.io.save`). Returns the directory.
    """
    if not is_hf_model(model):
        raise TypeError(
            f"model must be a transformers PreTrainedModel, got {type(model).__name__}; "
            "save other models with rmtprune.save(model, 'model.safetensors')"
        )
    _check_storage(storage)
    src = Path(source).expanduser() if source is not None else None
    out = check_out_dir(out_dir, inputs=[src] if src is not None else [], force=force)
    side = _side_files(src)
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = str(ref.dtype).removeprefix("torch.") if ref is not None else "float32"
    config_text = model.config.to_json_string(use_diff=True)
    config = json.loads(config_text)
    config.pop("quantization_config", None)  # a dequantised GGUF is a plain float model now
    config["transformers_weights"] = LOAD_HINT
    gen = getattr(model, "generation_config", None)
    write_gen = gen is not None and getattr(model, "can_generate", lambda: False)()
    with atomic_dir(out) as tmp:
        for rel in side:
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, dest)  # type: ignore[operator]
        (tmp / "config.json").write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        names = set(side) | {"config.json"}
        if write_gen:
            gen.to_json_file(str(tmp / "generation_config.json"))
            names.add("generation_config.json")
        (tmp / NOTE_NAME).write_text(_note(model, len(factored_layers(model))), encoding="utf-8")
        names.add(NOTE_NAME)
        hf = {
            "class": type(model).__name__,
            "model_type": str(getattr(model.config, "model_type", "")),
            "dtype": dtype,
            "transformers_version": str(transformers_module().__version__),
            "files": {name: sha256_file(tmp / name) for name in sorted(names)},
        }
        write_model(
            model, tmp / WEIGHTS_NAME, tmp / MANIFEST_NAME, plan=plan, extra={"hf": hf}, storage=storage
        )
        if reports is not None:
            for name, text in reports((tmp / WEIGHTS_NAME).stat().st_size).items():
                if name not in REPORTS:
                    raise ValueError(f"reports may write report.json and report.md, not {name!r}")
                (tmp / name).write_text(text, encoding="utf-8")
    return out


def save(model: nn.Module, path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """:func:`rmtprune.save`: a transformers model saved to a directory path (an existing directory,
    or a name without a weights-file suffix) goes to :func:`save_pretrained`; anything else to
    :func:`rmtprune.io.save`."""
    from .io import save as save_file

    if is_hf_model(model) and isinstance(path, (str, os.PathLike)):
        p = Path(path).expanduser()
        if p.is_dir() or p.suffix.lower() not in _FILE_SUFFIXES:
            return save_pretrained(model, path, **kwargs)
    return save_file(model, path, **kwargs)


#: Suffixes that name a file, not a model directory, in :func:`save` (io.save then says which it takes).
_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".json", ".gguf", ".pkl")
