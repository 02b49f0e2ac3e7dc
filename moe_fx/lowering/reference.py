"""The pure-torch `reference` lowering: runs on any device and is the test oracle.

Legend: T tokens, D model dim, F ffn dim, E experts, L local experts, K top-k, R = T*K rows.

Dispatch sorts the T*K (token, slot) rows by expert once and hands experts the tokens with a
gather index (no K-fold copy of the activations); experts then runs one matmul pair per expert
group, reading the group bounds with a single host sync (`expert_offsets.tolist()`), never one
sync per expert. Combine scatters rows back to their slots and sums over K in float32.
Token capacity: route drops picks past an expert's capacity (id -1, weight 0); dispatch sorts them
after the last expert's group and experts writes zeros for them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_fx.lowering import quant as quant_fmt
from moe_fx.lowering.registry import ANY_DEVICE, register_lowering
from moe_fx.spec import GATED_ACTIVATIONS

NAME = "reference"
PRIORITY = 0


def score(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    if scoring == "softmax":
        return logits.softmax(dim=-1)
    if scoring == "sigmoid":
        return logits.sigmoid()
    return logits


def _group_mask(select_TE: torch.Tensor, n_group: int, topk_group: int, group_score_topk: int) -> torch.Tensor:
    T, E = select_TE.shape
    group_scores_TG = select_TE.view(T, n_group, E // n_group).topk(group_score_topk, dim=-1).values.sum(-1)
    top_groups_TG = group_scores_TG.topk(topk_group, dim=-1).indices
    keep_TG = torch.zeros_like(group_scores_TG).scatter_(1, top_groups_TG, 1.0)
    return keep_TG.repeat_interleave(E // n_group, dim=-1).bool()


def selection(logits_TE, bias, scoring, order, n_group, topk_group, group_score_topk, score_dtype, group_fill=0.0):
    """(scores_TE, select_TE) float32: the scores weights are read from, and the values top-k ranks (those of
    experts outside the kept groups set to `group_fill`)."""
    logits_TE = logits_TE.float()
    if order == "topk_then_score":
        return logits_TE, logits_TE
    scores_TE = score(logits_TE, scoring).to(score_dtype).float()
    if bias is not None:  # rounded as the original's sum was (bf16 scores + a bf16 bias: a bf16 sum, ties and all)
        select_TE = (scores_TE + bias.float()).to(torch.promote_types(score_dtype, bias.dtype)).float()
    else:
        select_TE = scores_TE
    if n_group > 1:
        keep_TE = _group_mask(select_TE, n_group, topk_group, group_score_topk)
        select_TE = select_TE.masked_fill(~keep_TE, group_fill)
    return scores_TE, select_TE


def capacity_keep(ids_TK: torch.Tensor, num_experts: int, capacity: int, group: int) -> torch.Tensor:
    """keep_TK bool: whether pick (t, k) fits its expert's capacity. Within each group of `group`
    consecutive tokens, picks queue at their expert first choices first (k-major), then in token order."""
    T, K = ids_TK.shape
    ids_GN = ids_TK.reshape(T // group, group, K).transpose(1, 2).reshape(T // group, K * group).long()
    onehot_GNE = F.one_hot(ids_GN, num_experts)
    place_GN = (onehot_GNE.cumsum(dim=1) * onehot_GNE).sum(-1) - 1  # 0-based place in the expert's queue
    keep_GN = place_GN < capacity
    return keep_GN.reshape(T // group, K, group).transpose(1, 2).reshape(T, K)


@register_lowering("route", device=ANY_DEVICE, name=NAME, priority=PRIORITY)
def route(logits, bias, k, scoring, order, renormalize, n_group, topk_group, group_score_topk, scale, score_dtype,
          capacity=0, group_fill=0.0):  # fmt: skip
    E = logits.shape[-1]
    group = logits.shape[-2] if logits.dim() == 3 else logits.numel() // E  # tokens that share a capacity
    logits = logits.reshape(-1, E)
    scores_TE, select_TE = selection(
        logits, bias, scoring, order, n_group, topk_group, group_score_topk, score_dtype, group_fill
    )
    if order == "topk_then_score":
        values_TK, ids_TK = select_TE.topk(k, dim=-1)
        weights_TK = score(values_TK, scoring).to(score_dtype).float()
    else:
        ids_TK = select_TE.topk(k, dim=-1).indices
        weights_TK = scores_TE.gather(1, ids_TK)
    if renormalize:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    if scale != 1.0:
        weights_TK = weights_TK * scale
    if capacity and ids_TK.numel():
        keep_TK = capacity_keep(ids_TK, E, capacity, group)
        weights_TK = weights_TK.masked_fill(~keep_TK, 0.0)
        ids_TK = ids_TK.masked_fill(~keep_TK, -1)
    return weights_TK.float().contiguous(), ids_TK.to(torch.int32).contiguous()


@register_lowering("quantize_dispatch", device=ANY_DEVICE, name=NAME, priority=PRIORITY)
def quantize_dispatch(x, ids, weights, num_local_experts, quant, layout, group_name, expert_map):
    K = ids.shape[1]
    flat_ids_R = ids.reshape(-1).long()
    flat_ids_R = flat_ids_R.masked_fill(flat_ids_R < 0, num_local_experts)  # dropped picks (capacity) sort last
    row_index_R = torch.sort(flat_ids_R, stable=True).indices
    counts_L = torch.bincount(flat_ids_R, minlength=num_local_experts + 1)[:num_local_experts]
    expert_offsets_L1 = torch.zeros(num_local_experts + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(counts_L, 0, out=expert_offsets_L1[1:])
    row_weights_R = weights.reshape(-1).float()[row_index_R]
    if quant in quant_fmt.ACTIVATION_QUANTISED:
        xq_ND, xscale = quant_fmt.quantize_rows(x, quant)
    else:  # the rows are x itself (`ops.rows_are_tokens`): experts reads x
        xq_ND, xscale = x.new_empty((0, x.shape[1])), x.new_empty((0,), dtype=torch.float32)
    splits = x.new_empty((0,), dtype=torch.int64)
    return xq_ND, xscale, expert_offsets_L1, row_index_R // K, row_weights_R, row_index_R, splits


def activate(h: torch.Tensor, activation: str, gate_up: str, alpha: float, limit: float) -> torch.Tensor:
    """h [R, 2F] (gated) or [R, F] -> [R, F]."""
    if activation in ("relu", "gelu", "gelu_tanh", "silu", "relu2"):
        return {
            "relu": F.relu,
            "gelu": F.gelu,
            "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
            "silu": F.silu,
            "relu2": lambda t: F.relu(t).square(),
        }[activation](h)
    if gate_up == "interleaved":
        gate, up = h[..., 0::2], h[..., 1::2]
    else:
        first, second = h.chunk(2, dim=-1)
        gate, up = (second, first) if gate_up == "up_first" else (first, second)
    if activation == "silu_gated":
        return F.silu(gate) * up
    if activation == "gelu_gated":
        return F.gelu(gate) * up
    if activation == "gelu_tanh_gated":
        return F.gelu(gate, approximate="tanh") * up
    gate = gate.clamp(max=limit)  # clamped_swiglu, clamped_silu_gated
    up = up.clamp(min=-limit, max=limit)
    if activation == "clamped_silu_gated":
        return F.silu(gate) * up
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


@register_lowering("experts", device=ANY_DEVICE, name=NAME, priority=PRIORITY)
def experts(
    xq,
    xscale,
    expert_offsets,
    gather_index,
    row_weights,
    w13,
    w3,
    w2,
    w13_bias,
    w2_bias,
    w13_scale,
    w2_scale,
    weight_at,
    activation,
    gate_up,
    w13_transposed,
    w2_transposed,
    alpha,
    limit,
    quant,
    out_dtype,
):
    if w3 is not None:  # gate_up == "separate"
        w13 = torch.cat([w13, w3], dim=2 if w13_transposed else 1)
        gate_up = "concat"
    w13_EHD = w13.transpose(1, 2) if w13_transposed else w13  # H = 2F gated, F otherwise
    if w2.dim() == 4:  # in column blocks (`quant.block_columns`): F is w13's
        H = w13_EHD.shape[1]
        w2 = quant_fmt.unblock_columns(w2, H // 2 if activation in GATED_ACTIVATIONS else H)
    w2_EDF = w2.transpose(1, 2) if w2_transposed else w2
    D = xq.shape[1]
    y_RD = xq.new_empty((gather_index.shape[0], w2_EDF.shape[1]), dtype=out_dtype)
    bounds = expert_offsets.tolist()  # the one host sync
    for e, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if start == end:
            continue
        rows = gather_index[start:end]
        w_rows = row_weights[start:end, None]
        if quant == "none":
            x_rows = xq[rows]
            if weight_at == "input":
                x_rows = (x_rows * w_rows).to(xq.dtype)
            h = F.linear(x_rows, w13_EHD[e], None if w13_bias is None else w13_bias[e])
            a = activate(h, activation, gate_up, alpha, limit)
            y = F.linear(a, w2_EDF[e], None if w2_bias is None else w2_bias[e])
        else:
            x_scale = xscale[rows] if quant in quant_fmt.ACTIVATION_QUANTISED else None
            h = quant_fmt.quantised_matmul(xq[rows], x_scale, w13_EHD[e], w13_scale[e], quant, D)
            if weight_at == "input":  # linear: scaling the row scales its product
                h = h * w_rows
            h = (h if w13_bias is None else h + w13_bias[e].double()).float()
            a = activate(h, activation, gate_up, alpha, limit)
            if quant == "fp8_block":  # per 1×128 group, from fp32 (Triton quantises it in the up GEMM's registers)
                a, a_scale = quant_fmt.quantize_rows(a, quant)
            elif quant in quant_fmt.ACTIVATION_QUANTISED:  # per row, from the model's dtype (Triton stores it so)
                a, a_scale = quant_fmt.quantize_rows(a.to(out_dtype), quant)
            else:
                a, a_scale = a.to(xq.dtype), None
            y = quant_fmt.quantised_matmul(a, a_scale, w2_EDF[e], w2_scale[e], quant, a.shape[1])
            y = y if w2_bias is None else y + w2_bias[e].double()
        if weight_at == "output":
            y = y * w_rows
        y_RD[start:end] = y
    y_RD[bounds[-1] :] = 0  # rows dropped by capacity contribute nothing
    return y_RD


@register_lowering("combine", device=ANY_DEVICE, name=NAME, priority=PRIORITY)
def combine(y, weights, row_index, comm_splits, weighted, layout, group_name):
    T, K = weights.shape
    slots_RD = y.new_empty((T * K, y.shape[1]), dtype=torch.float32)
    slots_RD[row_index] = y.float()
    slots_TKD = slots_RD.view(T, K, y.shape[1])
    if weighted:
        slots_TKD = slots_TKD * weights.float().unsqueeze(-1)
    return slots_TKD.sum(dim=1).to(y.dtype)
