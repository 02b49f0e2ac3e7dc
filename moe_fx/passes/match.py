"""Find MoE blocks in an FX graph, whatever naive form their experts take.

    x_TD ──linear(w_router)──▶ logits_TE ──router──▶ topk/max ──▶ (weights_TK, ids_TK)   the cut
      │                                                                  │
      └────────────▶ experts region: loop / gather+einsum / dense / HF grouped_mm ◀─┘ ──▶ out_TD

1. anchor: a `topk` (or `max(dim)`) over the last dim of something computed from router logits,
   a linear of the tokens x_TD with an [E, D] weight;
2. the cut: the top-k indices and the latest [T, K] weights tensor derived from the router alone;
3. the output: the first node of x's shape that every path from the cut to the graph output
   crosses (post-dominator), in-place accumulations included (`GraphView`), and that the tokens' values
   reach other than through the router (dense gates_TE scattered from the top-k have x's shape when E = D);
4. identification (`passes/identify.py`): the region between cut and output is cut out as a function
   f(x, weights, ids) and compared, on real and random probes, with the moe_fx ops for every experts
   candidate (`passes/experts.py`); the router is identified the same way (`passes/router.py`) or kept opaque.
A block with no candidate within tolerance is a `Rejection` with the reason, and is left untouched.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from moe_fx.passes import experts as experts_id
from moe_fx.passes import identify
from moe_fx.passes.graph_view import (
    LINEAR_TARGETS,
    GraphView,
    is_function,
    is_inplace,
    is_method,
    known_equal,
    numel,
    same_shape,
    shape_of,
    target_name,
    tensor_meta,
    value,
)
from moe_fx.passes.weights import is_weight, user_path
from moe_fx.spec import MoESpec

log = logging.getLogger("moe_fx")

_CASTS = ("to", "float", "half", "bfloat16", "type", "type_as", "contiguous")


@dataclass
class Rejection:
    where: str  # the anchor node
    module_path: str
    reason: str
    # the cut was a block's shape (one combine, nothing shared with the outside); its data refused it
    past_the_cut: bool = False

    def __str__(self) -> str:
        return f"{self.module_path or '<graph>'} ({self.where}): {self.reason}"


@dataclass
class MoEMatch:
    """One MoE block: its spec, the nodes it covers, the weights bound to each role, and the evidence."""

    module_path: str
    form: str
    spec: MoESpec
    x: fx.Node
    logits: fx.Node
    weights_cut: fx.Node
    ids_cut: fx.Node
    output: fx.Node
    region: set[fx.Node]
    router_nodes: set[fx.Node]
    router_bias: fx.Node | None
    binding: experts_id.ExpertsBinding
    errors: dict[str, float]
    selections: dict = field(default_factory=dict)
    # the experts lowering also does combine's sum (`experts(..., reduce=True)`): set by `select_lowerings`
    combine_in_experts: bool = False
    # why combine stays its own op though the experts lowering could do its sum (`select_lowerings`), or ""
    combine_kept: str = ""
    # `routed_experts` in place of route, quantize_dispatch and experts (`rewrite.select_lowerings`)
    route_in_experts: bool = False
    weights_note: str = ""  # how pre-quantised expert weights are used (passes/prequant.py), for the report
    # a tensor from outside the block that its combine accumulates into (`shared(x).scatter_add(0, idx, y)`:
    # torchtitan): the rewrite adds it to the combine's output
    base: fx.Node | None = None

    @property
    def router_recognized(self) -> bool:
        return self.spec.router is not None


# ops that add their source into their first argument (self + scatter(source)): a combine whose self comes from
# outside the block accumulates into it. Not setitem: `out[idx] = y` overwrites.
_ACCUMULATES = ("scatter_add", "scatter_add_", "index_add", "index_add_")
# a self made here holds no value from outside the block: the combine's own start, part of the region
_FILLS = ("zeros", "zeros_like", "new_zeros", "full", "full_like", "new_full", "empty", "empty_like", "new_empty")


def _unrepeated(node: fx.Node) -> fx.Node:
    """The tokens under a batched form's copies of them: `repeat_interleave(x_TD, K, dim=0)` ([T·K, D], one row
    per routed pair: transformers' `batched_mm`) and `unsqueeze` of it (the bmm's column vectors) crossed."""
    while (
        is_method(node, "unsqueeze", "repeat_interleave") or is_function(node, torch.unsqueeze, torch.repeat_interleave)
    ) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


class BlockFinder:
    """Finds and identifies MoE blocks in `gm`, given the real example inputs of its placeholders."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list):
        self.gm = gm
        self.view = GraphView(gm.graph)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.inputs = {n: _concrete(v) for n, v in zip(placeholders, example_inputs)}
        self.weights = {n for n, v in self.inputs.items() if is_weight(n, v)}
        self.weights |= {n for n in gm.graph.nodes if n.op == "get_attr"}
        data_inputs = [
            n for n in placeholders if n not in self.weights and isinstance(self.inputs.get(n), torch.Tensor)
        ]
        # sizes (SymInts) computed from the tokens are shape facts, not data: only tensors carry data
        self.depends_on_data = {n for n in self.view.forward(data_inputs) if isinstance(value(n), torch.Tensor)}
        self.data_inputs = data_inputs
        self.sizes = {n for n in gm.graph.nodes if isinstance(value(n), (int, torch.SymInt, torch.Size))}
        mutated = {self.view.root[m] for ms in self.view.mutations.values() for m in ms}
        self.mutated_inputs = {n for n in placeholders if n in mutated}
        self.generator = torch.Generator().manual_seed(0)

    # ---------------------------------------------------------------- structure
    def anchors(self) -> list[fx.Node]:
        found = []
        for n in self.gm.graph.nodes:
            if is_method(n, "topk") or is_function(n, torch.topk):
                found.append(n)
            elif (is_method(n, "max") or is_function(n, torch.max)) and (len(n.args) > 1 or "dim" in n.kwargs):
                found.append(n)
        return found

    def getitem(self, node: fx.Node, index: int) -> fx.Node | None:
        for u in node.users:
            if u.op == "call_function" and u.target is operator.getitem and u.args[1] == index:
                return u
        return None

    def token_root(self, node: fx.Node) -> fx.Node:
        """The first tensor of the tokens upstream of the router input, through casts and reshapes
        that keep the hidden dim: router and experts often reshape the same input separately.

        Casts are crossed freely only on the router's own path (a router that scores in float32);
        above the first tensor the experts may read too (a node with several users), the tokens
        keep the dtype they have there: a norm that computes in float32 and casts its output to
        bfloat16 (GPT-OSS) gives the experts bfloat16 tokens, not its float32 product."""
        hidden = shape_of(node)[-1]
        forked = False
        while (is_method(node, *_CASTS, "view", "reshape", "flatten") or is_function(node, torch.reshape)) and (
            _reads_one_tensor(node)
            and isinstance(node.args[0], fx.Node)
            and shape_of(node.args[0])
            and known_equal(shape_of(node.args[0])[-1], hidden)
        ):
            forked = forked or len(self.view.users[node]) > 1
            up = node.args[0]
            if forked and tensor_meta(up) is not None and tensor_meta(up).dtype != tensor_meta(node).dtype:
                break
            node = up
        return node

    def router_logits(self, src: fx.Node, num_experts: int) -> tuple[fx.Node, fx.Node] | None:
        """The nearest linear upstream of `src` producing [..., E] from tokens and an [E, D] weight."""
        seen, frontier = set(), [src]
        while frontier:
            n = frontier.pop(0)
            if n in seen:
                continue
            seen.add(n)
            if n.op in ("call_function", "call_method") and (
                n.target in LINEAR_TARGETS or n.target in ("matmul", "__matmul__")
            ):
                shape = shape_of(n)
                if shape and known_equal(shape[-1], num_experts) and isinstance(n.args[0], fx.Node):
                    return n, self.token_root(n.args[0])
            frontier.extend(self.view.inputs[n])
        return None

    def router_only(self, logits: fx.Node) -> set[fx.Node]:
        """Nodes computed from the logits and constants/weights alone."""
        ro = {logits}
        for n in self.view.nodes[self.view.order[logits] + 1 :]:
            ins = self.view.inputs[n]
            if ins and n.op not in ("placeholder", "output") and any(i in ro for i in ins):
                if all(i in ro or i not in self.depends_on_data for i in ins):
                    ro.add(n)
        return ro

    def output_node(self, cut: list[fx.Node], x: fx.Node, router_only: set[fx.Node] = frozenset()) -> fx.Node | None:
        """The block's output: the first node of x's shape [T, D] downstream of the top-k (cut[1:]) that every
        path from it to the graph output crosses, and that the tokens' values reach other than through the
        router or sizes; None when there is none. The dense form's gates_TE = zeros(T, E).scatter(ids, weights)
        is [T, E], x's shape when E = D, but holds the router's values alone."""
        x_shape = shape_of(x)
        if x_shape is None:
            return None
        x_numel, hidden = numel(x_shape), x_shape[-1]
        token_valued = self.view.forward(self.data_inputs, blocked=set(router_only) | self.sizes)
        for c in self.view.sorted(self.view.forward(cut[1:])):
            value_node = self.view.result_node(c)
            shape = shape_of(value_node)
            t = tensor_meta(value_node)
            if (
                c in cut
                or shape is None
                or not t.is_floating_point()
                or not shape
                or not known_equal(shape[-1], hidden)
            ):
                continue
            if not known_equal(numel(shape), x_numel) or c.op == "output" or c not in token_valued:
                continue
            if not self.view.reaches_output_avoiding(cut[1:], c, outputs_of=router_only):
                return c
        return None

    # ---------------------------------------------------------------- probes
    def real_values(self, nodes: list[fx.Node]) -> list:
        """The values `nodes` take on the example inputs. The graph runs from the top (not a cut-out slice:
        side-effect nodes such as vmap levels in Jamba's scan must run too) and stops once all are seen."""
        wanted, found = set(nodes), {}

        class _Recorder(fx.Interpreter):
            def run_node(self, n):
                result = super().run_node(n)
                if n in wanted:
                    found[n] = result.clone() if isinstance(result, torch.Tensor) else result
                    if len(found) == len(wanted):
                        raise _Seen
                return result

        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        args = [self.inputs[n].clone() if n in self.mutated_inputs else self.inputs[n] for n in placeholders]
        with torch.no_grad():
            try:
                _Recorder(self.gm).run(*args)
            except _Seen:
                pass
        return [found[n] for n in nodes]

    def leaf_values(self, leaves: list[fx.Node]) -> list:
        return [self.inputs[n] if n.op == "placeholder" else getattr(self.gm, n.target) for n in leaves]

    # ---------------------------------------------------------------- per anchor
    def match(self, anchor: fx.Node) -> MoEMatch | Rejection | None:
        src = anchor.args[0]
        ids = self.getitem(anchor, 1)
        src_shape = shape_of(src) if isinstance(src, fx.Node) else None
        if ids is None or not src_shape:
            return None
        num_experts = src_shape[-1]
        if not isinstance(num_experts, int):
            return None
        found = self.router_logits(src, num_experts)
        if found is None:
            return None  # e.g. the group top-k inside a group-limited router
        logits, x = found
        where = anchor.name
        module_path = self.module_path([anchor])
        ro = self.router_only(logits)
        outs = self.view.forward([n for n in anchor.users])
        rejections = []
        for ids_cut in self.wider_ids(ids, ro) + [ids]:
            w_candidates = [
                n
                for n in self.view.sorted(ro & outs)
                if same_shape(shape_of(n), shape_of(ids_cut))
                and tensor_meta(n) is not None
                and tensor_meta(n).is_floating_point()
            ][::-1]
            if not w_candidates:
                rejections.append(Rejection(where, module_path, "no routing-weights tensor of the top-k's shape found"))
            for w in w_candidates:  # latest first: the weights the experts read, then the raw top-k values
                result = self.match_cut(anchor, logits, x, w, ids_cut, ro, num_experts, module_path)
                if isinstance(result, MoEMatch):
                    return result
                rejections.append(result)
        # the reason reported is that of a cut shaped like a block, whose data refused it, when there is one
        # (a cut at the raw top-k values, before an in-place renormalisation, only says the cut was wrong);
        # else the last cut's (the raw top-k values')
        for rejection in rejections:
            if rejection.past_the_cut:
                return rejection
        return rejections[-1] if rejections else None

    def wider_ids(self, ids: fx.Node, ro: set[fx.Node]) -> list[fx.Node]:
        """Expert ids built from this top-k's and others' (PhiMoE's sparsemixer concatenates two top-1
        picks): router-only integer tensors downstream of `ids`, of the same leading shape, wider in K."""
        shape = shape_of(ids)
        found = []
        for n in self.view.sorted(self.view.forward([ids]) & ro):
            t, n_shape = tensor_meta(n), shape_of(n)
            if t is None or t.is_floating_point() or t.dtype == torch.bool or len(n_shape) != len(shape):
                continue
            if same_shape(n_shape[:-1], shape[:-1]) and isinstance(n_shape[-1], int) and n_shape[-1] > shape[-1]:
                found.append(n)
        return found[::-1]

    def experts_input(self, x: fx.Node, w: fx.Node, ids: fx.Node, needed: set[fx.Node], ro: set[fx.Node]) -> fx.Node:
        """The tokens the experts read, when that is not the router's input `x` (Gemma4 and DiffusionGemma
        normalise the tokens for the experts only): the one tensor of x's shape (up to reshapes and casts)
        that the nodes downstream of the top-k read from outside them and the router; `x` when there is
        none or more than one, or when no expert runs downstream of the top-k (those nodes read no expert
        weight): every expert of a dense block runs on all the tokens upstream of its combine, and the [T, D]
        tensors the combine reads are the experts' outputs (one expert: one such tensor, not the tokens). The
        region, and the probes that identify it, then start there."""
        experts = self.view.forward([w, ids]) & needed
        if not any(self.reads_weights(n) for n in experts):
            return x
        read = {
            self.token_root(_unrepeated(i))
            for n in experts
            for i in self.view.inputs[n]
            if i not in experts and i not in ro and i not in (w, ids) and i in self.depends_on_data
        }
        read = {
            n
            for n in read
            if same_shape(shape_of(n), shape_of(x)) and tensor_meta(n).is_floating_point()
            and target_name(n) not in _FILLS  # the output's `zeros_like(x)` holds no token
        }  # fmt: skip
        return read.pop() if len(read) == 1 else x

    def reads_weights(self, node: fx.Node) -> bool:
        """Whether `node` reads a weight, or a tensor computed from weights alone (a view `w1[e].t()`, a
        dequantised weight)."""
        return any(
            i in self.weights
            or i not in self.depends_on_data
            and isinstance(value(i), torch.Tensor)
            and not self.weights.isdisjoint(self.view.backward([i]))
            for i in self.view.inputs[node]
        )

    def accumulated_base(self, output: fx.Node, w: fx.Node, ids: fx.Node) -> fx.Node | None:
        """The tensor the block's combine adds its rows into when that comes from outside the block: the self of
        a `scatter_add`/`index_add` output that the routing does not reach and the block did not fill itself
        (torchtitan starts from the shared experts' output). None otherwise."""
        if target_name(output) not in _ACCUMULATES or not output.args or not isinstance(output.args[0], fx.Node):
            return None
        base = output.args[0]
        if target_name(base) in _FILLS or base in self.view.forward([w, ids]):
            return None
        return base if same_shape(shape_of(base), shape_of(output)) else None

    def match_cut(self, anchor, logits, x, w, ids, ro, num_experts, module_path) -> MoEMatch | Rejection:
        where = anchor.name
        cut = [x, w, ids]
        output = self.output_node(cut, x, ro)
        if output is None:
            split = any(n.op == "output" for n in self.view.forward(cut[1:]))
            return Rejection(
                where,
                module_path,
                "the top-k outputs do not reach one tensor of the tokens' shape "
                "that combines them (no MoE combine found)"
                + ("; they leave this graph: a graph break splits the block" if split else ""),
            )
        base = self.accumulated_base(output, w, ids)
        cut += [base] if base is not None else []
        needed = self.view.backward([output], blocked=cut)
        x_experts = self.experts_input(x, w, ids, needed, ro)
        if x_experts is not x:
            x, cut = x_experts, [x_experts, *cut[1:]]
            needed = self.view.backward([output], blocked=cut)
        if ids not in needed:  # e.g. a sampler returning its top-k ids beside a sum of the top-k values
            return Rejection(
                where, module_path, "the top-k ids do not reach the tensor that combines them (no MoE combine found)"
            )
        leaks = needed & self.view.forward([logits], blocked=[w, ids]) - {w, ids}
        if leaks:
            names = ", ".join(sorted(n.name for n in leaks)[:3])
            return Rejection(
                where,
                module_path,
                f"the experts read router values other than the top-k weights and "
                f"ids ({names}): the combine cannot reproduce that",
            )
        region = self.view.forward([w, ids], blocked=[output]) & needed
        region |= {n for n in needed - ro if n not in cut and n.op not in ("placeholder", "get_attr")}
        region -= self.view.backward([x, logits]) | set(cut)
        foreign = [n for n in region if is_inplace(n) and self.view.root[n] not in region | {base} - {None}]
        if foreign:
            return Rejection(
                where, module_path, f"the block mutates {self.view.root[foreign[0]].name}, which lives outside it"
            )
        routed = self.view.forward([w, ids])
        for n in region - {output, self.view.result_node(output)}:
            if not isinstance(value(n), torch.Tensor) or n not in routed:
                continue  # sizes, and the tokens' own views (AFMoE's shared experts read them), stay while used
            outside = [
                u for u in self.view.users[n] if u not in region and self.view.reaches_output_avoiding([u], output)
            ]
            if outside and not is_inplace(n):
                return Rejection(
                    where, module_path, f"{n.name} inside the block is also used outside it ({outside[0].name})"
                )
        module_path = self.module_path([anchor, logits, *region])
        found = identify.block(self, identify.Cut(anchor, logits, ro, num_experts, x, w, ids, output, region, base))
        if isinstance(found, str):
            return Rejection(where, module_path, found, past_the_cut=True)
        return MoEMatch(
            module_path,
            self.form(region | {output}),
            found.spec,
            x,
            logits,
            w,
            ids,
            output,
            region,
            found.router_nodes,
            found.router_bias,
            found.binding,
            found.errors,
            base=base,
        )

    def form(self, region: set[fx.Node]) -> str:
        names = {target_name(n) for n in region}
        if names & {"_grouped_mm", "grouped_mm", "grouped_mm_fallback", "grouped_mm_fallback.default"}:
            return "hf_grouped_mm"
        if names & {
            "where",
            "nonzero",
            "index_add_",
            "index_add",
            "setitem",
            "argwhere",
            "opaque_experts",
            "opaque_experts.default",
            "split",
            "split_with_sizes",
        }:
            return "expert_loop"
        gathers_weights = any(  # a weight, or a weight dequantised in the graph (passes/prequant.py)
            target_name(n) == "getitem"
            and (
                n.args[0] in self.weights
                or n.args[0] in region
                and n.args[0] not in self.depends_on_data
                and isinstance(value(n.args[0]), torch.Tensor)
            )
            for n in region
        )
        if "bmm" in names and not names & {"einsum"} and gathers_weights:
            return "batched_mm"
        if gathers_weights:
            return "gather_einsum" if "einsum" in names else "gather_matmul"
        return "dense"

    def module_path(self, nodes) -> str:
        paths = []
        for n in nodes:
            if n.op not in ("call_function", "call_method", "call_module"):
                continue
            stack = n.meta.get("nn_module_stack")
            paths.append(user_path(list(stack.values())[-1][0]).split(".") if stack else [])
        if not paths:
            return ""
        common = []
        for parts in zip(*paths):
            if len(set(parts)) != 1:
                break
            common.append(parts[0])
        return ".".join(common)


