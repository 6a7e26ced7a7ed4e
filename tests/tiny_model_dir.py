"""The tiny AdapterHub BERT of ``pruning_fixtures`` saved to a folder with a real tokenizer.

The tokenizer is a ``BertTokenizerFast`` built offline from a 100-entry vocabulary (the
tiny model's vocabulary size), so the folder is a complete model directory: what a user
passes to ``tropfast prune MODEL_DIR`` after ``save_pretrained``.
"""
from __future__ import annotations

import os
import tempfile

from pruning_fixtures import VOCAB, base_copy, tiny_model

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Common words of English movie reviews, so Rotten Tomatoes text is not all [UNK].
WORDS = (
    "the a an and of to is it in that this film movie as with for its but be on by his are not you at one all "
    "from has more than so like story good bad best funny great too about no just there out who what even if "
    "much well can most love or up comedy characters time little makes way life director work drama make only "
    "performances into never enough some any own an thriller script fun itself ."
).split()


def vocabulary() -> list[str]:
    pieces = [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab = list(dict.fromkeys(SPECIAL + pieces + WORDS))[:VOCAB]
    assert len(vocab) == VOCAB, len(vocab)
    return vocab


def tiny_tokenizer(folder: str):
    """A BertTokenizerFast over ``vocabulary()``, its vocab.txt written under ``folder``."""
    from transformers import BertTokenizerFast

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(vocabulary()) + "\n")
    return BertTokenizerFast(vocab_file=path, do_lower_case=True)


def save_tiny(folder: str, *, adapter: bool = True, seed: int = 0) -> str:
    """Save ``tiny_model(seed)`` (adapter "a" + 2-label head; ``adapter=False``: the bare base) and a tokenizer."""
    model = tiny_model(seed) if adapter else base_copy(seed)
    model.save_pretrained(folder)
    with tempfile.TemporaryDirectory() as tmp:
        tiny_tokenizer(tmp).save_pretrained(folder)
    return folder
