"""Word-level tokenizer of the micro-world, built with `tokenizers` and saved as tokenizer.json."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .world import IMAGE_TOKEN, all_words

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIALS = (PAD, UNK, BOS, EOS, IMAGE_TOKEN)


def build_tokenizer():
    """A `PreTrainedTokenizerFast`: whitespace split, one id per word, `<s>` prepended, left padding."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in all_words():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )
    return fast


def save_tokenizer(out: Path):
    tok = build_tokenizer()
    tok.save_pretrained(str(out))
    return tok
