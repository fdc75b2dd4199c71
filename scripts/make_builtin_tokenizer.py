"""Writes engines/assets/builtin_bpe1024/: the SentencePiece BPE vocabulary of the built-in
random-weight models (1024 pieces over Latin and Devanagari text, so Unicode flows end to end).

Deterministic: rerun it and the model file is the same. Usage: python scripts/make_builtin_tokenizer.py
"""
import os
import random
import tempfile

import sentencepiece as spm

OUT = os.path.join(os.path.dirname(__file__), "..", "engines", "assets", "builtin_bpe1024")

LATIN_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one "
    "had by word but not what all were we when your can said there use an each which she do how their "
    "if will up other about out many then them these so some her would make like him into time has look "
    "two more write go see number no way could people my than first water been call who oil its now find "
    "long down day did get come made may part hello world call agent voice stream speech model number "
    "zero three four five six seven eight nine ten hundred thousand monday tuesday friday january march"
).split()
# Common Hindi words (Devanagari), so the vocabulary holds real Hindi pieces as well as letters.
HINDI_WORDS = (
    "है के में की और को से का एक यह पर भी नहीं तो हैं था कर लिए जो ही गया हो रहा कि वह किया करने "
    "साथ अपने कुछ सकता बात दिन समय लोग आप हम मैं नमस्ते धन्यवाद शून्य दो तीन चार पांच छह सात आठ नौ दस "
    "सोमवार मंगलवार जनवरी फरवरी पानी घर काम नाम देश भारत दिल्ली मुंबई आज कल बहुत अच्छा"
).split()
LATIN = "abcdefghijklmnopqrstuvwxyz'"
DEVANAGARI = "".join(chr(c) for c in range(0x0905, 0x0915)) + "".join(chr(c) for c in range(0x0915, 0x0939)) + "ािीुूेैोौंँः्"


def main() -> None:
    rng = random.Random(0)
    words = list(LATIN_WORDS) + list(HINDI_WORDS)
    for _ in range(3000):
        alphabet = LATIN if rng.random() < 0.55 else DEVANAGARI
        words.append("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 8))))
    os.makedirs(OUT, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "text.txt")
        with open(text, "w", encoding="utf-8") as f:
            for _ in range(30000):
                f.write(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + "\n")
        spm.SentencePieceTrainer.train(
            input=text, model_prefix=os.path.join(OUT, "tokenizer"), vocab_size=1024, model_type="bpe",
            character_coverage=1.0, bos_id=-1, eos_id=-1, unk_id=0, num_threads=1,
            input_sentence_size=30000, shuffle_input_sentence=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(OUT, "tokenizer.model"))
    with open(os.path.join(OUT, "vocab.txt"), "w", encoding="utf-8") as f:
        for i in range(sp.get_piece_size()):
            f.write(sp.id_to_piece(i) + "\n")
    os.remove(os.path.join(OUT, "tokenizer.vocab"))
    print("pieces:", sp.get_piece_size(), "->", os.path.normpath(OUT))


if __name__ == "__main__":
    main()
