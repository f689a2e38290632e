"""Jinja2's immutable sandbox with a budget per render: time, and size.

Jinja2's sandbox stops escapes (private attributes, unsafe callables), not exhaustion: a template
can loop for hours (``{% for i in range(99999) %}{% for j in range(99999) %}``) or build a
gigabyte (``{{ 'x' * 10**9 }}``) on a replica shared by a whole shard. Contract: ``render`` of a
template compiled by ``compile_template`` raises ``RenderLimit`` when

- it runs longer than ``RENDER_SECONDS``: the clock is read on every loop iteration, call,
  attribute or item lookup, operator and output piece (the parsed template is rewritten so that
  loops, output and ``~`` pass through guards; calls and lookups are the sandbox's own hooks);
- it writes, or builds a value, of more than ``MAX_PROMPT_CHARS`` plus four times the row's own
  text (characters; items for lists): output is counted at every depth (``{% set %}`` blocks,
  macros), and the operations that multiply sizes are checked *before* they run: ``*``, ``+``,
  ``**`` and integer ``*`` (``MAX_INT_BITS``), ``%`` and ``str.format`` widths, ``ljust`` /
  ``center`` / ``zfill`` / ``expandtabs`` / ``replace`` / ``join``, and the filters ``center``,
  ``indent``, ``wordwrap``, ``replace``, ``join``, ``format``, ``batch``, ``slice``, ``tojson``.

Limits of this approach: one builtin call cannot be interrupted, so a quadratic builtin not in
the list above (e.g. ``sum`` over lists) can still run past the deadline; linear ones are bounded
by their checked inputs. No constant folding: Jinja2 would otherwise run template code at
compile time, outside the budget.
"""

from __future__ import annotations

import math
import re
import time
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

from jinja2 import StrictUndefined, nodes, pass_context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

# A template renders in microseconds; seconds mean it loops. Per row, so a template that loops
# on every row costs this much per row, not the shard's whole time. CPU time of the rendering
# thread, not wall time: a busy machine or a paused process must not turn a good row into an
# error row on one attempt and not on the next.
RENDER_SECONDS = 2.0
# Rendered text beyond the row's own data: far more than any context window holds.
MAX_PROMPT_CHARS = 1 << 20
MAX_INT_BITS = 1 << 16  # numbers a template computes (``9 ** (9 ** 9)`` would run for hours)


_LIMIT_RULE = f"{MAX_PROMPT_CHARS:,} plus 4 times the row's own text"


class RenderLimit(Exception):
    """The template ran out of its time or size budget on this row."""


# -- resource budget per render -----------------------------------------------------------------


@dataclass
class _Budget:
    """One render's limits: a deadline, and a size no value or output may pass. ``output``
    counts every character any output statement wrote, at any depth (blocks, macros, loops),
    so text buffered inside ``{% set %}`` blocks is bounded too."""

    seconds: float
    max_chars: int
    deadline: float = math.inf
    output: int = 0
    ticks: int = 0

    def tick(self) -> None:
        # Reading the thread's CPU clock is a system call: look at it every 64th step only.
        self.ticks += 1
        if self.ticks & 63 == 0 and time.thread_time() > self.deadline:
            raise RenderLimit(f"template took longer than {self.seconds:g} s to render this row; "
                              "it loops too long (a template should only arrange the row's text)")

    def check(self, value: Any) -> Any:
        self.tick()
        size = _size(value, self.max_chars)
        if size > self.max_chars:
            self.refuse(size, "a value")
        return value

    def refuse(self, size: int, what: str) -> None:
        raise RenderLimit(f"template would build {what} of {size:,} characters (or items), more "
                          f"than the limit of {self.max_chars:,} for this row ({_LIMIT_RULE})")

    def allow(self, size: int, what: str) -> None:
        """Refuse an operation before it builds a value of ``size``."""
        if size > self.max_chars:
            self.refuse(size, what)

    def count_output(self, text: str) -> None:
        self.output += len(text)
        if self.output > self.max_chars:
            raise RenderLimit(f"rendered prompt is over {self.max_chars:,} characters, more than "
                              f"the limit for this row ({_LIMIT_RULE})")


_BUDGET: ContextVar[_Budget | None] = ContextVar("batchgen_render_budget", default=None)


def _budget() -> _Budget:
    # Outside render() (compile-time constant folding) the size limit still holds.
    return _BUDGET.get() or _Budget(RENDER_SECONDS, MAX_PROMPT_CHARS)


