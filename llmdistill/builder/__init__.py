"""``llmdistill build``: verify, filter, dedup, decontaminate, tokenize, align and pack teacher traces.

``pipeline.run_build`` runs five phases over parts of the input on Ray Data (see its docstring);
one module per step (``verify``, ``filters``, ``dedup``, ``decontam``, ``tokenize``, ``pack``,
``report``) and per phase (``prompt_level``, ``rows``, ``decide``, ``shards``), with the input's
parts in ``traces`` and the Ray plumbing in ``cluster``.
"""

from llmdistill.builder.pipeline import run_build

__all__ = ["run_build"]
