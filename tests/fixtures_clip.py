"""A tiny random CLIP saved as a local folder, for tests that must not download anything.

``make_tiny_clip(folder)`` writes config + safetensors weights (CLIPModel from a small
CLIPConfig), a byte-level CLIPTokenizer whose vocabulary is just the 256 byte symbols
(every word is spelt out letter by letter; no merges), and a CLIPImageProcessor at 32 px.
Loading it takes well under a second; its features are random but deterministic.
"""
from __future__ import annotations

from pathlib import Path

TINY_IMAGE_SIZE = 32


def tiny_vocab() -> dict[str, int]:
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in alphabet:  # a symbol inside a word
        vocab[symbol] = len(vocab)
    for symbol in alphabet:  # a symbol that ends a word
        vocab[symbol + "</w>"] = len(vocab)
    return vocab


def make_tiny_clip(folder: str | Path, seed: int = 0, projection_dim: int = 16) -> Path:
    """Write a tiny random CLIP (model + processor) to ``folder`` and return it."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=40, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=TINY_IMAGE_SIZE, patch_size=8,
        ),
        projection_dim=projection_dim,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = CLIPModel(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    )
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
