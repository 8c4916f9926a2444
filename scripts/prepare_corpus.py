#!/usr/bin/env python3
"""Build the King James Bible corpus and its tokenizer that beam's training and demo use.

Input: the text printed by Debian's `bible-kjv` + `bible-kjv-text` packages
(`apt-get install bible-kjv bible-kjv-text`). Output (all deterministic, committed):

  assets/corpus/kjv-train.txt.gz   one verse per line, without verse numbers
  assets/corpus/kjv-valid.txt.gz   held-out verses: every 20th chapter (chapters 19, 39, 59, … in Bible order)
  assets/models/kjv-moe/tokenizer.json  byte-level BPE (vocab 1024) trained on the train split only

Run: python3 scripts/prepare_corpus.py   (needs the `tokenizers` package from PyPI)
"""
import gzip
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "assets", "corpus")
MODEL = os.path.join(ROOT, "assets", "models", "kjv-moe")
VALID_EVERY = 20
VOCAB = 1024


def chapters():
    """Yield (chapter heading, [verse text]) in Bible order."""
    raw = subprocess.run(
        ["bible", "-p", "/usr/lib", "gen1:1-rev22:21"], check=True, capture_output=True, text=True
    ).stdout
    heading, verses = None, []
    for line in raw.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" ") and re.fullmatch(r".+ \d+", line.strip()):
            if heading is not None:
                yield heading, verses
            heading, verses = line.strip(), []
            continue
        m = re.match(r"\s+\d+ (.*)", line)
        if m:
            verses.append(m.group(1).strip())
        else:  # continuation of the previous verse
            verses[-1] += " " + line.strip()
    yield heading, verses


def write_gz(path, lines):
    data = ("\n".join(lines) + "\n").encode("utf-8")
    # mtime=0 and no file name: the same text gives the same bytes.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="", compresslevel=9) as f:
        f.write(data)


def main():
    train, valid = [], []
    n = 0
    for i, (_, verses) in enumerate(chapters()):
        (valid if i % VALID_EVERY == VALID_EVERY - 1 else train).extend(verses)
        n += 1
    assert n == 1189, f"expected 1189 chapters, got {n}"
    os.makedirs(CORPUS, exist_ok=True)
    write_gz(os.path.join(CORPUS, "kjv-train.txt.gz"), train)
    write_gz(os.path.join(CORPUS, "kjv-valid.txt.gz"), valid)
    print(f"{n} chapters: {len(train)} train verses, {len(valid)} validation verses")

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train, trainer=trainer)
    os.makedirs(MODEL, exist_ok=True)
    tok.save(os.path.join(MODEL, "tokenizer.json"))
    ids = tok.encode("\n".join(train)).ids
    print(f"tokenizer: vocab {tok.get_vocab_size()}, {len(ids)} train tokens")


if __name__ == "__main__":
    main()
