"""Run model-written Python against tests, hardened against reward hacking.

Threat model and defences: docs/rewards-and-verifiers.md#threat-model.

Two modes:
- `run_io_tests`: one fresh sandboxed process per case, the input on stdin; the expected output never enters the
  candidate's process, and the comparison (whitespace-tolerant, by lines) happens here, on the trusted side.
- `run_assert_tests`: HumanEval/MBPP style (`check(candidate)` or bare asserts). The test code must run in the
  candidate's process; the verdict is protected by:
  - a result record written by the runner only after every test ran, carrying a random nonce that stays in an
    unread pipe until then (never in the process's memory while candidate code runs) — an exit status, printed
    text or an early `sys.exit`/`os._exit`/`atexit` hook never counts as success;
  - the test's asserts rewritten so compared values must be exact builtin types (no subclasses, no objects with
    a custom `__eq__`/`__bool__`/`__lt__`), compared by the runner: `AlwaysEqual` answers fail;
  - the test code runs with a snapshot of the builtins taken before the candidate ran (patching `builtins`
    does not reach the asserts), and the runner holds its own references to what it needs.
  - expected values held back: in `assert X == EXPECTED` where EXPECTED is a literal, or a constant expression
    of literals, operators and pure builtins (`2 * 2`, `sorted([3, 1])`, computed here in a killable worker),
    the candidate's process only sends X out and the comparison happens here: a forged record cannot match.
  Residual risk, by design unavoidable with in-process tests: where the expected side depends on the test's own
  functions or variables (it must run next to the candidate), a candidate that deliberately introspects the
  runner (walking frames or `gc`, finding its pipes in /proc/self/fd, patching imported modules such as `math`)
  can read the test's expected values or forge a record. The sandbox bounds what that gains: reward only.
"""

from __future__ import annotations

import ast
import atexit
import os
import secrets
from dataclasses import dataclass, field

from posttrain.verifiers.pool import WorkerPool
from posttrain.verifiers.sandbox import OUTPUT_CAP, RawRun, run_python

STATUSES = ("ok", "wrong", "error", "timeout", "memory", "killed")
IO_COMPARE_CAP = 1 << 20

_RUNNER = r"""
import os, sys
_write, _read, _close, _exit, _type, _dict = os.write, os.read, os.close, os._exit, type, dict
_all, _enumerate, _isinstance, _repr, _str, _len, _range = all, enumerate, isinstance, repr, str, len, range
_compile, _exec = compile, exec
_BaseException, _AssertionError, _MemoryError = BaseException, AssertionError, MemoryError
import builtins as _b
_pristine = _dict(_b.__dict__)
res_fd, sec_fd, entry = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
ncases, has_check = int(sys.argv[4]), sys.argv[5] == "1"
_src = sys.stdin.buffer.read()
_null = os.open("/dev/null", os.O_RDONLY)
os.dup2(_null, 0)
os.close(_null)
_nl = _src.index(b"\n")
_plen = int(_src[:_nl])
_program = compile(_src[_nl + 1:_nl + 1 + _plen].decode(), "program.py", "exec", dont_inherit=True, optimize=0)
_tests_src = _src[_nl + 1 + _plen:].decode()
del _src, _nl, _plen
_SCALARS = (int, float, bool, complex, str, bytes, _type(None), type)
_SEQS = (list, tuple, set, frozenset)
import operator as _op
_OPS = {"==": _op.eq, "!=": _op.ne, "<": _op.lt, "<=": _op.le, ">": _op.gt, ">=": _op.ge,
        "in": lambda a, b: a in b, "not in": lambda a, b: a not in b, "is": _op.is_, "is not": _op.is_not}

def _plain(v, depth=0):
    t = _type(v)
    if t in _SCALARS:
        return True
    if depth > 100:
        return False
    if t in _SEQS:
        return _all(_plain(x, depth + 1) for x in v)
    if t is dict:
        return _all(_plain(k, depth + 1) and _plain(x, depth + 1) for k, x in _dict.items(v))
    return False

def _pt_cmp(ops, values):
    for v in values:
        if not _plain(v):
            raise _AssertionError("compared value is not of an exact builtin type: " + _type(v).__name__)
    return _all(_OPS[o](values[i], values[i + 1]) for i, o in _enumerate(ops))

def _pt_truth(v):
    if not _plain(v):
        raise _AssertionError("asserted value is not of an exact builtin type: " + _type(v).__name__)
    return v

statuses = ["none"] * ncases
values = [""] * ncases

def _pt_out(i, v):
    if not _plain(v) or _type(v) is type:
        raise _AssertionError("returned value is not of an exact builtin type: " + _type(v).__name__)
    values[i] = _repr(v)

def _classify(e):
    if _isinstance(e, _AssertionError):
        return "wrong"
    if _isinstance(e, _MemoryError):
        return "memory"
    return "error"

def _pt_rec(i, e):
    statuses[i] = "ok" if e is None else _classify(e)

def _main():
    global _tests_src
    uncaught = "-"
    try:
        g = {"__name__": "candidate", "__builtins__": _b}
        _exec(_program, g)
        t = _dict(g)
        t.update(__builtins__=_pristine, __pt_cmp=_pt_cmp, __pt_truth=_pt_truth, __pt_rec=_pt_rec, __pt_out=_pt_out,
                 __name__="tests")
        tests = _compile(_tests_src, "tests.py", "exec", dont_inherit=True, optimize=0)
        _tests_src = None
        _exec(tests, t)
        if has_check:
            t["check"](t[entry])
    except _BaseException as e:
        uncaught = _classify(e)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except _BaseException:
            pass
    nonce = _read(sec_fd, 256).decode()
    parts = ["PTR1", nonce, uncaught, _str(ncases)]
    for i in _range(ncases):
        parts.append(statuses[i] + " " + _str(_len(values[i])))
        parts.append(values[i])
    _write(res_fd, ("\n".join(parts) + "\nEND\n").encode())
    _close(res_fd)
    _exit(0)

_main()
"""


@dataclass
class CodeResult:
    """The outcome of running a program against its tests."""

    passed: bool
    pass_fraction: float
    statuses: list[str] = field(default_factory=list)
    stdout: str = ""
    stderr: str = ""


def _strict_assert_test(node: ast.expr) -> ast.expr:
    """Rewrite an assert's condition so every comparison and truth test goes through the runner's strict helpers."""
    if isinstance(node, ast.BoolOp):
        return ast.BoolOp(op=node.op, values=[_strict_assert_test(v) for v in node.values])
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return ast.UnaryOp(op=node.op, operand=_strict_assert_test(node.operand))
    if isinstance(node, ast.Compare):
        names = {
            ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=",
            ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not",
        }  # fmt: skip
        ops = ast.Tuple(elts=[ast.Constant(names[type(o)]) for o in node.ops], ctx=ast.Load())
        values = ast.Tuple(elts=[node.left, *node.comparators], ctx=ast.Load())
        return ast.Call(func=ast.Name("__pt_cmp", ast.Load()), args=[ops, values], keywords=[])
    return ast.Call(func=ast.Name("__pt_truth", ast.Load()), args=[node], keywords=[])


class _AssertRewriter(ast.NodeTransformer):
    def visit_Assert(self, node: ast.Assert) -> ast.Assert:
        return ast.Assert(test=_strict_assert_test(node.test), msg=node.msg)


def _rec(index: int, arg: ast.expr) -> ast.Expr:
    return ast.Expr(ast.Call(ast.Name("__pt_rec", ast.Load()), [ast.Constant(index), arg], []))


def _wrap_case(stmt: ast.stmt, index: int) -> ast.Try:
    """`try: <stmt>; rec(i, None) except Exception as e: rec(i, e)`: one recorded case per top-level assert."""
    handler = ast.ExceptHandler(
        type=ast.Name("Exception", ast.Load()), name="__pt_e", body=[_rec(index, ast.Name("__pt_e"))]
    )
    return ast.Try(body=[stmt, _rec(index, ast.Constant(None))], handlers=[handler], orelse=[], finalbody=[])


def _literal(node: ast.expr) -> tuple[bool, object]:
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


_FOLDABLE_NAMES = frozenset(
    "abs all any bool bytes chr complex dict divmod float frozenset int len list max min ord pow range round set "
    "sorted str sum tuple".split()
)
_FOLDABLE_NODES = (
    ast.Expression, ast.Constant, ast.Name, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Call, ast.List,
    ast.Tuple, ast.Set, ast.Dict, ast.keyword, ast.IfExp, ast.Subscript, ast.Slice,
    ast.operator, ast.unaryop, ast.boolop, ast.cmpop, ast.expr_context,
)  # fmt: skip
_EXACT_SCALARS = (int, float, bool, complex, str, bytes, type(None))


def _foldable(node: ast.expr) -> bool:
    """Whether `node` is an expression of literals, operators and a few pure builtins (no other names, no
    attributes): its value does not depend on the program, so it can be computed without it."""
    for sub in ast.walk(node):
        if not isinstance(sub, _FOLDABLE_NODES):
            return False
        if isinstance(sub, ast.Name) and sub.id not in _FOLDABLE_NAMES:
            return False
        if isinstance(sub, ast.Call) and not isinstance(sub.func, ast.Name):
            return False
    return True


def _exact(value: object, depth: int = 0) -> bool:
    """Made only of exact builtin scalar and container types (what a literal can spell)."""
    kind = type(value)
    if kind in _EXACT_SCALARS:
        return True
    if depth > 50:
        return False
    if kind in (list, tuple, set, frozenset):
        return all(_exact(item, depth + 1) for item in value)
    if kind is dict:
        return all(_exact(k, depth + 1) and _exact(v, depth + 1) for k, v in value.items())
    return False


def fold_constant(source: str) -> object:
    """Evaluate a `_foldable` expression with only the whitelisted builtins (runs in a pool worker: a huge
    `10**10**10` or `[0] * 10**10` is killed by its timeout or memory cap, not computed here)."""
    import builtins

    tree = ast.parse(source, mode="eval")
    if not _foldable(tree):
        raise ValueError("not a constant expression")
    names = {name: getattr(builtins, name) for name in _FOLDABLE_NAMES}
    value = eval(compile(tree, "<expected>", "eval"), {"__builtins__": names}, {})
    if not _exact(value):
        raise ValueError(f"not a plain value: {type(value).__name__}")
    return value


_FOLD_POOL: WorkerPool | None = None
_FOLD_POOL_PID = 0


def _fold(node: ast.expr) -> tuple[bool, object]:
    """(True, value) for a constant expected side (`2 * 2`, `sorted([3, 1])`), computed outside the candidate's
    process in a killable worker; (False, None) when it is not one or does not finish within a second."""
    global _FOLD_POOL, _FOLD_POOL_PID
    if not _foldable(node):
        return False, None
    if _FOLD_POOL is None or _FOLD_POOL_PID != os.getpid():  # one per process (a forked child starts its own)
        _FOLD_POOL, _FOLD_POOL_PID = (
            WorkerPool(f"{__name__}:fold_constant", workers=1, memory_limit_mb=512),
            os.getpid(),
        )
        atexit.register(_FOLD_POOL.close)
    result = _FOLD_POOL.call(ast.unparse(node), timeout=1.0)
    return (True, result.value) if result.status == "ok" and _exact(result.value) else (False, None)


def _outsourced(stmt: ast.Assert) -> tuple[ast.expr, object] | None:
    """For `assert X == EXPECTED` (either way round), where EXPECTED is a literal or a constant expression of
    literals and pure builtins: X and EXPECTED's value, which then stays on the trusted side."""
    test = stmt.test
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return None
    left, right = test.left, test.comparators[0]
    (lok, lval), (rok, rval) = _literal(left), _literal(right)
    if not lok and not rok:
        if _foldable(right) and not _foldable(left):
            rok, rval = _fold(right)
        elif _foldable(left) and not _foldable(right):
            lok, lval = _fold(left)
    if rok and not lok:
        return left, rval
    if lok and not rok:
        return right, lval
    return None


@dataclass
class PreparedTests:
    """Hardened test source: `ncases` recorded cases, `expected[i]` held back here for outsourced ones."""

    source: str
    ncases: int
    has_check: bool
    expected: dict[int, object]


def prepare_tests(test: str) -> PreparedTests:
    """Rewrite test code: top-level `assert X == EXPECTED` (a literal or constant expression, see `_outsourced`)
    become "send X out" (compared here); other asserts go through strict exact-type comparisons; each top-level
    assert (module or `check` body) is a recorded case."""
    tree = ast.parse(test)
    count = 0
    expected: dict[int, object] = {}

    def wrap_body(body: list[ast.stmt]) -> list[ast.stmt]:
        nonlocal count
        out: list[ast.stmt] = []
        for stmt in body:
            if isinstance(stmt, ast.Assert):
                split = _outsourced(stmt)
                if split is not None:
                    expected[count] = split[1]
                    call = ast.Call(ast.Name("__pt_out", ast.Load()), [ast.Constant(count), split[0]], [])
                    stmt = ast.Expr(call)
                out.append(_wrap_case(stmt, count))
                count += 1
            else:
                out.append(stmt)
        return out

    tree.body = wrap_body(tree.body)
    has_check = False
    for stmt in tree.body:
        if isinstance(stmt, ast.FunctionDef) and stmt.name == "check":
            has_check = True
            stmt.body = wrap_body(stmt.body)
    tree = _AssertRewriter().visit(tree)
    ast.fix_missing_locations(tree)
    return PreparedTests(ast.unparse(tree), count, has_check, expected)


def _process_status(raw: RawRun) -> str:
    """The status of a run that produced no verdict of its own."""
    if raw.timed_out:
        return "timeout"
    rc = raw.returncode or 0
    sig = -rc if rc < 0 else rc - 128 if rc > 128 else 0
    if sig == 24:  # SIGXCPU: the CPU-seconds limit
        return "timeout"
    if b"MemoryError" in raw.stderr:
        return "memory"
    if sig == 9:
        return "killed"
    return "error"


def _text(data: bytes) -> str:
    return data[:OUTPUT_CAP].decode("utf-8", errors="replace")


def _result(statuses: list[str], raw: RawRun | None) -> CodeResult:
    ok = sum(s == "ok" for s in statuses)
    return CodeResult(
        passed=bool(statuses) and ok == len(statuses),
        pass_fraction=ok / len(statuses) if statuses else 0.0,
        statuses=statuses,
        stdout=_text(raw.stdout) if raw else "",
        stderr=_text(raw.stderr) if raw else "",
    )


def _parse_record(data: bytes, nonce: str, ncases: int) -> tuple[list[str], list[str], str | None] | None:
    """(statuses, value reprs, uncaught) from the runner's record; None unless it is exactly one well-formed
    record carrying our nonce."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    head = text.split("\n", 4)
    if len(head) < 5 or head[0] != "PTR1" or not secrets.compare_digest(head[1], nonce) or head[3] != str(ncases):
        return None
    uncaught = None if head[2] == "-" else head[2]
    if uncaught is not None and uncaught not in STATUSES:
        return None
    rest, statuses, values = head[4], [], []
    for _ in range(ncases):
        line, sep, rest = rest.partition("\n")
        status, _, length = line.partition(" ")
        if not sep or status not in (*STATUSES, "none") or not length.isdigit() or len(rest) < int(length) + 1:
            return None
        values.append(rest[: int(length)])
        if rest[int(length)] != "\n":
            return None
        rest = rest[int(length) + 1 :]
        statuses.append(status)
    if rest != "END\n":
        return None
    return statuses, values, uncaught


def _same(actual: str, expected: object) -> bool:
    """The candidate's value (the repr of exact builtin types) equals the held-back literal."""
    try:
        value = ast.literal_eval(actual)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    try:
        return bool(value == expected)
    except Exception:
        return False


