"""Dimension letters used in every shape comment and docstring (STYLE.md rule 13).

    B batch          T query tokens in this step    S kv length (keys visible)
    N query heads    K kv heads                     H head dim
    D embed (hidden) F ffn (intermediate)           V vocab
    L layers         P pages in the pool            G page size (tokens per page)
    W block-table width (pages per sequence in this bucket)
"""

LETTERS = {
    "B": "batch", "T": "query tokens", "S": "kv length", "N": "query heads", "K": "kv heads",
    "H": "head dim", "D": "embed", "F": "ffn", "V": "vocab", "L": "layers", "P": "pages",
    "G": "page size", "W": "block-table width",
}
