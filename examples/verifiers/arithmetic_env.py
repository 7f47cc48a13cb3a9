"""The quickstart's task as a verifiers environment (verifiers 0.3's classic API): 2-digit additions
as text completions, and a rubric that gives 1.0 for exactly the sum. Written as its authors would
write it for prime-rl's environment hub; nothing here is tidal's. tidal trains on it with
`envs: [{verifiers: ./examples/verifiers/arithmetic_env.py}]` (config.yaml).
"""

from __future__ import annotations

import random

import verifiers as vf
from datasets import Dataset


def problems(num_eval: int, seed: int) -> tuple[Dataset, Dataset]:
    """Every a+b of two 2-digit numbers, shuffled: the first `num_eval` held out, the rest to train."""
    pairs = [(a, b) for a in range(100) for b in range(100)]
    random.Random(seed).shuffle(pairs)
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in pairs]
    return Dataset.from_list(rows[num_eval:]), Dataset.from_list(rows[:num_eval])


def exact_sum(completion, answer, **kwargs) -> float:
    """1.0 when the model's text is the sum and nothing more (surrounding spaces allowed)."""
    return float(bool(completion) and (completion[-1].content or "").strip() == answer)


def load_environment(num_eval: int = 200, seed: int = 0) -> vf.Environment:
    train, held_out = problems(num_eval, seed)
    return vf.SingleTurnEnv(
        dataset=train,
        eval_dataset=held_out,
        message_type="completion",  # the text itself, as the quickstart's prompts: no chat template
        rubric=vf.Rubric(funcs=[exact_sum], weights=[1.0]),
    )