def run_assert_tests(
    program: str, test: str, entry_point: str, timeout: float, allow_unsandboxed: bool = False
) -> CodeResult:
    """Run `program`, then `test` (bare asserts, or a `check(candidate)` called with `entry_point`), sandboxed
    (`SandboxUnavailable` without bubblewrap, unless `allow_unsandboxed`: see `verifiers.sandbox`).

    One status per top-level assert (of the module or of `check`'s body); an exception escaping elsewhere marks
    the cases not reached (or, if all were, one extra case) with its status. Passed only on a verified record.
    """
    try:
        prepared = prepare_tests(test)
    except SyntaxError as e:
        raise ValueError(f"test code does not parse: {e}") from e
    ncases = prepared.ncases
    try:
        compile(program, "program.py", "exec")
    except (SyntaxError, ValueError):
        return CodeResult(False, 0.0, ["error"] * max(ncases, 1), "", "SyntaxError in program")
    nonce = secrets.token_hex(16)
    program_bytes = program.encode("utf-8", errors="replace")
    payload = str(len(program_bytes)).encode() + b"\n" + program_bytes + prepared.source.encode()
    raw = run_python(
        {"runner.py": _RUNNER},
        "runner.py",
        args=[entry_point or "", str(ncases), "1" if prepared.has_check else "0"],
        stdin=payload,
        timeout=timeout,
        result_pipe=True,
        secret=nonce.encode(),
        allow_unsandboxed=allow_unsandboxed,
    )
    parsed = _parse_record(raw.extra.get(0, b""), nonce, ncases)
    if parsed is None:
        return _result([_process_status(raw)] * max(ncases, 1), raw)
    statuses, values, uncaught = parsed
    for i, exp in prepared.expected.items():
        if statuses[i] == "ok" and not _same(values[i], exp):
            statuses[i] = "wrong"
    if uncaught is not None:
        if all(s != "none" for s in statuses):
            statuses.append(uncaught)
        statuses = [uncaught if s == "none" else s for s in statuses]
    statuses = ["error" if s == "none" else s for s in statuses] or ["ok"]
    return _result(statuses, raw)


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def outputs_match(actual: str, expected: str) -> bool:
    """Equal as lists of right-stripped lines, trailing empty lines ignored."""
    return _lines(actual) == _lines(expected)


def run_io_tests(
    program: str, cases: list[tuple[str, str]], timeout: float, allow_unsandboxed: bool = False
) -> CodeResult:
    """Run `program` once per (stdin, expected stdout) case, each in a fresh sandbox; compare here.
    `SandboxUnavailable` without bubblewrap, unless `allow_unsandboxed` (see `verifiers.sandbox`)."""
    statuses: list[str] = []
    shown: RawRun | None = None
    for stdin, expected in cases:
        raw = run_python({"program.py": program}, "program.py", stdin=stdin.encode(), timeout=timeout,
                         stdout_cap=IO_COMPARE_CAP, allow_unsandboxed=allow_unsandboxed)  # fmt: skip
        if raw.timed_out or raw.returncode != 0:
            status = _process_status(raw)
        elif raw.stdout_truncated:
            status = "wrong"
        else:
            status = "ok" if outputs_match(raw.stdout.decode("utf-8", errors="replace"), expected) else "wrong"
        statuses.append(status)
        if shown is None and status != "ok" or shown is None and len(statuses) == len(cases):
            shown = raw
    return _result(statuses, shown)
