"""llmdistill: distil a reasoning teacher into small students, R1-style.

Stages (one module each): ``generate`` (teacher traces + top-k log-probs), ``builder``
(the ``build`` command: verify, filter, dedup, decontaminate, tokenize, pack), ``train``
(sparse top-k KD + SFT) and ``eval`` (the benchmark harness). Shared by several stages:
``prompts`` (the one prompt formatter), ``checking`` (answer extraction, checkers, sandbox),
``benchmarks`` (benchmark definitions, data) and ``formats`` (every artifact's contract).
Importing the package has no side effects.
"""

__version__ = "0.1.0"
