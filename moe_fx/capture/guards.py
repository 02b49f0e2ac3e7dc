"""What `apply`'s capture of a block assumed about its inputs, checked on every call.

`apply` exports each block's owner once, on the example call. Dynamo's default capture would fit the graph
to that example more tightly than the block needs: equal sizes share one symbol (duck sizing: an example
with batch == seq captures a graph that reshapes by one size for both, which fails or misreads a call where
they differ) and sizes 0 and 1 are constants (a decode-shaped example, one token, captures a graph for one
token only). `capturing` turns both off, so each input size is its own symbol; where the owner's code cannot
be traced so, `apply` falls back through the other ways of `CAPTURES`, each fixing more.

What the capture still assumed is a guard here (`CaptureGuards`): each input's dtype and device, its fixed
sizes, a Python constant's value, sizes that tracing found equal (one symbol in two places), and the
conditions on sizes the traced Python code branched on (`if x.shape[0] > 4:`: the graph holds one branch).
A call that breaks one runs the original block, with the reason. Conditions Dynamo met while running an
op's fake implementation (einsum choosing a strategy for a size of 1, a reshape's stride checks), or while
`torch._dynamo.export` ran the traced graph once more on fake tensors, are not guards here: they shape that
op's metadata only, and the graph calls the op itself, on any size.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from dataclasses import dataclass

import sympy
import torch
import torch._dynamo.utils as dynamo_utils
import torch.fx.experimental._config as fx_config
from torch.utils._sympy.printers import PythonPrinter

# .capture: the `Capture` a `capturing` block in this thread fills (the guards an op's fake run added, those the
# traced code had added when tracing ended)
_local = threading.local()
_install_lock = threading.Lock()


def _recording_run_node(run_node):
    """Dynamo's `run_node` (an op on fake tensors, to learn its output's metadata), noting the shape guards it
    adds while a `capturing` block records in this thread."""

    def run(tracer, *args, **kwargs):
        capture = getattr(_local, "capture", None)
        guards = getattr(getattr(tracer, "shape_env", None), "guards", None)
        if capture is None or guards is None:
            return run_node(tracer, *args, **kwargs)
        before = len(guards)
        try:
            return run_node(tracer, *args, **kwargs)
        finally:
            capture.meta.update(id(g) for g in guards[before:])

    run._moe_fx_records = True
    return run


def _recording_user_compiler(call_user_compiler):
    """Dynamo's `OutputGraph.call_user_compiler` (tracing is over, the backend gets the graph), noting the shape
    guards that exist by then while a `capturing` block records in this thread. `torch._dynamo.export`'s backend
    then runs the graph once more on fake tensors, under the Python dispatcher, whose decompositions add guards
    of their own (a one-token example's einsum of gates by stacked expert outputs: Eq(D·T², D·T), true for T=1
    only): an op's metadata again, not the traced code's branches."""

    def call(self, *args, **kwargs):
        capture = getattr(_local, "capture", None)
        if capture is not None:
            capture.traced = {id(g) for g in self.shape_env.guards}
        return call_user_compiler(self, *args, **kwargs)

    call._moe_fx_records = True
    return call


def _install() -> bool:
    """Wrap Dynamo's `run_node` and `OutputGraph.call_user_compiler` once (transparent outside `capturing`).
    False on a torch without `run_node`: every condition then counts as one the code branched on (more calls
    run the original block, none wrongly); without `call_user_compiler`, those export's second fake run adds do."""
    from torch._dynamo.output_graph import OutputGraph

    with _install_lock:
        call_user_compiler = getattr(OutputGraph, "call_user_compiler", None)
        if call_user_compiler is not None and not getattr(call_user_compiler, "_moe_fx_records", False):
            OutputGraph.call_user_compiler = _recording_user_compiler(call_user_compiler)
        run_node = getattr(dynamo_utils, "run_node", None)
        if run_node is None:
            return False
        if not getattr(run_node, "_moe_fx_records", False):
            dynamo_utils.run_node = _recording_run_node(run_node)
        return True


@dataclass(frozen=True)
class Assumed:
    """What a capture assumed about sizes beyond the example's fixed ones."""

    branched: tuple = ()  # conditions on sizes the traced code branched on (sympy, in the sizes' symbols)
    least_size: int = 0  # every symbolic size at least this: 2 under Dynamo's default capture, which decides
    # a branch on a size as if it were >= 2 (0 and 1 are constants to it), without a guard


class Capture:
    """Filled by `capturing`: the ids of the shape guards that only an op's fake run needed (`meta`), and of
    those that existed when tracing ended (`traced`; None where the hook did not run: then every guard counts)."""

    def __init__(self, least_size: int):
        self.meta: set[int] = set()
        self.traced: set[int] | None = None
        self.least_size = least_size

    def assumed(self, gm: torch.fx.GraphModule) -> Assumed:
        env = _shape_env(gm)  # each condition in the symbols the sizes are now (`x.shape[-1] == 64` once fixed: True)
        guards = [] if env is None else [g for g in env.guards if id(g) not in self.meta]
        if self.traced is not None:
            guards = [g for g in guards if id(g) in self.traced]
        return Assumed(tuple(env.replace(g.expr) for g in guards), self.least_size)


# How `apply` captures a block's owner, in the order it tries them (the next when one cannot trace the owner or
# yields fewer blocks): every size a symbol, sizes 0 and 1 included (range >= 0; a one-token example serves every
# size); the same with the sizes of 1 fixed where another input of the same rank is larger in that dimension
# (code that broadcasts a size-1 tensor against a larger one, such as rotary embeddings of batch 1 against
# hidden states of batch 2, cannot be traced with that 1 a symbol; a one-token sequence stays symbolic); with
# every size of 1 fixed; Dynamo's default (sizes 0 and 1 fixed, every symbol taken to be >= 2)
CAPTURES = ("every_size", "broadcast_ones_fixed", "ones_fixed", "dynamo")


@contextlib.contextmanager
def capturing(mode: str = "every_size", example: list = ()):
    """Yields the `Capture` that tells the traced code's own conditions on sizes from those of ops' fake runs;
    mode: one of CAPTURES, example: the call's leaves (whose sizes of 1 the "*ones_fixed" modes fix)."""
    oblivious = mode != "dynamo" and "backed_size_oblivious" in fx_config._config  # torch >= 2.7
    capture = Capture(least_size=0 if oblivious else 2)
    patch = {"use_duck_shape": mode == "dynamo"}
    if oblivious:
        patch["backed_size_oblivious"] = True
    recording = _install()
    previous = getattr(_local, "capture", None)
    _local.capture = capture if recording else None
    try:
        with fx_config.patch(patch), _static_sizes(ones_fixed(mode, example)):
            yield capture
    finally:
        _local.capture = previous


def ones_fixed(mode: str, example: list) -> list[tuple[torch.Tensor, list[int]]]:
    """(tensor, its dims of size 1) that capture `mode` fixes among the call's leaves `example`: every size of 1
    ("ones_fixed"), those where another tensor of the same rank is larger ("broadcast_ones_fixed"), none else."""
    tensors = [t for t in example if isinstance(t, torch.Tensor)]
    if mode == "ones_fixed":
        fixed = [(t, [d for d, s in enumerate(t.shape) if s == 1]) for t in tensors]
    elif mode == "broadcast_ones_fixed":

        def broadcast(t, d):
            return any(u is not t and u.dim() == t.dim() and u.shape[d] > 1 for u in tensors)

        fixed = [(t, [d for d, s in enumerate(t.shape) if s == 1 and broadcast(t, d)]) for t in tensors]
    else:
        return []
    return [(t, dims) for t, dims in fixed if dims]


@contextlib.contextmanager
def _static_sizes(fixed: list[tuple[torch.Tensor, list[int]]]):
    """The tensors' listed dims static while tracing (`torch._dynamo.mark_static`), their marks restored after."""
    attrs = ("_dynamo_static_indices", "_has_dynamo_dim_marking")
    saved = [{a: copy.copy(getattr(t, a)) for a in attrs if hasattr(t, a)} for t, _ in fixed]
    for t, dims in fixed:
        torch._dynamo.mark_static(t, dims)
    try:
        yield
    finally:
        for (t, _), marks in zip(fixed, saved):
            for a in attrs:
                if a in marks:
                    setattr(t, a, marks[a])
                elif hasattr(t, a):
                    delattr(t, a)


def _fake(node: torch.fx.Node):
    return node.meta.get("val", node.meta.get("example_value"))


def _shape_env(gm: torch.fx.GraphModule):
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        fake = _fake(node)
        sizes = fake.shape if isinstance(fake, torch.Tensor) else (fake,)
        for s in sizes:
            if isinstance(s, torch.SymInt):
                return s.node.shape_env
    return None


def _static(size) -> int | None:
    """A size's value when the capture fixed it (an int, or a symbol that tracing set equal to one)."""
    return size if isinstance(size, int) else size.node.maybe_as_int()


class CaptureGuards:
    """The example's properties a graph was captured for, per graph input (placeholder order)."""

    def __init__(self, gm: torch.fx.GraphModule, example: list, assumed: Assumed):
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.fixed: list[tuple[int, object]] = []  # (input, (dtype, device, sizes) or a constant's value)
        symbolic: list[tuple[int, int | None, sympy.Expr]] = []  # (input, dim or None: an int, its size)
        for i, (node, ex) in enumerate(zip(placeholders, example)):
            fake = _fake(node)
            if isinstance(ex, torch.Tensor) and isinstance(fake, torch.Tensor):
                sizes = tuple(map(_static, fake.shape))
                self.fixed.append((i, (ex.dtype, ex.device, sizes)))
                symbolic += [(i, d, s.node.expr) for d, s in enumerate(fake.shape) if sizes[d] is None]
            elif not isinstance(ex, torch.Tensor):
                self.fixed.append((i, ex))
                if isinstance(fake, torch.SymInt) and _static(fake) is None:
                    symbolic.append((i, None, fake.node.expr))
        # each symbol's value is read off the first size that is that symbol alone; every other symbolic size
        # (the same symbol again, or an expression in symbols) and every condition the code branched on is
        # checked against those values
        self._bind: dict[sympy.Symbol, tuple[int, int | None]] = {}
        ties: list[tuple[int, int | None, sympy.Expr]] = []
        for i, d, expr in symbolic:
            if isinstance(expr, sympy.Symbol) and expr not in self._bind:
                self._bind[expr] = (i, d)
            else:
                ties.append((i, d, expr))
        self.least_size = assumed.least_size
        # each check a Python function of the bound sizes: plain ints in eager, SymInts under a later torch.compile
        # of the model (Dynamo traces it into guards, no graph break)
        names = {sym: sympy.Symbol(_name(i, d)) for sym, (i, d) in self._bind.items()}
        conditions = [g for g in assumed.branched if g.free_symbols]
        unbound = {s for e in [*(e for _, _, e in ties), *conditions] for s in e.free_symbols} - self._bind.keys()
        self.uncheckable = (
            f"the capture assumed sizes no input holds ({sorted(map(str, unbound))})" if unbound else None
        )
        self.ties = [(i, d, self._function(e), str(e.xreplace(names))) for i, d, e in ties]
        self.branched = [(self._function(g), str(g.xreplace(names))) for g in conditions]

    def serves(self) -> str:
        """The calls the graph serves, when they are not every size of every input ("": every size)."""
        limits = [f"{_name(i, d)} == {text}" for i, d, _, text in self.ties] + [text for _, text in self.branched]
        fixed = [
            f"input {i} " + ("(" + ", ".join("*" if s is None else str(s) for s in sizes) + ")")
            for i, (_, _, sizes) in ((i, e) for i, e in self.fixed if isinstance(e, tuple))
            if any(s is not None for s in sizes[:-1])  # the last size (the hidden size, a feature size) is expected
        ]
        if self.least_size and self._bind:
            limits.append(f"every * >= {self.least_size}")
        if not fixed and not limits:
            return ""
        where = f", where {' and '.join(limits)}" if limits else ""
        return f"calls with {', '.join(fixed) or 'every size'}{where}; other calls run the original block"

    def _function(self, expr: sympy.Expr):
        args = ", ".join(map(str, self._bind))
        try:
            return eval(f"lambda {args}: {PythonPrinter().doprint(expr)}", {})  # noqa: S307 (sympy's own printing)
        except Exception as e:  # a function the printer does not know: no call can be checked against it
            self.uncheckable = f"moe_fx cannot check the condition {expr} ({e!r})"
            return None

    def failure(self, flat: list) -> str | None:
        """Why a call with graph inputs `flat` is not one the graph was captured for (None: it is)."""
        for i, expected in self.fixed:
            got = flat[i] if i < len(flat) else None
            if not isinstance(expected, tuple):
                if got != expected or type(got) is not type(expected):
                    return f"input {i} is {got!r}, captured as the constant {expected!r}"
                continue
            dtype, device, sizes = expected
            if (
                not isinstance(got, torch.Tensor)
                or (got.dtype, got.device) != (dtype, device)
                or got.dim() != len(sizes)
                or any(s is not None and s != g for s, g in zip(sizes, got.shape))
            ):
                shape = f"{tuple(got.shape)} {got.dtype} on {got.device}" if isinstance(got, torch.Tensor) else got
                return f"input {i} is {shape}; the block was captured for {sizes} (None: any size) {dtype} on {device}"
        values = [_size(flat, i, d) for i, d in self._bind.values()]
        for (i, d), v in zip(self._bind.values(), values) if self.least_size else ():
            if v < self.least_size:
                where = f"{_name(i, d)} is {v}; the block was captured for sizes >= {self.least_size}"
                return f"{where} there (Dynamo's default capture, which fixes sizes 0 and 1)"
        if not self.ties and not self.branched:
            return None
        if self.uncheckable is not None:
            return f"{self.uncheckable}: cannot check this call against it"
        for i, d, expected, text in self.ties:
            if _size(flat, i, d) != expected(*values):
                return f"{_name(i, d)} is {_size(flat, i, d)}, captured as {text} (the sizes were equal in the example)"
        for condition, text in self.branched:
            if not condition(*values):
                got = ", ".join(f"{_name(i, d)} = {v}" for (i, d), v in zip(self._bind.values(), values))
                return f"the traced code branched on {text}, which this call's sizes ({got}) do not meet"
        return None


def _name(i: int, d: int | None) -> str:
    return f"input {i}" if d is None else f"input {i}.size({d})"


def _size(flat: list, i: int, d: int | None) -> int:
    return flat[i] if d is None else flat[i].shape[d]
