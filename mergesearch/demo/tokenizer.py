"""A word-level tokenizer for the demo's symbol sequences, saved as an ordinary Hugging Face tokenizer."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
SYMBOLS = ["=", "+", ":"] + [str(d) for d in range(10)]


def build_tokenizer(task_tokens: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """A whitespace-split word-level tokenizer that prepends ``<bos>`` like Llama's.

    Args:
        task_tokens: extra symbols, one per task (e.g. ``<reverse>``), appended to the vocabulary.

    Returns:
        A fast tokenizer with pad/bos/eos/unk set; ``save_pretrained`` writes it for ``AutoTokenizer``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate([*SPECIAL, *SYMBOLS, *task_tokens])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
