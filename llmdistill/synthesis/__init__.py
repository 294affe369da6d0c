"""``llmdistill synthesize``: data-free distillation, the teacher writes the prompts too.

``prompts`` renders what the teacher completes (Magpie's user-turn prefix, few-shot and evolve
requests), ``filters`` holds the query filters (build's length, dedup and decontamination code, the
shared answer checker for the agreement vote), ``stage`` runs it all on generate's engines, and
``report`` writes ``prompts.jsonl``, ``report.md`` and the manifest.
"""

from llmdistill.synthesis.stage import run_synthesize

__all__ = ["run_synthesize"]
