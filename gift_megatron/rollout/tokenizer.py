"""A character-level sentencepiece tokenizer trained on a task's corpus, wrapped for Hugging Face/vLLM.

One token per character (digits split, no merges: a merged '=-' token would cross the prompt/answer
boundary). Saved with `LlamaTokenizer.from_pretrained(folder with tokenizer.model)`: in
transformers 5.x `LlamaTokenizer(vocab_file=...)` silently ignores the file and encodes to [].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

PAD, UNK, BOS, EOS = 0, 1, 2, 3


def train_char_tokenizer(folder: str | Path, corpus: Sequence[str], vocab_size: int | None = None):
    """Train on `corpus` (one text per line), save a HF tokenizer in `folder`, return it.

    vocab_size defaults to the corpus's distinct characters + the 4 special tokens (+1 for the
    sentencepiece word-boundary symbol).
    """
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text("\n".join(corpus))
    chars = {c for line in corpus for c in line if not c.isspace()}
    size = vocab_size or len(chars) + 5
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"),
                                   model_type="char", vocab_size=size, pad_id=PAD, unk_id=UNK, bos_id=BOS,
                                   eos_id=EOS, character_coverage=1.0, minloglevel=2)
    LlamaTokenizer.from_pretrained(str(folder), legacy=False, add_bos_token=True,
                                   pad_token="<pad>").save_pretrained(str(folder))
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert tok.encode(corpus[0], add_special_tokens=False), "the tokenizer encodes to nothing"
    return tok
