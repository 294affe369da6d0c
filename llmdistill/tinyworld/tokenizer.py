"""The tiny world's tokenizer: a 512-token byte-level BPE with ChatML special tokens.

Digits are split one per token before BPE, so ``123`` is always ``1 2 3`` and a tiny model
can learn column arithmetic. ``<think>`` and ``</think>`` are added (non-special) tokens: one
id each, kept by ``decode(skip_special_tokens=True)``. The merges are learned from a fixed
corpus of tiny-world text, and training is deterministic, so every build writes the same files.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llmdistill.checking.extract import THINK_TAGS as THINK_TOKENS
from llmdistill.tinyworld.task import generate_problems, reference_completion

VOCAB_SIZE = 512
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, "<|im_start|>", EOS_TOKEN)
CORPUS_PROBLEMS = 3000
CORPUS_SEED = 1234

# ChatML, as Qwen-style chat models use it; no default system prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _corpus() -> list[str]:
    """Tiny-world text to learn merges from: questions, reference traces and role names."""
    texts = []
    for problem in generate_problems(CORPUS_PROBLEMS, seed=CORPUS_SEED, split="train"):
        texts.append(problem.question)
        completion = reference_completion(problem)
        for tag in THINK_TOKENS:  # these become whole added tokens: no merges wasted on them
            completion = completion.replace(tag, " ")
        texts.append(completion)
    texts += ["system\n", "user\n", "assistant\n"] * CORPUS_PROBLEMS  # one chat per problem
    return texts


def _train_backend() -> Tokenizer:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(THINK_TOKENS),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer=trainer)
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return backend


def build_tokenizer(save_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Train the tiny-world tokenizer (about a second) and optionally save it.

    Args:
        save_dir: if given, ``save_pretrained`` writes the tokenizer there.

    Returns:
        A fast tokenizer with eos ``<|im_end|>``, pad ``<|endoftext|>``, no BOS and a ChatML
        chat template whose generation prompt is ``<|im_start|>assistant\\n``.
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_backend(),
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer
