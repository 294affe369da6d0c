"""Teacher stage: ``generate`` (sampled traces + top-k log-probs) and ``score`` (re-scoring by prefill).

Modules, in the order data flows: :mod:`.inputs` (this part's rows, checks, prompt formatting),
:mod:`.engines` (work in, completions out as they finish: the in-process vLLM step loop),
:mod:`.pool` (the same through a pool of OpenAI-compatible servers, streamed; replies parsed by
:mod:`.responses`), :mod:`.store` (shards written as completions finish, resume, manifests,
merging parts), :mod:`.stage` (the two commands, top to bottom). :mod:`.synthetic_server`
answers like a vLLM server without a model, for tests and benchmarks.
"""

from llmdistill.generate.inputs import InputError
from llmdistill.generate.stage import prepare, run_generate, run_score
from llmdistill.generate.store import merge_shards

__all__ = ["InputError", "merge_shards", "prepare", "run_generate", "run_score"]
