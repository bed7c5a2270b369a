"""The math task: word problems from reasoning-gym's procedural generators, scored by the final answer
(`rewards.math_answers_equal`, with math-verify when installed). reasoning-gym is imported when problems are
generated, so the registry loads without it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from jaxrl_fp16.rl.rewards import clean_response, extract_final_answer, math_answers_equal
from jaxrl_fp16.rl.task_base import OptionError, Problem, TaskBase

__all__ = ["MATH_DATASETS", "MathWordProblems"]

# reasoning-gym datasets whose answers are single numbers (what the math checker compares).
MATH_DATASETS = ("gsm_symbolic", "basic_arithmetic", "chain_sum")

_MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclasses.dataclass(frozen=True, kw_only=True)
class MathWordProblems(TaskBase):
    """Math problems from reasoning-gym's procedural generators, for real models.

    Args:
      dataset: one of `MATH_DATASETS`.
      dataset_options: fields of that dataset's reasoning-gym config (e.g. {"min_terms": 2, "max_digits": 3}
        for basic_arithmetic / chain_sum, {"difficulty": 1.0} for gsm_symbolic); `seed` and `size` are set by
        `generate`.
      instruction: appended to the question on a new line.
      use_math_verify: None uses math-verify when installed, False forces the exact numeric comparison.
      truncated_reward: the reward of a response that hit the length limit.
    """

    name: ClassVar[str] = "math"
    dataset: str = "gsm_symbolic"
    dataset_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    instruction: str = _MATH_INSTRUCTION
    use_math_verify: bool | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.dataset not in MATH_DATASETS:
            raise OptionError(f"math: unknown dataset {self.dataset!r}; valid: {', '.join(MATH_DATASETS)}", "dataset")
        reserved = {"seed", "size"} & set(self.dataset_options)
        if reserved:
            raise OptionError(f"math: dataset_options may not set {sorted(reserved)} (generate sets them)",
                              "dataset_options")

    def generate(self, n: int, seed: int) -> list[Problem]:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n == 0:
            return []
        import reasoning_gym

        try:
            data = reasoning_gym.create_dataset(self.dataset, size=n, seed=int(seed), **self.dataset_options)
        except TypeError as e:
            raise ValueError(f"math: bad dataset_options for {self.dataset!r}: {e}") from e
        problems = []
        for entry in data:
            meta = {k: v for k, v in entry["metadata"].items() if k != "answer_cot"}
            answer = str(entry["answer"]).strip()
            reference = self._reference(answer, entry["metadata"].get("answer_cot"))
            prompt = f"{entry['question']}\n{self.instruction}" if self.instruction else entry["question"]
            problems.append(Problem(prompt=prompt, answer=answer, reference=reference,
                                    metadata={"dataset": self.dataset, "seed": int(seed), **meta}))
        return problems

    @staticmethod
    def _reference(answer: str, cot: str | None) -> str:
        """The dataset's worked solution (gsm_symbolic) with its "#### n" line turned into a boxed answer."""
        final = f"The final answer is \\boxed{{{answer}}}."
        if not cot:
            return final
        lines = [line for line in cot.rstrip().splitlines() if not line.lstrip().startswith("####")]
        return "\n".join(lines).rstrip() + "\n" + final

    def _score(self, problem: Problem, response_text: str) -> float:
        predicted = extract_final_answer(clean_response(response_text))
        if predicted is None:
            return 0.0
        return float(math_answers_equal(predicted, problem.answer, use_math_verify=self.use_math_verify))
