"""Tiny randomly initialised causal LMs for tests and benchmarks: milliseconds to build, same code paths."""

from pathlib import Path
from typing import Any

import torch

TINY_ARCHITECTURES = ("llama", "gemma3", "gpt2")
_WORDS = (
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "it",
    "by",
    "at",
    "from",
    "be",
    "this",
    "are",
    "or",
    "his",
    "her",
    "an",
    "which",
    "you",
    "we",
    "they",
    "not",
    "but",
    "have",
    "had",
    "has",
    "one",
    "two",
    "three",
    "dog",
    "cat",
    "house",
    "river",
    "city",
    "old",
    "new",
    "small",
    "large",
    "red",
    "blue",
    "green",
    "said",
    "went",
    "came",
    "saw",
    "made",
    "time",
    "year",
    "day",
    "night",
    "way",
    "people",
    "world",
    "water",
    "light",
    "sound",
)


def tiny_tokenizer() -> Any:
    """Return a word-level fast tokenizer over a small English vocabulary (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<bos>", "<eos>"]
    words = specials + sorted(set(_WORDS)) + [".", ",", "!", "?"]
    vocab = {word: index for index, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


def tiny_config(arch: str, vocab_size: int, n_layers: int = 2, d_model: int = 64) -> Any:
    """Return a small config of the given architecture family."""
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig

    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            pad_token_id=1,
        )
    if arch == "gemma3":
        return Gemma3TextConfig(
            vocab_size=vocab_size,
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=512,
            sliding_window=8,
            pad_token_id=1,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=d_model,
            n_layer=n_layers,
            n_head=4,
            n_positions=512,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=1,
        )
    raise ValueError(f"unknown tiny architecture {arch!r}; use one of {TINY_ARCHITECTURES}")


def save_tiny_model(out_dir: str | Path, arch: str = "llama", n_layers: int = 2, seed: int = 0) -> Path:
    """Build a random tiny causal LM with its tokenizer and save it as an HF directory."""
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), n_layers), dtype=torch.float32)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
