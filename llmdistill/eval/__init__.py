"""``llmdistill eval``: sample models on benchmarks with vLLM, score, and report.

``harness`` runs the stage top to bottom, ``engine`` starts one vLLM engine per model,
``metrics`` holds pass@k / maj@k and ``report`` the tables and the chart. The benchmarks
themselves are data (:mod:`llmdistill.benchmarks`), and answers are checked by
:mod:`llmdistill.checking`, the same code ``build`` uses for rejection sampling.
"""
