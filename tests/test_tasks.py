"""Tests for jaxrl_fp16.rl.tasks and jaxrl_fp16.rl.rewards: generation, rewards, the registry and the
perfectible-set builder (expected values computed by hand)."""

import dataclasses
import math

import numpy as np
import pytest

from jaxrl_fp16.models.tiny import CHARS, EOS_TOKEN
from jaxrl_fp16.rl import rewards
from jaxrl_fp16.rl.prompts import PerfectibleSet, build_perfectible_set, pass_rates, select_perfectible
from jaxrl_fp16.rl.tasks import MATH_DATASETS, TASKS, OptionError, Problem, Task, make_task, score_responses

SYNTHETIC = ["addition", "reverse", "sort_digits", "count"]


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


HAS_RG = _has("reasoning_gym")
needs_rg = pytest.mark.skipif(not HAS_RG, reason="reasoning-gym is not installed")
ALL_TASKS = SYNTHETIC + [pytest.param("math", marks=needs_rg)]


def _perturb(answer: str) -> list[str]:
    """Wrong answers close to the right one: a changed character, a dropped / extra character, a swap."""
    c = "1" if answer[-1] != "1" else "2"
    out = [answer[:-1] + c, answer[:-1], answer + "0", "x" + answer, answer + " " + answer[-1]]
    if len(answer) > 1 and answer[0] != answer[1]:
        out.append(answer[1] + answer[0] + answer[2:])
    return out


# ----------------------------------------------------------------------------------------------------- registry

def test_registry_names_match_task_names():
    assert set(SYNTHETIC + ["math"]) <= set(TASKS)
    for name, factory in TASKS.items():
        task = factory()
        assert task.name == name
        assert isinstance(task, Task)


def test_unknown_task_lists_every_valid_name():
    with pytest.raises(ValueError) as e:
        make_task("nope")
    for name in TASKS:
        assert name in str(e.value)


def test_unknown_option_lists_valid_options():
    with pytest.raises(ValueError, match="max_digits") as e:
        make_task("addition", max_digit=2)
    assert "max_digit" in str(e.value)
    assert make_task("addition", max_digits=4).max_digits == 4


@pytest.mark.parametrize("name, options", [
    ("addition", {"min_digits": 3, "max_digits": 2}), ("addition", {"min_digits": 0}),
    ("reverse", {"alphabet": "ab c"}), ("reverse", {"alphabet": "aab"}), ("reverse", {"alphabet": "a=b"}),
    ("sort_digits", {"min_len": 0}), ("count", {"min_count": 1}), ("count", {"min_start": 5, "max_start": 4}),
    ("addition", {"truncated_reward": float("nan")}), ("math", {"dataset": "arc_1d"}),
    ("math", {"dataset_options": {"seed": 3}}),
])
def test_bad_options_raise(name, options):
    with pytest.raises(OptionError) as e:
        make_task(name, **options)
    assert set(e.value.keys) & set(options)  # names an option at fault


@pytest.mark.parametrize("name, options, key, words", [
    ("addition", {"max_digits": "abc"}, "max_digits", "must be an integer, got 'abc'"),
    ("addition", {"max_digits": 2.0}, "max_digits", "must be an integer"),
    ("addition", {"max_digits": True}, "max_digits", "must be an integer, got True"),
    ("addition", {"truncated_reward": "nan"}, "truncated_reward", "must be a finite number"),
    ("addition", {"truncated_reward": float("inf")}, "truncated_reward", "must be a finite number"),
    ("addition", {"truncated_reward": False}, "truncated_reward", "must be a finite number"),
    ("count", {"partial_credit": "yes"}, "partial_credit", "true or false"),
    ("reverse", {"alphabet": 12}, "alphabet", "must be a string"),
    ("sort_digits", {"descending": 1}, "descending", "true or false"),
    ("math", {"use_math_verify": "no"}, "use_math_verify", "true or false or null"),
    ("math", {"dataset_options": "min_terms=2"}, "dataset_options", "mapping"),
    ("math", {"dataset_options": {"difficulty": float("nan")}}, "dataset_options", "non-finite"),
    ("math", {"dataset_options": {"ranges": [1.0, float("inf")]}}, "dataset_options", "non-finite"),
    ("math", {"dataset": "arc_1d"}, "dataset", "gsm_symbolic"),
    ("addition", {"max_digit": 2}, "max_digit", "valid: max_digits, min_digits"),
])
def test_option_types_are_checked_naming_the_option(name, options, key, words):
    with pytest.raises(OptionError, match=words) as e:
        make_task(name, **options)
    assert e.value.keys == (key,) and key in str(e.value)


def test_well_typed_options_build_without_generating():
    assert make_task("addition", truncated_reward=-1).truncated_reward == -1  # an int is a number
    assert make_task("math", use_math_verify=None, dataset_options={"difficulty": 1.0}).use_math_verify is None
    with pytest.raises(OptionError) as e:
        make_task("addition", min_digits=3, max_digits=2)
    assert e.value.keys == ("min_digits", "max_digits")


# --------------------------------------------------------------------------------------------------- generation

@pytest.mark.parametrize("name", ALL_TASKS)
def test_generation_is_deterministic_per_seed_and_varies_across_seeds(name):
    task = make_task(name)
    a, b, c = task.generate(12, seed=3), task.generate(12, seed=3), task.generate(12, seed=4)
    assert len(a) == 12 and all(isinstance(p, Problem) for p in a)
    assert a == b
    assert [p.prompt for p in a] != [p.prompt for p in c]
    assert len({p.prompt for p in a}) > 6  # not one problem repeated
    assert task.generate(0, seed=3) == []
    with pytest.raises(ValueError):
        task.generate(-1, seed=3)


def test_tasks_with_the_same_seed_differ():
    assert make_task("reverse").generate(5, 0) != make_task("reverse", alphabet="abc").generate(5, 0)
    assert [p.prompt for p in make_task("addition").generate(5, 0)] != \
        [p.prompt for p in make_task("addition", max_digits=5).generate(5, 0)]


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_problems_are_correct_and_char_level(name):
    task = make_task(name)
    problems = task.generate(200, seed=0)
    for p in problems:
        assert set(p.prompt + p.reference) <= set(CHARS), p  # one token each for the character tokenizer
        assert p.answer == p.reference == task.reference_response(p)
        assert len(p.reference) <= task.max_response_chars
        assert "\n" not in p.reference and p.reference == p.reference.strip()
        if name == "addition":
            a, b = p.prompt[:-1].split("+")
            assert int(p.answer) == int(a) + int(b) and p.prompt.endswith("=")
        elif name == "reverse":
            assert p.prompt == f"rev {p.answer[::-1]}="
        elif name == "sort_digits":
            digits = p.prompt.removeprefix("sort ").removesuffix("=")
            assert sorted(digits) == list(p.answer)
        else:
            start, stop = p.prompt.removeprefix("count ").removesuffix(":").split(" to ")
            assert p.answer.split(" ") == [str(i) for i in range(int(start), int(stop) + 1)]


def test_digit_ranges_are_respected():
    problems = make_task("addition", min_digits=2, max_digits=2).generate(300, 1)
    operands = [int(x) for p in problems for x in p.prompt[:-1].split("+")]
    assert min(operands) >= 10 and max(operands) <= 99
    assert {len(p.prompt) - 5 for p in make_task("reverse", min_len=4, max_len=6).generate(300, 1)} == {4, 5, 6}
    assert all(p.answer == "".join(sorted(p.answer, reverse=True))
               for p in make_task("sort_digits", descending=True).generate(50, 1))


def test_count_responses_are_long():
    task = make_task("count")
    lengths = [len(task.reference_response(p)) for p in task.generate(500, seed=0)]
    assert min(lengths) >= 128  # tokens, for the character tokenizer
    assert max(lengths) <= task.max_response_chars == 189
    assert min(len(p.reference) for p in make_task("count", min_count=80, max_count=80).generate(20, 0)) >= 239


# ------------------------------------------------------------------------------------------------------ rewards

@pytest.mark.parametrize("name", ALL_TASKS)
def test_reference_gets_one_and_truncation_gets_truncated_reward(name):
    task = make_task(name)
    for p in task.generate(20, seed=1):
        ref = task.reference_response(p)
        assert task.reward(p, ref, False) == 1.0
        assert task.reward(p, ref) == 1.0
        assert task.reward(p, ref, True) == 0.0
    custom = make_task(name, truncated_reward=-0.5)
    p = custom.generate(1, seed=1)[0]
    assert custom.reward(p, custom.reference_response(p), True) == -0.5
    assert custom.reward(p, "", True) == -0.5


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_wrong_answers_get_zero(name):
    task = make_task(name)
    for p in task.generate(30, seed=2):
        for wrong in _perturb(p.answer):
            assert task.reward(p, wrong) == 0.0, (p, wrong)
        assert task.reward(p, "") == 0.0
        assert task.reward(p, p.prompt + p.answer) == 0.0
        # Surrounding whitespace and a decoded end-of-text marker are not part of the answer.
        assert task.reward(p, f" {p.answer}\n") == 1.0
        assert task.reward(p, p.answer + EOS_TOKEN) == 1.0


