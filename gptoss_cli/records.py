"""One graded sample's entry in a ``gptoss eval`` report, whichever way its reply was made.

Both the in-process eval (``evals.py``) and the eval against an endpoint (``endpoint.py``) build
their entries here, so neither imports the other.
"""

from __future__ import annotations

from .graders import Reply, grade
from .suites import Problem, Suite


def _record(suite: Suite, problem: Problem, effort: str, index: int, seed: int) -> dict:
    return {"suite": suite.name, "effort": effort, "id": problem.id, "sample": index, "seed": seed,
            "prompt": problem.prompt}


def graded_record(suite: Suite, problem: Problem, effort: str, index: int, seed: int, reply: dict,
                  tokens: dict, seconds: float) -> dict:
    """A sample's report entry from its reply (answer, reasoning, tool_calls, raw, malformed,
    stop_reason), graded; shared by the in-process and the endpoint (``endpoint.py``) paths."""
    r = Reply(reply["answer"], reply["reasoning"], reply["tool_calls"], reply["raw"], reply["stop_reason"],
              reply["malformed"])
    return {
        **_record(suite, problem, effort, index, seed), "reasoning": r.reasoning, "answer": r.answer,
        "tool_calls": r.tool_calls, "raw": r.raw, "malformed": r.malformed, "stop_reason": r.stop_reason,
        "grade": grade(problem.grader, r, problem.expected, problem.options).to_dict(),
        "tokens": tokens, "seconds": seconds,
    }


def context_record(suite: Suite, problem: Problem, effort: str, index: int, seed: int, why: str) -> dict:
    """The entry of a prompt that does not fit the context: graded incorrect, with the reason."""
    return {**_record(suite, problem, effort, index, seed), "reasoning": "", "answer": "", "tool_calls": [],
            "raw": "", "malformed": [], "stop_reason": "context",
            "grade": {"correct": False, "extracted": None, "expected": problem.expected, "reason": why},
            "tokens": {"prompt": 0, "reasoning": 0, "answer": 0, "generated": 0}, "seconds": 0.0}
