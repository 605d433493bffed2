"""LLM-as-judge over any OpenAI-compatible endpoint: base against tuned on held-out prompts.

Pairwise: each pair is judged twice, base first then tuned first; a win or loss counts only when both orders
agree, anything else is a tie, so a judge that prefers a position scores ties, not wins. Single: each answer
graded 1-10. Requests are bounded (concurrency, retries, timeout); a request that still fails is reported
and its pair left out, never scored.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.eval.intervals import paired_difference, summarise, wilson

PAIRWISE_PROMPT = """You are comparing two answers to the same question. Judge which answer is more correct,
helpful and faithful to the reference (when one is given). Ignore the order in which the answers appear and
their length unless it matters for the question.

[Question]
{question}

[Reference answer]
{reference}

[Answer A]
{answer_a}

[Answer B]
{answer_b}

Explain briefly, then end with one verdict on the last line: [[A]] if A is better, [[B]] if B is better,
[[C]] for a tie."""

SINGLE_PROMPT = """Grade the answer to the question from 1 (useless or wrong) to 10 (fully correct and helpful),
using the reference answer (when one is given) as the standard.

[Question]
{question}

[Reference answer]
{reference}

[Answer]
{answer}

Explain briefly, then end with the grade on the last line as [[N]], e.g. [[7]]."""

_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")
_GRADE = re.compile(r"\[\[\s*(10|[1-9])\s*\]\]")


class JudgeError(TuneforgeError):
    pass


def api_key(spec) -> str | None:
    if spec.api_key_env is None:
        return None
    key = os.environ.get(spec.api_key_env)
    if not key:
        raise ConfigError(f"evaluation.judge.api_key_env: the environment variable {spec.api_key_env} is not set; "
                          f"export it with the judge's key")
    return key


def ask(spec, prompt: str, key: str | None) -> str:
    """The judge's reply to one prompt (temperature 0), retried `spec.retries` times; JudgeError when it fails."""
    body = json.dumps({"model": spec.model, "messages": [{"role": "user", "content": prompt}],
                       "temperature": 0, "max_tokens": spec.max_tokens}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    url = spec.base_url.rstrip("/") + "/chat/completions"
    last = ""
    for attempt in range(spec.retries + 1):
        if attempt:
            time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
        try:
            req = urllib.request.Request(url, body, headers, method="POST")
            with urllib.request.urlopen(req, timeout=spec.timeout_s) as resp:
                return json.loads(resp.read())["choices"][0]["message"]["content"] or ""
        except urllib.error.HTTPError as err:
            last = f"HTTP {err.code}: {err.read()[:200].decode(errors='replace')}"
            if err.code in (400, 401, 403, 404):
                break  # asking again will not help
        except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
            last = f"{type(err).__name__}: {err}"
    raise JudgeError(f"judge {spec.model} at {url} failed after {attempt + 1} attempt(s): {last}")


def _ask_all(spec, prompts: list[str]) -> list[tuple[str | None, str | None]]:
    """(reply, error) for each prompt, at most `spec.concurrency` in flight."""
    key = api_key(spec)

    def one(prompt: str):
        try:
            return ask(spec, prompt, key), None
        except JudgeError as err:
            return None, str(err)
    with ThreadPoolExecutor(max_workers=spec.concurrency) as pool:
        return list(pool.map(one, prompts))


def verdict(reply: str | None) -> str | None:
    """'A', 'B' or 'C' (tie) from the reply's last [[X]], or None when it gives none."""
    found = _VERDICT.findall(reply or "")
    return found[-1] if found else None


def grade(reply: str | None) -> int | None:
    found = _GRADE.findall(reply or "")
    return int(found[-1]) if found else None


def template(spec) -> str:
    if spec.prompt is None:
        return PAIRWISE_PROMPT if spec.mode == "pairwise" else SINGLE_PROMPT
    path = Path(spec.prompt)
    if not path.is_file():
        raise ConfigError(f"evaluation.judge.prompt: {path} does not exist; give a file with the judge's prompt")
    return path.read_text(encoding="utf-8")


def _fill(text: str, **values) -> str:
    for k, v in values.items():
        text = text.replace("{" + k + "}", str(v))
    return text


def _rates(counts: dict[str, int], n: int) -> dict:
    return {k: {"rate": c / n if n else 0.0, "ci95": list(wilson(c, n)), "count": c} for k, c in counts.items()}


def judge_pairwise(spec, before: list[dict], after: list[dict]) -> dict:
    """Win/tie/loss of the tuned answers (`after`) against the base's (`before`), both orders per pair."""
    text, items = template(spec), list(zip(before, after))[: spec.max_examples]
    prompts = []
    for b, a in items:
        common = {"question": b.get("question", b["prompt"]), "reference": b["reference"]}
        prompts += [_fill(text, **common, answer_a=b["answer"], answer_b=a["answer"]),
                    _fill(text, **common, answer_a=a["answer"], answer_b=b["answer"])]
    replies = _ask_all(spec, prompts)
    counts, records, errors = {"win": 0, "tie": 0, "loss": 0}, [], []
    for i, (b, _) in enumerate(items):
        (r1, e1), (r2, e2) = replies[2 * i], replies[2 * i + 1]
        v1, v2 = verdict(r1), verdict(r2)
        # Order 1 shows base as A; order 2 shows tuned as A. Map both to who won.
        first = {"A": "base", "B": "tuned", "C": "tie"}.get(v1 or "")
        second = {"A": "tuned", "B": "base", "C": "tie"}.get(v2 or "")
        problem = e1 or e2 or (None if first and second else "the reply has no [[A]], [[B]] or [[C]] verdict")
        if problem:
            errors.append(f"{b.get('where', i)}: {problem}")
            outcome = "failed"
        else:
            outcome = "win" if first == second == "tuned" else "loss" if first == second == "base" else "tie"
            counts[outcome] += 1
        records.append({"where": b.get("where"), "outcome": outcome, "base_first": r1, "tuned_first": r2,
                        "errors": [e for e in (e1, e2) if e]})
    return _outcome(spec, _rates(counts, sum(counts.values())), sum(counts.values()), records, errors)


def judge_single(spec, before: list[dict], after: list[dict]) -> dict:
    """Mean 1-10 grade of base and tuned answers, and the paired difference with its interval."""
    text, items = template(spec), list(zip(before, after))[: spec.max_examples]
    prompts = [_fill(text, question=s.get("question", s["prompt"]), reference=s["reference"], answer=s["answer"])
               for b, a in items for s in (b, a)]
    replies = _ask_all(spec, prompts)
    grades, records, errors = ([], []), [], []
    for i, (b, _) in enumerate(items):
        (r1, e1), (r2, e2) = replies[2 * i], replies[2 * i + 1]
        g1, g2 = grade(r1), grade(r2)
        problem = e1 or e2 or (None if g1 and g2 else "the reply has no [[N]] grade")
        if problem:
            errors.append(f"{b.get('where', i)}: {problem}")
        else:
            grades[0].append(g1)
            grades[1].append(g2)
        records.append({"where": b.get("where"), "base": r1, "tuned": r2, "base_grade": g1, "tuned_grade": g2})
    rates = {name: {"rate": s["value"], "ci95": s["ci95"], "count": s["n"]}
             for name, s in (("base", summarise(grades[0])), ("tuned", summarise(grades[1])))}
    out = _outcome(spec, rates, len(grades[0]), records, errors)
    out["difference"] = paired_difference(*grades)
    return out


def _outcome(spec, rates: dict, n: int, records: list[dict], errors: list[str]) -> dict:
    if records and n == 0:
        raise JudgeError(f"evaluation.judge: no pair could be judged; first problem: {errors[0]}")
    out = {"mode": spec.mode, "model": spec.model, "base_url": spec.base_url, "n": n, "failed": len(errors),
           "rates": rates, "replies": records}
    if errors:
        out["error"] = f"{len(errors)} of {len(records)} pairs were not judged and are left out; first: {errors[0]}"
    return out


JUDGES = {"pairwise": judge_pairwise, "single": judge_single}