def test_partial_credit_is_off_by_default_and_below_one():
    p = Problem(prompt="23+58=", answer="81", reference="81")
    assert make_task("addition").reward(p, "82") == 0.0
    task = make_task("addition", partial_credit=True)
    assert task.reward(p, "82") == 0.5
    assert task.reward(p, "811") == pytest.approx(2 / 3)
    assert task.reward(p, "18") == 0.0
    assert task.reward(p, "81") == 1.0
    assert task.reward(p, "81", True) == 0.0


@pytest.mark.parametrize("text, expected", [
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("first 12, then 288 items.", "288"),
    ("it is 1,692 dollars", "1,692"),
    ("x = -3.5", "-3.5"),
    ("half: 1/2", "1/2"),
    ("#### 70", "70"),
    ("no number here", None),
    ("unfinished \\boxed{12", "12"),  # an unclosed box is no answer; the last number is
])
def test_extract_final_answer(text, expected):
    assert rewards.extract_final_answer(text) == expected


@pytest.mark.parametrize("use_math_verify", [
    False, pytest.param(True, marks=pytest.mark.skipif(not rewards.math_verify_available(),
                                                       reason="math-verify is not installed"))])
@pytest.mark.parametrize("predicted, gold, equal", [
    ("1/2", "0.5", True), ("\\frac{1}{2}", "0.5", True), ("0.50", "0.5", True), ("1,692", "1692", True),
    ("36.0", "36", True), ("-2", "-2", True), ("288", "288", True),
    ("289", "288", False), ("0.49", "0.5", False), ("2", "-2", False), ("1/3", "0.33", False),
])
def test_math_answers_equal(predicted, gold, equal, use_math_verify):
    assert rewards.math_answers_equal(predicted, gold, use_math_verify=use_math_verify) is equal


def test_math_verify_required_when_asked(monkeypatch):
    monkeypatch.setattr(rewards, "_math_verify", lambda: None)
    with pytest.raises(ImportError, match="math-verify"):
        rewards.math_answers_equal("1", "1", use_math_verify=True)
    assert rewards.math_answers_equal("1/2", "0.5")  # the exact fallback


@pytest.mark.parametrize("use_math_verify", [
    None, False, pytest.param(True, marks=pytest.mark.skipif(not rewards.math_verify_available(),
                                                             reason="math-verify is not installed"))])
def test_math_reward_checks_the_final_answer(use_math_verify):
    task = make_task("math", use_math_verify=use_math_verify)
    half = Problem(prompt="What is 1/2 as a decimal?", answer="0.5", reference="\\boxed{0.5}")
    assert task.reward(half, "One half. \\boxed{1/2}") == 1.0
    assert task.reward(half, "It is \\boxed{\\frac{1}{2}}.") == 1.0
    assert task.reward(half, "3 apples then 0.5") == 1.0  # no box: the last number
    assert task.reward(half, "\\boxed{0.5} or maybe 2") == 1.0  # a box wins over later numbers
    assert task.reward(half, "\\boxed{0.25}") == 0.0
    assert task.reward(half, "0.5 or maybe 2") == 0.0
    assert task.reward(half, "I do not know") == 0.0
    assert task.reward(half, "\\boxed{1/2}", True) == 0.0


