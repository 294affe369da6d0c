"""``llmdistill build``: verify, filter, dedup, decontaminate, tokenize, align and pack teacher traces.

One module per step (``verify``, ``filters``, ``dedup``, ``decontam``, ``tokenize``, ``pack``,
``report``); ``pipeline.run_build`` runs them in order.
"""

from llmdistill.builder.pipeline import run_build

__all__ = ["run_build"]
