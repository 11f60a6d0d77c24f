"""charlm: a character-level MLP language model ("makemore") and its training engine.

The library does the math only: it never reads params.yaml, parses arguments or
chooses file paths. Randomness enters only through explicit ``torch.Generator``
arguments. See ``pipeline/`` for the DVC glue.
"""

__version__ = "0.1.0"