@needs_rg
@pytest.mark.parametrize("dataset", MATH_DATASETS)
def test_reasoning_gym_generation_offline(dataset, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("generation must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    task = make_task("math", dataset=dataset)
    problems = task.generate(8, seed=5)
    assert problems == task.generate(8, seed=5)
    for p in problems:
        assert p.prompt.endswith("\\boxed{}.") and p.metadata["dataset"] == dataset
        assert p.answer and rewards.extract_final_answer(p.reference) == p.answer
        assert task.reward(p, task.reference_response(p)) == 1.0
        assert task.reward(p, f"\\boxed{{{int(float(p.answer)) + 1}}}") == 0.0
    if dataset == "gsm_symbolic":
        assert all(len(p.reference) > 100 for p in problems)  # the worked solution, not just the answer
    options = make_task("math", dataset="chain_sum", dataset_options={"min_terms": 2, "max_terms": 2,
                                                                      "min_digits": 1, "max_digits": 1})
    assert all(p.prompt.count("+") + p.prompt.count("-") == 1 for p in options.generate(10, 0))


@needs_rg
def test_reasoning_gym_bad_option_raises():
    with pytest.raises(ValueError, match="dataset_options"):
        make_task("math", dataset="chain_sum", dataset_options={"no_such_field": 1}).generate(2, 0)


# -------------------------------------------------------------------------------------------- perfectible sets

def _problems(n):
    return [Problem(prompt=f"p{i}", answer=str(i), reference=str(i)) for i in range(n)]


def test_pass_rates_hand_computed():
    rewards_N = [1, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 1]  # prompts of 4 samples: 1/4, 3/4, 4/4
    np.testing.assert_array_equal(pass_rates(rewards_N, 4), [0.25, 0.75, 1.0])
    np.testing.assert_allclose(pass_rates(rewards_N, 3), [1 / 3, 2 / 3, 2 / 3, 1.0])
    with pytest.raises(ValueError, match="groups"):
        pass_rates(rewards_N, 5)
    with pytest.raises(ValueError, match="row 5 \\(prompt 1\\)"):
        pass_rates([1, 0, 0, 0, 1, float("nan"), 0, 1], 4)


def test_select_perfectible_hand_computed():
    problems = _problems(6)
    rates = [0.0, 0.2, 0.5, 0.8, 0.9, 1.0]
    assert [p.prompt for p in select_perfectible(problems, rates)] == ["p1", "p2", "p3"]  # bounds included
    assert [p.prompt for p in select_perfectible(problems, rates, low=0.5, high=1.0)] == ["p2", "p3", "p4", "p5"]
    assert select_perfectible(problems, rates, low=0.3, high=0.4) == []
    with pytest.raises(ValueError, match="pass rates for 6 problems"):
        select_perfectible(problems, rates[:5])
    with pytest.raises(ValueError, match="low"):
        select_perfectible(problems, rates, low=0.9, high=0.1)
    with pytest.raises(ValueError, match="'p3'"):
        select_perfectible(problems, [0, 0, 0, math.inf, 0, 0])


def test_build_perfectible_set_with_a_fake_sampler():
    task = make_task("addition")
    problems = task.generate(5, seed=0)
    # Problem i is solved by the first `solved[i]` of its 4 samples; pass rates 0, 1/4, 2/4, 3/4, 1.
    solved = dict(zip((p.prompt for p in problems), range(5)))
    answers = {p.prompt: p.answer for p in problems}
    calls = []

    def solve(prompts, k):
        calls.append(len(prompts))
        return [[answers[q] if j < solved[q] else "x" for j in range(k)] for q in prompts]

    result = build_perfectible_set(task, problems, solve, k=4, batch_size=2)
    assert isinstance(result, PerfectibleSet)
    assert calls == [2, 2, 1]
    np.testing.assert_array_equal(result.candidate_pass_rates, [0, 0.25, 0.5, 0.75, 1.0])
    assert result.problems == problems[1:4]
    np.testing.assert_array_equal(result.pass_rates, [0.25, 0.5, 0.75])
    assert result.stats["num_candidates"] == 5 and result.stats["num_selected"] == 3
    assert result.stats["fraction_selected"] == pytest.approx(0.6)
    assert result.stats["mean_pass_rate"] == pytest.approx(0.5)
    assert result.stats["mean_pass_rate_selected"] == pytest.approx(0.5)
    assert result.stats["fraction_never_solved"] == pytest.approx(0.2)
    assert result.stats["fraction_always_solved"] == pytest.approx(0.2)
    assert result.stats["samples_per_prompt"] == 4


def test_build_perfectible_set_truncated_responses_and_bad_samplers():
    task = make_task("addition")
    problems = task.generate(3, seed=0)
    # Right answers that hit the length limit count as failures.
    result = build_perfectible_set(task, problems, lambda prompts, k: [[(a.answer, j == 0) for j in range(k)]
                                                                       for a in problems], k=2)
    np.testing.assert_array_equal(result.candidate_pass_rates, [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="2 responses per prompt"):
        build_perfectible_set(task, problems, lambda prompts, k: [["1"] for _ in prompts], k=2)
    with pytest.raises(ValueError, match="for 2 prompts, expected 3"):
        build_perfectible_set(task, problems, lambda prompts, k: [["1"] * k for _ in prompts[:2]], k=2)
    empty = build_perfectible_set(task, [], lambda prompts, k: [], k=2)
    assert empty.problems == [] and empty.stats["num_candidates"] == 0
    with pytest.raises(ValueError, match="batch_size"):
        build_perfectible_set(task, problems, lambda prompts, k: [], batch_size=0)


def test_non_finite_reward_names_the_problem():
    @dataclasses.dataclass(frozen=True)
    class Broken:
        name: str = "broken"
        truncated_reward: float = 0.0

        def generate(self, n, seed):
            return _problems(n)

        def reward(self, problem, response_text, truncated=False):
            return float("nan") if problem.prompt == "p2" else 1.0

        def reference_response(self, problem):
            return problem.reference

    task = Broken()
    assert isinstance(task, Task)
    with pytest.raises(ValueError, match=r"non-finite reward \(nan\).*problem 2 \(prompt 'p2'"):
        build_perfectible_set(task, task.generate(4, 0), lambda prompts, k: [["a"] * k for _ in prompts])
    with pytest.raises(ValueError, match="'p2'"):
        score_responses(task, task.generate(3, 0), [["a"], ["a"], ["a"]])