class _Seen(Exception):
    """Stops `real_values` once every wanted node has run."""


def _reads_one_tensor(node: fx.Node) -> bool:
    """Whether `node` reads no tensor but its first argument (`type_as(other)` also reads `other`)."""
    return all(tensor_meta(a) is None for a in node.all_input_nodes if a is not node.args[0])


def _concrete(v):
    """Dynamo passes symbolic sizes as SymInts; probes run on the real sizes they stand for."""
    if isinstance(v, torch.SymInt) and v.node.has_hint():
        return int(v.node.hint)
    return v


def find_blocks(
    gm: fx.GraphModule, example_inputs: list, finder: BlockFinder | None = None
) -> tuple[list[MoEMatch], list[Rejection]]:
    """Every MoE block in `gm` (outermost anchors first), and every near-miss with its reason."""
    finder = finder or BlockFinder(gm, example_inputs)
    matches, rejections, claimed = [], [], set()
    for anchor in finder.anchors():
        if anchor in claimed:
            continue
        try:
            result = finder.match(anchor)
        except Exception as e:  # a probe the region cannot run is a refusal, never a crash
            result = Rejection(anchor.name, finder.module_path([anchor]), f"could not evaluate the block: {e!r}"[:300])
        if result is None:
            continue
        if isinstance(result, Rejection):
            log.debug("moe_fx: rejected %s", result)
            rejections.append(result)
            continue
        # the router's own top-k's (PhiMoE's second pick) are part of this block too
        claimed |= result.region | result.router_nodes
        claimed |= finder.view.backward([result.weights_cut, result.ids_cut], blocked=[result.logits])
        matches.append(result)
    return matches, rejections
