"""Tiny models and a byte-level tokenizer, so every training and serving path runs on CPU without a hub.

The tokenizer is a real Hugging Face fast tokenizer (a byte-level BPE with no merges), so it saves and
loads with `AutoTokenizer` like any other, and a model exported with it is a normal Hugging Face directory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
BYTE_VOCAB_SIZE = 256
VOCAB_SIZE = BYTE_VOCAB_SIZE + len(SPECIAL_TOKENS)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)


def _byte_level_chars() -> dict[int, str]:
    """The printable stand-in character ByteLevel pre-tokenization uses for each byte (GPT-2's table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer() -> Any:
    """A byte-level tokenizer: every UTF-8 byte is one token, plus bos/eos/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_to_char = _byte_level_chars()
    # ids equal byte values, so token ids are stable and human-checkable
    assert set(pre_tokenizers.ByteLevel.alphabet()) == set(byte_to_char.values())
    vocab = {byte_to_char[b]: b for b in range(BYTE_VOCAB_SIZE)}
    for i, tok in enumerate(SPECIAL_TOKENS):
        vocab[tok] = BYTE_VOCAB_SIZE + i
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=1 << 20
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama_config(**overrides: Any) -> dict[str, Any]:
    """A Llama architecture small enough to train in seconds on one CPU core."""
    cfg: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": BYTE_VOCAB_SIZE,
        "eos_token_id": BYTE_VOCAB_SIZE + 1,
        "pad_token_id": BYTE_VOCAB_SIZE + 2,
    }
    cfg.update(overrides)
    return cfg


# model.tokenizer.builtin -> factory (the API's Literal lists the same names)
BUILTIN_TOKENIZERS: dict[str, Callable[[], Any]] = {"byte": byte_tokenizer}


def build_model(config: dict[str, Any], seed: int = 0) -> Any:
    """A randomly initialised causal LM from a Hugging Face config dict."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    model_type = cfg.pop("model_type")
    cfg.pop("architectures", None)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))


def save_tiny_model(path: str | Path, seed: int = 0, **config_overrides: Any) -> Path:
    """Write a random tiny Llama plus the byte tokenizer as a Hugging Face directory."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(tiny_llama_config(**config_overrides), seed=seed)
    model.save_pretrained(out, safe_serialization=True)
    byte_tokenizer().save_pretrained(out)
    return out
