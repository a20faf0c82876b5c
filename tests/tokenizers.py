"""A small real tokenizer built in the test: sentencepiece (one token per character) wrapped for HF."""

from __future__ import annotations

from pathlib import Path

CORPUS = [f"{a}+{b}={a + b}" for a in range(100) for b in range(0, 100, 7)] + [
    "a much longer text with letters x y z", "the answer is #### 72", "\\boxed{1/2}"]


def save_char_tokenizer(folder: str | Path) -> None:
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"),
                                   model_type="char", vocab_size=48, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                                   character_coverage=1.0, minloglevel=2)
    tok = LlamaTokenizer.from_pretrained(str(folder), legacy=False, add_bos_token=True, pad_token="<pad>")
    tok.save_pretrained(str(folder))
