"""A tiny random-weight Llama chat model, built in seconds with no download.

Real vLLM needs a real model folder: a config, safetensors weights, a tokenizer and a chat
template. This builds one small enough to load on a CPU in seconds (hidden 128, 2 layers,
head_dim 64 as vLLM's CPU attention wants, a byte-level BPE tokenizer trained here on a few
lines of text), so tests and benchmarks can drive the real `vllm` backend anywhere. Its answers
are random tokens: it shows the plumbing, never quality.

Needs `transformers`, `tokenizers` and `torch` (all installed with vllm); imported on use.
`tiny_model()` builds once per folder and version, atomically, so concurrent callers share it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["TINY_MODEL_VERSION", "build_tiny_model", "tiny_model"]

TINY_MODEL_VERSION = 1
"""Bumped whenever the built folder changes, so a cached copy of an older build is not used."""

_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Enough text for the byte-level BPE to learn common English pieces and the judge's layout.
_CORPUS = [
    "Write one sentence about the number seven. The quick brown fox jumps over the lazy dog.",
    "#### Output for Text 1\nRating: 4\nRationale: The text is clear, correct and complete.",
    "#### Output for Text 2\nType: 1, 2\nRationale: It answers the question.\nRating: 3",
    "Instruction: Explain why the sky is blue.\n\nTexts:\n<text 1> Rayleigh scattering.",
    "Helpfulness, honesty, instruction following and truthfulness are rated from 1 to 5.",
    "Question 12? Answer: the capital of France is Paris, a city on the river Seine.",
]


def build_tiny_model(path: Path, *, seed: int = 0) -> Path:
    """Write the model folder to `path` (created; must not exist or be empty) and return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS * 8, trainer=trainer)
    tokenizer: Any = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    vocab = len(tokenizer)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model: Any = LlamaForCausalLM(config).to(torch.bfloat16)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").write_text(_CHAT_TEMPLATE)
    return path


def tiny_model(cache_dir: Path | None = None) -> Path:
    """The model folder under `cache_dir` (default: a folder in the system temp dir), built
    on first use. A half-built folder is never seen: it is built aside and renamed in place."""
    root = cache_dir or Path(tempfile.gettempdir()) / f"streamfeedback-{os.getuid()}"
    target = root / f"tiny-llama-v{TINY_MODEL_VERSION}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=root))
    try:
        build_tiny_model(staging / "model")
        with contextlib.suppress(OSError):  # another process won the race: use its copy
            os.rename(staging / "model", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