def _size(value: Any, cap: float = math.inf) -> int:
    """Characters and items ``value`` spells out when printed, counting a list that repeats one
    object as often as it repeats it (``[[s] * 1000] * 1000`` is small in memory, not in print).
    Stops counting past ``cap``, so it costs at most ``cap`` steps."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if not isinstance(value, (list, tuple, dict, set, frozenset)):
        return 1
    total, stack = 0, [value]
    while stack and total <= cap:
        item = stack.pop()
        if isinstance(item, (str, bytes)):
            total += len(item)
        elif isinstance(item, dict):
            total += 1 + len(item)
            stack += item.values()
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += 1 + len(item)
            stack += item
        else:
            total += 1
    return total


def _arg(args: tuple, kwargs: dict, pos: int, name: str, default: Any = None) -> Any:
    return args[pos] if len(args) > pos else kwargs.get(name, default)


def _width(value: Any) -> int:
    return value if isinstance(value, int) else len(value) if isinstance(value, str) else 0


def _lines(text: Any) -> int:
    return text.count("\n") + 1 if isinstance(text, str) else 1


_PERCENT_SPEC = re.compile(r"%[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?")
_FORMAT_SPEC = re.compile(r"\{[^{}]*:([^{}]*)\}")


def _check_format(b: _Budget, fmt: Any, args: Any, percent: bool) -> None:
    """Widths and precisions in a format string (``'%999999999s'``, ``'{:>999999999}'``), and
    widths taken from the arguments, are sizes the formatted text will have."""
    if not isinstance(fmt, str):
        return
    if percent:
        numbers = [n for m in _PERCENT_SPEC.findall(fmt) for n in m]
        takes_args = "*" in numbers
    else:
        numbers = [n for spec in _FORMAT_SPEC.findall(fmt) for n in re.findall(r"\d+", spec)]
        takes_args = "{" in "".join(_FORMAT_SPEC.findall(fmt)) or re.search(r":[^}]*\{", fmt)
    sizes = [int(n) for n in numbers if n.isdigit()]
    if takes_args:
        values = args if isinstance(args, (tuple, list)) else [args]
        values = list(values) + (list(args.values()) if isinstance(args, dict) else [])
        sizes += [v for v in values if isinstance(v, int)]
    b.allow(max(sizes, default=0), "a formatted field")


def _check_binop(b: _Budget, op: str, left: Any, right: Any) -> None:
    seqs = (str, bytes, list, tuple)
    if op == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, seqs) and isinstance(n, int) and n > 0:
                b.allow(_size(seq, b.max_chars // n + 1) * n, "a repeated sequence ('*')")
        if isinstance(left, int) and isinstance(right, int):
            _check_bits(left.bit_length() + right.bit_length(), "*")
    elif op == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
        _check_bits(right * left.bit_length(), "**")
    elif op == "+" and isinstance(left, seqs) and isinstance(right, seqs):
        b.allow(_size(left, b.max_chars) + _size(right, b.max_chars), "a concatenation ('+')")
    elif op == "%" and isinstance(left, str):
        _check_format(b, left, right, percent=True)


def _check_bits(bits: int, op: str) -> None:
    if bits > MAX_INT_BITS:
        raise RenderLimit(f"template would compute a number of about {bits:,} bits with {op!r}, "
                          f"more than the limit of {MAX_INT_BITS:,}")


def _check_str_method(b: _Budget, method: Any, args: tuple, kwargs: dict) -> tuple:
    """Builtin str methods whose result can be far larger than their inputs; returns the
    arguments to call with (``join`` gets its items as a list, counted)."""
    owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
    if not isinstance(owner, (str, bytes)):
        return args
    if name in ("ljust", "rjust", "center", "zfill"):
        b.allow(_width(_arg(args, kwargs, 0, "width", 0)), f"a padded text ({name})")
    elif name == "expandtabs":
        b.allow(len(owner) * _width(_arg(args, kwargs, 0, "tabsize", 8)), "expanded tabs")
    elif name == "replace":
        _check_replace(b, owner, _arg(args, kwargs, 0, "old"), _arg(args, kwargs, 1, "new"))
    elif name == "join" and args:
        return (_check_join(b, args[0], owner), *args[1:])
    return args


def _check_join(b: _Budget, items: Any, separator: Any) -> Any:
    """A separator repeated between many items (``range(100000)|join(big)``) is a product."""
    if not isinstance(items, (str, bytes, list, tuple, dict, set, frozenset)):
        items = list(_ticking(items)) if hasattr(items, "__iter__") else items
    if hasattr(items, "__len__"):
        b.allow(_width(separator) * len(items) + _size(items, b.max_chars), "a joined text")
    return items


def _check_replace(b: _Budget, text: Any, old: Any, new: Any) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        hits = len(text) + 1 if not old else text.count(old)
        b.allow(len(text) + hits * max(0, len(new) - len(old)), "a replaced text (replace)")


# Filters whose result can be far larger than their input, checked before they run.
_FILTER_CHECKS: dict[str, Callable[[_Budget, tuple, dict], tuple | None]] = {
    "center": lambda b, a, k: b.allow(_width(_arg(a, k, 1, "width", 80)), "a centered text"),
    "indent": lambda b, a, k: b.allow(
        _size(a[0]) + _lines(a[0]) * _width(_arg(a, k, 1, "width", 4)), "an indented text"),
    "wordwrap": lambda b, a, k: b.allow(
        _size(a[0]) + _size(a[0]) // max(1, _width(_arg(a, k, 1, "width", 79)))
        * _width(_arg(a, k, 3, "wrapstring", "")), "a wrapped text"),
    "replace": lambda b, a, k: _check_replace(b, a[0], _arg(a, k, 1, "old"), _arg(a, k, 2, "new")),
    "join": lambda b, a, k: (_check_join(b, a[0], _arg(a, k, 1, "d", "")), *a[1:]),
    "format": lambda b, a, k: _check_format(b, a[0], a[1:] or k, percent=True),
    "batch": lambda b, a, k: b.allow(_width(_arg(a, k, 1, "linecount", 0)), "a batch"),
    "slice": lambda b, a, k: b.allow(_width(_arg(a, k, 1, "slices", 0)), "a slice count"),
    "tojson": lambda b, a, k: b.allow(_width(_arg(a, k, 1, "indent", 0)) * 1024, "a JSON indent"),
}


def _guarded_filter(name: str, func: Callable) -> Callable:
    """A builtin filter behind the budget. Marked ``pass_context`` so that Jinja2 never runs it
    at compile time (constant folding), outside the budget."""
    pass_arg = getattr(getattr(func, "jinja_pass_arg", None), "name", None)
    check = _FILTER_CHECKS.get(name)

    @pass_context
    def guarded(context, *args, **kwargs):
        b = _budget()
        b.tick()
        if check is not None and args:
            args = check(b, args, kwargs) or args
        first = {"context": (context,), "eval_context": (context.eval_ctx,),
                 "environment": (context.environment,)}.get(pass_arg, ())
        return b.check(func(*first, *args, **kwargs))

    guarded.__name__ = getattr(func, "__name__", name)
    return guarded


def _ticking(iterable: Any):
    b = _budget()
    for item in iterable:
        b.tick()
        yield item


@pass_context
def _guard_loop(context, iterable):
    return _ticking(iterable)


@pass_context
def _guard_output(context, value):
    b = _budget()
    text = value if isinstance(value, str) else str(b.check(value))
    b.tick()
    b.count_output(text)
    return text


@pass_context
def _guard_size(context, value):
    return _budget().check(value)


_LOOP, _OUTPUT, _SIZE = "batchgen_guard_loop", "batchgen_guard_output", "batchgen_guard_size"


class _GuardNodes(NodeTransformer):
    """Rewrites a parsed template so that every loop iteration, every output piece and every
    ``~`` concatenation passes through the budget (nothing else in Jinja2 is called there)."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self.generic_visit(node)
        node.iter = _wrap(node.iter, _LOOP)
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        node = self.generic_visit(node)
        node.nodes = [_wrap(child, _OUTPUT) for child in node.nodes]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        return _wrap(self.generic_visit(node), _SIZE)


def _wrap(node: nodes.Expr, guard: str) -> nodes.Filter:
    return nodes.Filter(node, guard, [], [], None, None, lineno=node.lineno)


class GuardedEnvironment(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox, plus the budget on everything a template can repeat or grow."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self) -> None:
        # optimized=False: no constant folding, which would run template code at compile time.
        super().__init__(undefined=StrictUndefined, autoescape=False, optimized=False)
        self.filters = {name: _guarded_filter(name, f) for name, f in self.filters.items()}
        self.filters.update({_LOOP: _guard_loop, _OUTPUT: _guard_output, _SIZE: _guard_size})
        del self.globals["lipsum"]  # lipsum(n=10**9) loops inside Python, out of our reach

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - mirrors Jinja2's
        b = _budget()
        b.tick()
        args = _check_str_method(b, __obj, args, kwargs)
        return b.check(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, operator, left, right):
        b = _budget()
        b.tick()
        _check_binop(b, operator, left, right)
        return b.check(super().call_binop(context, operator, left, right))

    def getattr(self, obj, attribute):
        _budget().tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _budget().tick()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = value.__self__

        def checked(*args, **kwargs):
            _check_format(_budget(), fmt, args + tuple(kwargs.values()), percent=False)
            return _budget().check(wrapped(*args, **kwargs))

        return checked


@lru_cache(maxsize=1)
def environment() -> GuardedEnvironment:
    return GuardedEnvironment()


def compile_template(ast: nodes.Template) -> Any:
    """A parsed template (``environment().parse``), guarded and compiled."""
    return environment().from_string(_GuardNodes().visit(ast))


def render(compiled: Any, row: dict[str, Any]) -> str:
    """Render within the budget; raises RenderLimit, or whatever the template raises."""
    budget = _Budget(RENDER_SECONDS, MAX_PROMPT_CHARS + 4 * _size(row))
    budget.deadline = time.thread_time() + RENDER_SECONDS
    token = _BUDGET.set(budget)
    try:
        return "".join(compiled.generate(**row))
    finally:
        _BUDGET.reset(token)
