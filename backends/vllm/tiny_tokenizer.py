"""A tiny model folder with a made-up tokenizer, so vLLM serves text and chat to the tiny Llama."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from backends.vllm.engine_args import TINY_MODEL_DIR

#: Special tokens at the Llama ids: <unk> 0, <s> 1 (bos), </s> 2 (eos).
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
#: One line per message, then the assistant's turn when a reply is asked for.
CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def byte_chars() -> list[str]:
    """The byte-level alphabet in byte order: byte ``b`` is the character at index ``b``."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """Byte-level BPE with no merges: the special tokens, the 256 byte tokens (id 3 + byte),
    then filler words (" w259", " w260", ...) up to ``vocab_size``, so every id decodes."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in byte_chars():
        vocab[char] = len(vocab)
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size={vocab_size} is below the {len(vocab)} base tokens")
    while len(vocab) < vocab_size:
        vocab[f"\u0120w{len(vocab)}"] = len(vocab)  # \u0120 is the byte-level space
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    return tokenizer


def write_tiny_model(dest: Path, model_dir: Path = TINY_MODEL_DIR) -> Path:
    """Make ``dest`` a model folder: ``model_dir``'s config.json plus tokenizer.json and a
    tokenizer_config.json with a chat template. Returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_dir / "config.json", dest / "config.json")
    config = json.loads((model_dir / "config.json").read_text())
    build_tokenizer(int(config["vocab_size"])).save(str(dest / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": int(config["max_position_embeddings"]),
        "chat_template": CHAT_TEMPLATE,
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return dest
