"""Published dataset formats: each named format turns a row as its publisher wrote it into an
r1mega row (``id``, ``prompt``, ``task``, ``answer``, ``tests``, other columns kept for ``meta``),
which :mod:`r1mega.data.loader` then validates like any row.

========================  ==========================================================================
``data.format``           rows (published columns -> r1mega fields)
========================  ==========================================================================
``r1mega``                r1mega rows as they are (``prompt``, ``task``, ``answer``, ``tests``, ...)
``gsm8k``                 ``question``; ``answer`` ending ``#### 18`` -> answer "18", the rest kept
                          as ``meta["solution"]``
``math`` (MATH, MATH-500) ``problem``; ``answer``, else the last ``\\boxed{}`` of ``solution``;
                          ``unique_id`` is the id; ``subject``, ``level`` kept
``aime``, ``amc``         ``problem`` or ``question`` (any capitalisation); a numeric ``answer``
                          (integers, and floats such as 27.0, kept as the integer's text)
``deepscaler``,           ``problem``; ``answer``, else the last ``\\boxed{}`` of ``solution``;
``openr1-math``           ``uuid`` is the id where there is one
``humaneval``             ``task_id``, ``prompt`` (the function head), ``test`` + ``entry_point``
                          -> one assert test: the test code, then ``check(<entry_point>)``
``mbpp``                  ``task_id``, ``text`` (the prompt also lists the tests, as MBPP's paper
                          prompts do), ``test_list`` -> assert tests after ``test_setup_code``
``apps``, ``taco``        ``question`` (+ ``starter_code``); ``input_output`` (JSON text) ->
                          stdin/stdout tests, or, with ``fn_name``, assert tests calling it
``verl``                  verl's preprocessed math rows (DAPO-Math-17k): ``prompt`` chat messages
                          (the last user turn), ``reward_model.ground_truth``
========================  ==========================================================================

The column keys (``data.prompt_key``, ``data.answer_key``, ``data.id_key``) name the column a
format reads instead of its own. Rows without an id take their 0-based index in the file
(``"17"``): stable across runs, and what the error messages count by. Every other column is kept
and reaches ``PromptRecord.meta`` (custom rewards read it there).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from r1mega.utils.latex import last_boxed

FORMATS = ("r1mega", "gsm8k", "math", "aime", "amc", "deepscaler", "openr1-math", "humaneval", "mbpp", "apps",
           "taco", "verl")


class FormatError(Exception):
    """A published field that the format cannot read; the loader prefixes the file and the row."""


@dataclass(frozen=True)
class Columns:
    """Which columns hold the question, the gold answer and the id (None: the format's own), and
    the task of rows that name none (r1mega rows; the named formats know theirs)."""

    prompt_key: str | None = None
    answer_key: str | None = None
    id_key: str | None = None
    task: str | None = None


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _find(row: dict, names: tuple[str, ...]) -> str | None:
    """The first of `names` that is a column of `row`: exactly, else in any capitalisation
    (AIME copies spell it Problem / Answer / ID)."""
    for name in names:
        if name in row:
            return name
    lower = {key.lower(): key for key in row if isinstance(key, str)}
    for name in names:
        if name.lower() in lower:
            return lower[name.lower()]
    return None


def _take(row: dict, names: tuple[str, ...], override: str | None, *, required: bool, what: str) -> tuple[str | None, Any]:
    """(column, value) of the first present column among `override` or `names` (the value None when
    absent); FormatError when `required` and absent."""
    names = (override,) if override else names
    column = _find(row, names)
    if column is None or row[column] is None:
        if required:
            shown = " or ".join(repr(n) for n in names)
            raise FormatError(f"field {shown}: missing ({what})")
        return column, None
    return column, row[column]


def _text(column: str, value: Any) -> str:
    if not isinstance(value, str):
        raise FormatError(f"field {column!r}: must be a string, got {_kind(value)}")
    return value


def _numeric_answer(column: str, value: Any) -> str:
    """A competition answer as text: integers as they are, integral floats (27.0) as the integer."""
    if isinstance(value, bool):
        raise FormatError(f"field {column!r}: must be a number or a string, got bool")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise FormatError(f"field {column!r}: {value} is not an answer")
        return str(int(value)) if value.is_integer() else repr(value)
    return _text(column, value).strip()


def _rest(row: dict, used: set[str | None]) -> dict:
    """The columns no r1mega field took (kept in meta by the loader)."""
    return {key: value for key, value in row.items() if key not in used}


def _ident(row: dict, names: tuple[str, ...], cols: Columns, index: int) -> tuple[str | None, Any]:
    column, value = _take(row, names, cols.id_key, required=bool(cols.id_key), what="data.id_key names it")
    return column, (index if value is None else value)


def _r1mega(row: dict, index: int, cols: Columns) -> dict:
    out, moved = dict(row), set()
    for field, key in (("prompt", cols.prompt_key), ("answer", cols.answer_key), ("id", cols.id_key)):
        if key and key != field:
            if key not in row:
                raise FormatError(f"field {key!r}: missing (data.{field}_key names it)")
            if row.get(field) is not None:
                raise FormatError(f"field {field!r}: present beside data.{field}_key's column {key!r}")
            out[field] = row[key]
            moved.add(key)
    for key in moved - {"prompt", "answer", "id"}:
        del out[key]
    if out.get("id") is None:
        out["id"] = index
    return out  # rows without a task take cols.task in the loader's validation


def _gsm8k(row: dict, index: int, cols: Columns) -> dict:
    qcol, question = _take(row, ("question",), cols.prompt_key, required=True, what="the question")
    acol, worked = _take(row, ("answer",), cols.answer_key, required=True, what="the worked answer")
    worked = _text(acol, worked)
    solution, sep, final = worked.rpartition("####")
    if not sep or not final.strip():
        raise FormatError(f"field {acol!r}: no '#### <answer>' line (GSM8K ends its answers so)")
    icol, rid = _ident(row, ("id",), cols, index)
    return {"id": rid, "prompt": _text(qcol, question), "task": "math", "answer": final.strip().replace(",", ""),
            "solution": solution.strip(), **_rest(row, {qcol, acol, icol})}


def _boxed_or_answer(row: dict, prompt_names: tuple[str, ...], id_names: tuple[str, ...], index: int,
                     cols: Columns, numeric: bool = False) -> dict:
    qcol, question = _take(row, prompt_names, cols.prompt_key, required=True, what="the problem")
    acol, answer = _take(row, ("answer",), cols.answer_key, required=False, what="")
    used = {qcol, acol}
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        scol, solution = _take(row, ("solution",), None, required=False, what="")
        if solution is None:
            raise FormatError(f"field {(cols.answer_key or 'answer')!r}: missing, and no 'solution' to take its "
                              "last \\boxed{} from")
        answer = last_boxed(_text(scol, solution))
        if answer is None or not answer.strip():
            raise FormatError(f"field {scol!r}: no \\boxed{{}} answer in it (and no 'answer' field)")
        acol = scol
    else:
        answer = _numeric_answer(acol, answer) if numeric else _text(acol, answer).strip()
    icol, rid = _ident(row, id_names, cols, index)
    return {"id": rid, "prompt": _text(qcol, question), "task": "math", "answer": answer,
            **_rest(row, used | {icol})}


def _math(row: dict, index: int, cols: Columns) -> dict:
    return _boxed_or_answer(row, ("problem",), ("unique_id", "id"), index, cols)


def _competition(row: dict, index: int, cols: Columns) -> dict:
    return _boxed_or_answer(row, ("problem", "question"), ("id", "unique_id"), index, cols, numeric=True)


def _deepscaler(row: dict, index: int, cols: Columns) -> dict:
    return _boxed_or_answer(row, ("problem", "question"), ("uuid", "id", "unique_id"), index, cols)


HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Give the whole function, with its imports "
                         "and its signature, in a ```python code block.")


def _humaneval(row: dict, index: int, cols: Columns) -> dict:
    pcol, head = _take(row, ("prompt",), cols.prompt_key, required=True, what="the function head")
    tcol, test = _take(row, ("test",), None, required=True, what="the check function")
    ecol, entry = _take(row, ("entry_point",), None, required=True, what="the function checked")
    head, test, entry = _text(pcol, head), _text(tcol, test), _text(ecol, entry)
    if not entry.isidentifier():
        raise FormatError(f"field {ecol!r}: {entry!r} is not a function name")
    icol, rid = _ident(row, ("task_id",), cols, index)
    # The program is the completion's code block, run before the test: it must carry the imports
    # the head has (from typing import List), as the instruction asks.
    return {"id": rid, "prompt": f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{head.rstrip()}\n```", "task": "code",
            "tests": [{"assert": f"{test.strip()}\n\ncheck({entry})"}], "code_prompt": head,
            **_rest(row, {pcol, tcol, icol})}


def _mbpp(row: dict, index: int, cols: Columns) -> dict:
    pcol, text = _take(row, ("text", "prompt"), cols.prompt_key, required=True, what="the task")
    lcol, tests = _take(row, ("test_list",), None, required=True, what="the asserts")
    if not isinstance(tests, (list, tuple)) or not tests or not all(isinstance(t, str) for t in tests):
        raise FormatError(f"field {lcol!r}: must be a non-empty list of assert strings, got {_kind(tests)}")
    scol, setup = _take(row, ("test_setup_code",), None, required=False, what="")
    setup = _text(scol, setup).strip() if setup else ""
    icol, rid = _ident(row, ("task_id",), cols, index)
    prompt = f"{_text(pcol, text).strip()} Your code should pass these tests:\n\n" + "\n".join(tests)
    return {"id": rid, "prompt": prompt, "task": "code",
            "tests": [{"assert": f"{setup}\n{t}" if setup else t} for t in tests],
            **_rest(row, {pcol, lcol, icol})}


def _lines(value: Any) -> str:
    # APPS/TACO inputs and outputs are texts, or lists of lines (their evaluator joins them so)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    if isinstance(value, str):
        return value
    raise FormatError(f"field 'input_output': a stdin/stdout case must be text, got {_kind(value)}")


# A call-based APPS/TACO case, checked as their evaluator does (apps/eval/testing_util.py): tuples
# compare as lists, and an expected value wrapped in a one-item list also matches its item.
_CALL_CHECK = """\
_f = globals().get({name!r}) or getattr(globals()["Solution"](), {name!r})
_got = _f(*{args!r})
_got = list(_got) if isinstance(_got, tuple) else _got
_want = {want!r}
assert _got == _want or (isinstance(_want, list) and len(_want) == 1 and _got == _want[0])
"""


def _apps(row: dict, index: int, cols: Columns) -> dict:
    qcol, question = _take(row, ("question",), cols.prompt_key, required=True, what="the problem")
    ocol, io = _take(row, ("input_output",), None, required=True, what="the tests")
    if isinstance(io, str):
        if not io.strip():
            raise FormatError(f"field {ocol!r}: empty (the problem has no tests)")
        try:
            io = json.loads(io)
        except ValueError as err:
            raise FormatError(f"field {ocol!r}: not JSON ({err})") from None
    if not isinstance(io, dict) or not isinstance(io.get("inputs"), list) or not isinstance(io.get("outputs"), list):
        raise FormatError(f"field {ocol!r}: must hold 'inputs' and 'outputs' lists")
    inputs, outputs = io["inputs"], io["outputs"]
    if not inputs or len(inputs) != len(outputs):
        raise FormatError(f"field {ocol!r}: {len(inputs)} inputs and {len(outputs)} outputs (needs as many, >= 1)")
    name = io.get("fn_name")
    if name is not None:
        if not isinstance(name, str) or not name.isidentifier():
            raise FormatError(f"field {ocol!r}: fn_name {name!r} is not a function name")
        for args in inputs:
            if not isinstance(args, list):
                raise FormatError(f"field {ocol!r}: a call-based input must be a list of arguments, got {_kind(args)}")
        tests = [{"assert": _CALL_CHECK.format(name=name, args=args, want=want)} for args, want in zip(inputs, outputs)]
        how = f"Write the function `{name}`" + (" (in class Solution)" if "class Solution" in str(row.get("starter_code") or "") else "") + "."
    else:
        tests = [{"input": _lines(i), "output": _lines(o)} for i, o in zip(inputs, outputs)]
        how = "Read the input from standard input and write the answer to standard output."
    scol, starter = _take(row, ("starter_code",), None, required=False, what="")
    prompt = _text(qcol, question).strip() + f"\n\n{how} Give the whole Python program in a ```python code block."
    if starter and _text(scol, starter).strip():
        prompt += f"\n\nStart from:\n```python\n{starter.rstrip()}\n```"
    icol, rid = _ident(row, ("problem_id", "id", "name"), cols, index)
    return {"id": rid, "prompt": prompt, "task": "code", "tests": tests, **_rest(row, {qcol, ocol, icol})}


def _verl(row: dict, index: int, cols: Columns) -> dict:
    # verl's preprocessed rows (examples/data_preprocess/*.py; DAPO-Math-17k): the prompt is chat
    # messages (the question is the last user turn), the gold answer reward_model.ground_truth.
    pcol, messages = _take(row, ("prompt",), cols.prompt_key, required=True, what="the chat messages")
    if isinstance(messages, str):
        question = messages
    else:
        users = [m.get("content") for m in messages or () if isinstance(m, dict) and m.get("role") == "user"]
        if not users or not isinstance(users[-1], str):
            raise FormatError(f"field {pcol!r}: no user message with text content (verl rows hold chat messages)")
        question = users[-1]
    if cols.answer_key:
        acol, answer = _take(row, (), cols.answer_key, required=True, what="the gold answer")
    else:
        acol, model = _take(row, ("reward_model",), None, required=True, what="reward_model.ground_truth")
        if not isinstance(model, dict) or model.get("ground_truth") is None:
            raise FormatError(f"field {acol!r}: no 'ground_truth' in it")
        answer = model["ground_truth"]
    ability = str(row.get("ability") or "math").lower()
    if ability != "math":
        raise FormatError(f"field 'ability': {row.get('ability')!r}: data.format verl reads math rows (its "
                          "code rows' tests are not in a published layout r1mega reads)")
    icol, rid = _ident(row, ("id",), cols, index)
    return {"id": rid, "prompt": question, "task": "math", "answer": _numeric_answer(acol, answer),
            **_rest(row, {pcol, acol, icol})}


_ADAPTERS: dict[str, Callable[[dict, int, Columns], dict]] = {
    "r1mega": _r1mega, "gsm8k": _gsm8k, "math": _math, "aime": _competition, "amc": _competition,
    "deepscaler": _deepscaler, "openr1-math": _deepscaler, "humaneval": _humaneval, "mbpp": _mbpp, "apps": _apps,
    "taco": _apps, "verl": _verl,
}
assert set(_ADAPTERS) == set(FORMATS)


def adapt_row(format_name: str, row: Any, index: int, columns: Columns = Columns()) -> Any:
    """The r1mega row of published row `row` (the `index`-th of its file, 0-based) in format
    `format_name`; FormatError naming the published field it cannot read. A row that is not an
    object is returned as it is (the loader's validation names it)."""
    if not isinstance(row, dict):
        return row
    adapted = _ADAPTERS[format_name](row, index, columns)
    if format_name != "r1mega" and columns.task is not None and columns.task != adapted["task"]:
        raise FormatError(f"data.task {columns.task!r}: format {format_name!r} rows are {adapted['task']!r} tasks")
    return adapted


__all__ = ["FORMATS", "HUMANEVAL_INSTRUCTION", "Columns", "FormatError", "adapt_row"]
