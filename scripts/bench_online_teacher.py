"""Benchmark: ``llmdistill train`` with an online teacher against the offline path, side by side in one run.

The tiny-world student (Qwen2 64 x 2) distils the shipped tiny teacher (128 x 3) on the same built
rows (the teacher's reference traces, 256 problems), same batch, steps, optimiser and seed:

* offline: the teacher's top-20 was stored by ``build`` (codec, 12 bits); the collator decodes it;
* online:  the shards hold tokens only; the teacher runs beside the student each batch (top-20
  + tail bucket through the same chunked loss);
* online + feature: the online teacher also gives its hidden states to an MSE feature term (with the
  learned 64 -> 128 projection).

The arms alternate (offline, online, feature, offline, ...) so a load change on the shared machine
hits all of them. Reported: each arm's trained tokens per second (the trainer's own ``tokens_per_s``
over the whole run, the median over repeats) and online / offline. On this tiny pair the teacher
costs about as much as the student's forward + backward, so the online path is expected to be
slower; what it saves is the ``generate``/``score`` pass and the stored top-k.

    python scripts/bench_online_teacher.py
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LLMDISTILL_NO_PROGRESS", "1")

STEPS = 40
REPEATS = 2
TOP_K = 20
PROBLEMS = 256


def _data(root: Path) -> tuple[Path, Path, Path, Path]:
    """(student, teacher, shards with top-k, shards of tokens only)."""
    from llmdistill.tinyworld.bootstrap import bootstrap_teacher
    from llmdistill.tinyworld.kd_data import write_tiny_built
    from llmdistill.tinyworld.models import make_model, save_model
    from llmdistill.tinyworld.task import generate_problems
    from llmdistill.tinyworld.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    teacher = bootstrap_teacher(seed=0)
    student = save_model(make_model("student", tokenizer, seed=0), tokenizer, root / "student")
    problems = generate_problems(PROBLEMS, seed=7)
    with_topk = write_tiny_built(root / "built_topk", tokenizer, problems, teacher, k=TOP_K, max_length=256)
    tokens = write_tiny_built(root / "built_tokens", tokenizer, problems, None, max_length=256)
    return student, teacher, with_topk, tokens


def _tokens_per_s(root: Path, name: str, **fields) -> float:
    from llmdistill.config.train import TrainConfig
    from llmdistill.train import build_trainer

    cfg = TrainConfig(output_dir=str(root / name), alpha=0.7, temperature=2.0, max_steps=STEPS,
                      logging_steps=STEPS, per_device_train_batch_size=4, learning_rate=3e-3, save_strategy="no",
                      gradient_checkpointing=False, report_to="none", seed=0, data_seed=0, disable_tqdm=True,
                      **fields)
    trainer, _ = build_trainer(cfg)
    trainer.train()
    return float(next(h["tokens_per_s"] for h in trainer.state.log_history if "tokens_per_s" in h))


def run() -> dict[str, float | str]:
    """Train every arm ``REPEATS`` times, alternating; return tokens/s and the ratios."""
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-online-") as tmp:
        root = Path(tmp)
        student, teacher, with_topk, tokens = _data(root)
        arms = {
            "offline": dict(student_model=str(student), data_dir=str(with_topk)),
            "online": dict(student_model=str(student), data_dir=str(tokens), teacher_model=str(teacher),
                           teacher_top_k=TOP_K),
            "online_feature": dict(student_model=str(student), data_dir=str(tokens), teacher_model=str(teacher),
                                   teacher_top_k=TOP_K, feature_loss="mse", feature_weight=0.1),
        }
        seen: dict[str, list[float]] = {name: [] for name in arms}
        for repeat in range(REPEATS):
            for name, fields in arms.items():
                seen[name].append(_tokens_per_s(root, f"{name}-{repeat}", **fields))
    speed = {name: statistics.median(values) for name, values in seen.items()}
    return {
        "setup": f"tiny student 64x2 <- teacher 128x3, {STEPS} steps x 4 packed rows of 256, top-{TOP_K}, 1 thread",
        "offline_tokens_per_s": round(speed["offline"], 1),
        "online_tokens_per_s": round(speed["online"], 1),
        "online_feature_tokens_per_s": round(speed["online_feature"], 1),
        "online_over_offline": round(speed["online"] / speed["offline"], 3),
        "online_feature_over_offline": round(speed["online_feature"] / speed["offline"], 3),
    }


if __name__ == "__main__":
    for key, value in run().items():
        print(f"{key:>30}  {value}")
