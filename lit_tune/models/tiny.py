"""The built-in ``tiny`` preset: a byte-level tokenizer and a few-million-parameter Llama.

Both are built from code, with no download, so the default config runs on a fresh machine with
no network. The tokenizer maps every UTF-8 byte to one token (no merges), which keeps it
deterministic and lossless on any text at the cost of longer sequences.
"""

from __future__ import annotations

from importlib import resources

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]


def _byte_vocab() -> dict[str, int]:
    # ByteLevel pre-tokenization maps each byte to a printable unicode character; the
    # vocabulary is those 256 characters after the special tokens.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in sorted(alphabet):
        vocab[char] = len(vocab)
    return vocab


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Build the byte-level tokenizer of the ``tiny`` preset, with a chat template.

    Returns:
        A fast tokenizer with ``<s>`` as BOS, ``</s>`` as EOS and ``<pad>`` as padding.
    """
    backend = Tokenizer(models.BPE(vocab=_byte_vocab(), merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        padding_side="right",
    )
    tokenizer.chat_template = default_chat_template()
    return tokenizer


def default_chat_template() -> str:
    """Return the chat template used when a tokenizer has none.

    Each turn is ``<|role|>`` and a newline, then the content; an assistant turn ends with the EOS
    token and any other turn with a newline. The generation prompt is ``<|assistant|>`` and a
    newline. A tokenizer without ``<|role|>`` special tokens encodes those markers as plain text.
    """
    return resources.files("lit_tune.models").joinpath("tiny_chat_template.jinja").read_text()


def tiny_llama_config(vocab_size: int) -> LlamaConfig:
    """Return the ``tiny`` Llama configuration: 4 layers, hidden size 256, about 3.3M parameters.

    Args:
        vocab_size: Rows of the embedding; rounded up to a multiple of 64.
    """
    return LlamaConfig(
        vocab_size=-(-vocab_size // 64) * 64,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
