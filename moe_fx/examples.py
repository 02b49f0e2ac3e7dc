"""Naive MoE blocks, written the ways people write them. The demo and the tests use these.

Legend: T tokens, D model dim, F ffn dim, E experts, K top-k.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SwiGLU(nn.Module):
    def __init__(self, dim: int, ffn: int):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn, bias=False)
        self.w3 = nn.Linear(dim, ffn, bias=False)
        self.w2 = nn.Linear(ffn, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluMLP(nn.Module):
    """Non-gated expert with biases."""

    def __init__(self, dim: int, ffn: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class TanhExpert(nn.Module):
    """No moe_fx activation is tanh: a block of these is a near-miss, left untouched with the reason."""

    def __init__(self, dim: int, ffn: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def softmax_topk(logits_TE, k, renormalize=True):
    probs_TE = logits_TE.softmax(dim=-1, dtype=torch.float32)
    weights_TK, ids_TK = probs_TE.topk(k, dim=-1)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK, ids_TK


class LoopMoE(nn.Module):
    """Static loop over ModuleList experts with torch.where + index_add_ (Mixtral-style)."""

    def __init__(self, dim=32, ffn=48, num_experts=4, k=2, expert=SwiGLU, renormalize=True):
        super().__init__()
        self.k, self.renormalize = k, renormalize
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(expert(dim, ffn) for _ in range(num_experts))

    def forward(self, x):
        x_TD = x.reshape(-1, x.shape[-1])
        weights_TK, ids_TK = softmax_topk(self.gate(x_TD), self.k, self.renormalize)
        weights_TK = weights_TK.to(x.dtype)
        out_TD = torch.zeros_like(x_TD)
        for e, expert in enumerate(self.experts):
            token_idx, slot_idx = torch.where(ids_TK == e)
            y = expert(x_TD[token_idx]) * weights_TK[token_idx, slot_idx, None]
            out_TD.index_add_(0, token_idx, y)
        return out_TD.reshape(x.shape)


class IndexedLoopMoE(nn.Module):
    """Loop over 3-D parameters `w1[e]` with a nonzero mask and `out[idx] += ...`; top-k -> softmax router."""

    def __init__(self, dim=32, ffn=48, num_experts=4, k=2):
        super().__init__()
        self.k = k
        self.router = nn.Linear(dim, num_experts, bias=True)
        self.w1 = nn.Parameter(torch.randn(num_experts, ffn, dim) / dim**0.5)
        self.w3 = nn.Parameter(torch.randn(num_experts, ffn, dim) / dim**0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, dim, ffn) / ffn**0.5)

    def forward(self, x):
        B, S, D = x.shape
        x_TD = x.view(B * S, D)
        top_logits_TK, ids_TK = self.router(x_TD).topk(self.k, dim=-1)
        weights_TK = top_logits_TK.softmax(dim=-1)
        out_TD = torch.zeros_like(x_TD)
        for e in range(self.w1.shape[0]):
            mask_TK = ids_TK == e
            rows = mask_TK.any(dim=-1).nonzero().squeeze(-1)
            w_rows = (weights_TK * mask_TK).sum(dim=-1)[rows]
            h = x_TD[rows]
            y = (F.silu(h @ self.w1[e].t()) * (h @ self.w3[e].t())) @ self.w2[e].t()
            out_TD[rows] += y * w_rows[:, None]
        return out_TD.view(B, S, D)


class GatherEinsumMoE(nn.Module):
    """gpt-fast style: gather w[ids] per (token, slot), einsum, weighted sum over K."""

    def __init__(self, dim=32, ffn=48, num_experts=4, k=2):
        super().__init__()
        self.k = k
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(num_experts, ffn, dim) / dim**0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, dim, ffn) / ffn**0.5)
        self.w3 = nn.Parameter(torch.randn(num_experts, ffn, dim) / dim**0.5)

    def forward(self, x):
        x_TD = x.view(-1, x.shape[-1])
        scores_TE = F.softmax(self.gate(x_TD), dim=-1)
        weights_TK, ids_TK = torch.topk(scores_TE, self.k, dim=-1)
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        w1_TKFD, w3_TKFD, w2_TKDF = self.w1[ids_TK], self.w3[ids_TK], self.w2[ids_TK]
        h_TKF = F.silu(torch.einsum("td,tkfd->tkf", x_TD, w1_TKFD)) * torch.einsum("td,tkfd->tkf", x_TD, w3_TKFD)
        y_TKD = torch.einsum("tkf,tkdf->tkd", h_TKF, w2_TKDF)
        return torch.einsum("tkd,tk->td", y_TKD, weights_TK).view(x.shape)


class GatherMatmulMoE(nn.Module):
    """The same gather form written with matmul and a fused gate/up weight: w13[ids] @ x, chunk, weighted sum."""

    def __init__(self, dim=32, ffn=48, num_experts=4, k=2):
        super().__init__()
        self.k = k
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.w13 = nn.Parameter(torch.randn(num_experts, 2 * ffn, dim) / dim**0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, dim, ffn) / ffn**0.5)

    def forward(self, x):
        x_TD = x.reshape(-1, x.shape[-1])
        weights_TK, ids_TK = softmax_topk(self.gate(x_TD), self.k, renormalize=False)
        h_TKH = (self.w13[ids_TK] @ x_TD[:, None, :, None]).squeeze(-1)
        gate_TKF, up_TKF = h_TKH.chunk(2, dim=-1)
        y_TKD = (self.w2[ids_TK] @ (F.gelu(gate_TKF) * up_TKF).unsqueeze(-1)).squeeze(-1)
        return (y_TKD * weights_TK.to(x.dtype).unsqueeze(-1)).sum(dim=1).reshape(x.shape)


class DenseMoE(nn.Module):
    """Every expert on every token, combined with dense [T, E] gates scattered from the top-k."""

    def __init__(self, dim=32, ffn=48, num_experts=4, k=2, expert=SwiGLU):
        super().__init__()
        self.k = k
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(expert(dim, ffn) for _ in range(num_experts))

    def zero_gates(self, x, logits_TE):
        return torch.zeros(x.shape[0], len(self.experts), dtype=x.dtype, device=x.device)

    def forward(self, x):
        logits_TE = self.gate(x)
        weights_TK, ids_TK = softmax_topk(logits_TE, self.k)
        gates_TE = self.zero_gates(x, logits_TE).scatter(1, ids_TK, weights_TK.to(x.dtype))
        y_ETD = torch.stack([expert(x) for expert in self.experts])
        return torch.einsum("te,etd->td", gates_TE, y_ETD)


class DenseLikeLogitsMoE(DenseMoE):
    """The dense form with its gates made like the router's logits, as many hand-written blocks make them:
    `zeros_like(logits).scatter(1, ids, w)` (fill: "zeros_like"), `logits.new_zeros(T, E)` or
    `full_like(logits, 0.0)`."""

    def __init__(self, dim=32, ffn=48, num_experts=4, k=2, fill="zeros_like"):
        super().__init__(dim, ffn, num_experts, k)
        self.fill = fill

    def zero_gates(self, x, logits_TE):
        return {
            "zeros_like": lambda: torch.zeros_like(logits_TE),
            "new_zeros": lambda: logits_TE.new_zeros(x.shape[0], len(self.experts)),
            "full_like": lambda: torch.full_like(logits_TE, 0.0),
        }[self.fill]()


class MaskedSumMoE(nn.Module):
    """Top-1 `max` router, every expert on every token, per-expert masked weighted sum."""

    def __init__(self, dim=32, ffn=48, num_experts=4):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(GeluMLP(dim, ffn) for _ in range(num_experts))

    def forward(self, x):
        weight_T, id_T = self.gate(x).softmax(dim=-1).max(dim=-1)
        out = 0
        for e, expert in enumerate(self.experts):
            out = out + expert(x) * (weight_T * (id_T == e))[:, None]
        return out


class GroupLimitedRouter(nn.Module):
    """DeepSeek-V3 routing as transformers writes it: sigmoid, correction bias, group-limited top-k (0.0 over the
    dropped groups), unbiased weights, renorm, scale."""

    def __init__(self, dim, num_experts, k, n_group, topk_group, scale):
        super().__init__()
        self.k, self.n_group, self.topk_group, self.scale = k, n_group, topk_group, scale
        self.weight = nn.Parameter(torch.randn(num_experts, dim) / dim**0.5)
        self.register_buffer("e_score_correction_bias", torch.randn(num_experts) * 0.1)

    def forward(self, x_TD):
        scores_TE = F.linear(x_TD.float(), self.weight.float()).sigmoid()
        choice_TE = scores_TE + self.e_score_correction_bias
        T, E = choice_TE.shape
        group_TG = choice_TE.view(T, self.n_group, E // self.n_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = group_TG.topk(self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_TG).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(T, self.n_group, E // self.n_group).reshape(T, E)
        choice_TE = choice_TE.masked_fill(~score_mask.bool(), 0.0)
        ids_TK = choice_TE.topk(self.k, dim=-1, sorted=False)[1]
        weights_TK = scores_TE.gather(1, ids_TK)
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return weights_TK * self.scale, ids_TK


class DeepSeekGate(GroupLimitedRouter):
    """DeepSeek-V3 routing as DeepSeek's own inference code writes it: the dropped groups' experts are set to -inf
    (in place, on a [T, G, E/G] view) before the top-k; the same as transformers' 0.0 unless the bias makes
    kept experts' values negative."""

    def forward(self, x_TD):
        scores_TE = F.linear(x_TD.float(), self.weight.float()).sigmoid()
        original_TE = scores_TE
        scores_TGS = (scores_TE + self.e_score_correction_bias).view(x_TD.size(0), self.n_group, -1)
        group_TG = scores_TGS.topk(2, dim=-1)[0].sum(dim=-1)
        indices = group_TG.topk(self.topk_group, dim=-1)[1]
        drop_TG = scores_TGS.new_ones(x_TD.size(0), self.n_group, dtype=torch.bool).scatter_(1, indices, False)
        choice_TE = scores_TGS.masked_fill_(drop_TG.unsqueeze(-1), float("-inf")).flatten(1)
        ids_TK = torch.topk(choice_TE, self.k, dim=-1)[1]
        weights_TK = original_TE.gather(1, ids_TK)
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return weights_TK * self.scale, ids_TK


class DeepSeekStyleMoE(nn.Module):
    """Group-limited sigmoid router (gate: "transformers" or "deepseek", `DeepSeekGate`), looped experts, and a
    shared expert added afterwards."""

    def __init__(self, dim=32, ffn=48, num_experts=8, k=2, n_group=4, topk_group=2, scale=2.5, gate="transformers"):
        super().__init__()
        router = {"transformers": GroupLimitedRouter, "deepseek": DeepSeekGate}[gate]
        self.gate = router(dim, num_experts, k, n_group, topk_group, scale)
        self.experts = nn.ModuleList(SwiGLU(dim, ffn) for _ in range(num_experts))
        self.shared_expert = SwiGLU(dim, ffn)

    def forward(self, x):
        weights_TK, ids_TK = self.gate(x)
        out_TD = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token_idx, slot_idx = torch.where(ids_TK == e)
            y = expert(x[token_idx]) * weights_TK[token_idx, slot_idx, None].to(x.dtype)
            out_TD.index_add_(0, token_idx, y)
        return out_TD + self.shared_expert(x)


class TwoFormModel(nn.Module):
    """Two MoE layers of different forms with residuals between them: the demo model."""

    def __init__(self, dim=64, ffn=96, num_experts=8, k=2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.moe1 = LoopMoE(dim, ffn, num_experts, k)
        self.norm2 = nn.LayerNorm(dim)
        self.moe2 = GatherEinsumMoE(dim, ffn, num_experts, k)

    def forward(self, x):
        x = x + self.moe1(self.norm1(x))
        return x + self.moe2(self.norm2(x))


class QuantisedCheckpointMoE(nn.Module):
    """A checkpoint that holds its experts quantised (DeepSeek-V3 style): w13 [E, 2F, D] and w2 [E, D, F] in
    e4m3 (or int8) with float32 `*_scale_inv` per `block`×`block` tile (or per output channel, block=None),
    dequantised in forward by expanding the scales, then the gather-matmul form in `dtype`."""

    def __init__(self, dim=160, ffn=96, num_experts=4, k=2, qdtype=torch.float8_e4m3fn, block=128, dtype=torch.float32):
        super().__init__()
        self.k, self.block, self.dtype = k, block, dtype
        self.gate = nn.Linear(dim, num_experts, bias=False, dtype=dtype)
        for name, shape in (("w13", (num_experts, 2 * ffn, dim)), ("w2", (num_experts, dim, ffn))):
            q, scale_inv = self.quantise(torch.randn(shape) / shape[2] ** 0.5, qdtype)
            self.register_parameter(f"{name}_q", nn.Parameter(q, requires_grad=False))
            self.register_parameter(f"{name}_scale_inv", nn.Parameter(scale_inv, requires_grad=False))

    def quantise(self, w_EHD, qdtype):
        qmax = torch.finfo(qdtype).max if qdtype.is_floating_point else torch.iinfo(qdtype).max
        amax = w_EHD.abs().amax(-1) if self.block is None else self.tiles(w_EHD.abs(), torch.amax)
        scale_inv = amax / qmax
        q = w_EHD / self.expand(scale_inv, w_EHD.shape)
        q = q.to(qdtype) if qdtype.is_floating_point else q.round().clamp(-qmax, qmax).to(qdtype)
        return q, scale_inv

    def tiles(self, w_EHD, reduce):
        H, D = w_EHD.shape[1:]
        b = self.block
        padded = F.pad(w_EHD, (0, -D % b, 0, -H % b))
        return reduce(padded.unflatten(2, (-1, b)).unflatten(1, (-1, b)), dim=(2, 4))  # [E, H/b, D/b]

    def expand(self, scale_inv, shape):
        if self.block is None:
            return scale_inv[..., None]  # [E, H] per output channel
        H, D = shape[1:]
        return scale_inv.repeat_interleave(self.block, 1)[:, :H].repeat_interleave(self.block, 2)[:, :, :D]

    def dequantise(self, q, scale_inv):
        return (q.to(torch.float32) * self.expand(scale_inv, q.shape)).to(self.dtype)

    def forward(self, x):
        x_TD = x.reshape(-1, x.shape[-1])
        w13_EHD = self.dequantise(self.w13_q, self.w13_scale_inv)
        w2_EDF = self.dequantise(self.w2_q, self.w2_scale_inv)
        weights_TK, ids_TK = softmax_topk(self.gate(x_TD), self.k)
        h_TKH = (w13_EHD[ids_TK] @ x_TD[:, None, :, None]).squeeze(-1)
        gate_TKF, up_TKF = h_TKH.chunk(2, dim=-1)
        y_TKD = (w2_EDF[ids_TK] @ (F.silu(gate_TKF) * up_TKF).unsqueeze(-1)).squeeze(-1)
        return (y_TKD * weights_TK.to(x.dtype).unsqueeze(-1)).sum(dim=1).reshape(x.shape)


class TorchtitanStyleMoE(nn.Module):
    """torchtitan-style: histc counts, a stable argsort, a split loop over 3-D weights, scatter_add into the shared
    expert's output.

    The router runs in fp32 (sigmoid, renormalised, or softmax); the picks are sorted by expert with a stable
    argsort; the experts are a loop over `split` by the counts, or `torch._grouped_mm` (`grouped_mm`: bf16 on the
    CPU); the scores multiply the experts' input (`score_before`) or their output; the routed rows are
    scatter-added into the shared expert's output (zeros without one; `inplace`: `scatter_add_`)."""

    def __init__(self, dim=32, ffn=24, num_experts=8, k=2, scoring="sigmoid", score_before=True, grouped_mm=False,
                 shared=True, inplace=False):  # fmt: skip
        super().__init__()
        self.k, self.scoring, self.score_before = k, scoring, score_before
        self.grouped_mm, self.inplace = grouped_mm, inplace
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(num_experts, ffn, dim) / dim**0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, dim, ffn) / ffn**0.5)
        self.w3 = nn.Parameter(torch.randn(num_experts, ffn, dim) / dim**0.5)
        self.shared_experts = SwiGLU(dim, ffn) if shared else None

    def experts(self, x_RD, tokens_per_expert_E):
        if self.grouped_mm:
            offsets_E = torch.cumsum(tokens_per_expert_E, dim=0, dtype=torch.int32)
            h_RF = F.silu(torch._grouped_mm(x_RD, self.w1.transpose(-2, -1), offs=offsets_E))
            h_RF = h_RF * torch._grouped_mm(x_RD, self.w3.transpose(-2, -1), offs=offsets_E)
            return torch._grouped_mm(h_RF, self.w2.transpose(-2, -1), offs=offsets_E).type_as(x_RD)
        sizes = tokens_per_expert_E.tolist()
        outs = []
        for e, x_e in enumerate(torch.split(x_RD[: sum(sizes)], sizes, dim=0)):
            h = F.silu(x_e @ self.w1[e].transpose(-2, -1)) * (x_e @ self.w3[e].transpose(-2, -1))
            outs.append(h @ self.w2[e].transpose(-2, -1))
        return torch.cat(outs, dim=0)

    def forward(self, x):
        B, S, D = x.shape
        x_TD = x.view(-1, D)
        scores_TE = self.gate(x_TD).to(torch.float32)
        scores_TE = torch.sigmoid(scores_TE) if self.scoring == "sigmoid" else F.softmax(scores_TE, dim=1)
        top_scores_TK, ids_TK = torch.topk(scores_TE, k=self.k, dim=1)
        if self.scoring == "sigmoid":
            top_scores_TK = top_scores_TK / (top_scores_TK.sum(dim=-1, keepdim=True) + 1e-20)
        E = self.w1.shape[0]
        tokens_per_expert_E = torch.histc(ids_TK.view(-1).float(), bins=E, min=0, max=E).to(torch.int64)
        order_R = torch.argsort(ids_TK.view(-1), stable=True)
        scores_R = top_scores_TK.view(-1)[order_R]
        index_RD = (order_R // self.k).reshape(-1, 1).expand(-1, D)
        x_RD = torch.gather(x_TD, dim=0, index=index_RD)
        if self.score_before:
            x_RD = (x_RD.to(torch.float32) * scores_R.reshape(-1, 1)).to(x.dtype)
        y_RD = self.experts(x_RD, tokens_per_expert_E)
        if not self.score_before:
            y_RD = (y_RD.to(torch.float32) * scores_R.reshape(-1, 1)).to(x.dtype)
        out_TD = self.shared_experts(x_TD) if self.shared_experts is not None else torch.zeros_like(x_TD)
        if self.inplace:
            out_TD.scatter_add_(0, index_RD, y_RD)
        else:
            out_TD = out_TD.scatter_add(dim=0, index=index_RD, src=y_RD)
        return out_TD.reshape(B, S, D)


class Llama4ReferenceMoE(nn.Module):
    """llama-models' Llama 4 reference code: every expert on every token, batched by bmm.

    The router is an [D, E] matrix; the top-k scores are scattered into -inf, transposed to [E, T], then
    sigmoid-ed; each expert's copy of every token is scaled by its score before the experts, and the rows are
    scatter-added in place into the shared expert's output."""

    def __init__(self, dim=32, ffn=24, num_experts=8, k=1):
        super().__init__()
        self.k, self.num_experts = k, num_experts
        self.router_DE = nn.Parameter(torch.randn(dim, num_experts) / dim**0.5)
        self.w1_EDF = nn.Parameter(torch.randn(num_experts, dim, ffn) / dim**0.5)
        self.w3_EDF = nn.Parameter(torch.randn(num_experts, dim, ffn) / dim**0.5)
        self.w2_EFD = nn.Parameter(torch.randn(num_experts, ffn, dim) / ffn**0.5)
        self.shared_expert = SwiGLU(dim, ffn)

    def experts(self, x_RD):
        x_EGD = x_RD.view(self.num_experts, -1, x_RD.shape[-1])
        h_EGF = F.silu(torch.bmm(x_EGD, self.w1_EDF)) * torch.bmm(x_EGD, self.w3_EDF)
        return torch.bmm(h_EGF, self.w2_EFD).view(-1, x_RD.shape[-1])

    def forward(self, x_BSD):
        _, S, D = x_BSD.shape
        x_TD = x_BSD.view(-1, D)
        scores_ET = torch.matmul(x_TD, self.router_DE).transpose(0, 1)
        top_TK, ids_TK = torch.topk(scores_ET.transpose(0, 1), self.k, dim=1)
        scores_TE = torch.full_like(scores_ET.transpose(0, 1), float("-inf")).scatter_(1, ids_TK, top_TK)
        scores_ET = scores_TE.transpose(0, 1)
        tokens_ET = torch.arange(x_TD.shape[0], device=x_TD.device).view(1, -1).expand(scores_ET.size(0), -1)
        scores_ET = torch.sigmoid(scores_ET)
        index_RD = tokens_ET.reshape(-1, 1).expand(-1, D)
        x_RD = torch.gather(x_TD, dim=0, index=index_RD) * scores_ET.reshape(-1, 1)
        out_TD = self.shared_expert(x_TD)
        out_TD.scatter_add_(dim=0, index=index_RD, src=self.experts(x_RD))
        return out_TD.view(-1, S, D)


class DeepSeekReferenceMoE(nn.Module):
    """DeepSeek-V3's reference inference code: counts by `bincount(...).tolist()` and a loop that skips the experts
    without tokens (`if counts[i] == 0: continue`). That branch on data splits an ordinary Dynamo graph:
    `torch.compile` leaves the block untouched and says so, `apply` captures the loop over every expert
    (`moe_fx.capture.hit_loops`); without the skip, which changes nothing, both rewrite it."""

    def __init__(self, dim=32, ffn=24, num_experts=8, k=2, skip_empty=True):
        super().__init__()
        self.k, self.skip_empty = k, skip_empty
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(dim, ffn) for _ in range(num_experts))
        self.shared_experts = SwiGLU(dim, 2 * ffn)

    def forward(self, x):
        shape = x.size()
        x = x.view(-1, shape[-1])
        weights, indices = softmax_topk(self.gate(x), self.k)
        weights = weights.type_as(x)
        y = torch.zeros_like(x)
        counts = torch.bincount(indices.flatten(), minlength=len(self.experts)).tolist() if self.skip_empty else None
        for i, expert in enumerate(self.experts):
            if counts is not None and counts[i] == 0:
                continue
            idx, top = torch.where(indices == i)
            y[idx] += expert(x[idx]) * weights[idx, top, None]
        return (y + self.shared_experts(x)).view(shape)


# ---------------------------------------------------------------- any naive block, from parameters
ROUTERS = ("softmax_topk", "softmax_topk_renorm", "topk_softmax", "sigmoid_topk_renorm", "sigmoid_bias_scaled")
FORMS = ("loop_where", "loop_nonzero", "gather_einsum", "dense", "masked_sum")
CLAMP_LIMIT = 1.0  # clamped_silu_gated's limit in these blocks: low, so that their tokens pass it
_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda t: F.relu(t).square(),
    "clamped_silu": lambda t: F.silu(t.clamp(max=CLAMP_LIMIT)),
}
_UP = {"clamped_silu": lambda t: t.clamp(min=-CLAMP_LIMIT, max=CLAMP_LIMIT)}  # a gated activation's up projection


def _up(activation: str):
    return _UP.get(activation.removesuffix("_gated"), lambda t: t)


class Expert(nn.Module):
    """One expert: gated (`act(w1 x) * up(w3 x)`, up clamped for clamped_silu_gated) or plain (`act(w1 x)`), then w2;
    optional biases."""

    def __init__(self, dim: int, ffn: int, activation: str = "silu_gated", bias: bool = False):
        super().__init__()
        self.gated, self.act = activation.endswith("_gated"), _ACTIVATIONS[activation.removesuffix("_gated")]
        self.up = _up(activation)
        self.w1 = nn.Linear(dim, ffn, bias=bias)
        self.w3 = nn.Linear(dim, ffn, bias=bias) if self.gated else None
        self.w2 = nn.Linear(ffn, dim, bias=bias)

    def forward(self, x):
        h = self.act(self.w1(x))
        return self.w2(h * self.up(self.w3(x)) if self.gated else h)


class NaiveMoE(nn.Module):
    """A naive MoE block built from parameters; the fuzz tests draw them at random.

    router: one of ROUTERS; form: one of FORMS (gather_einsum needs stacked=True); activation:
    silu/gelu/gelu_tanh/relu/relu2, with "_gated" for a gated MLP, or clamped_silu_gated (at CLAMP_LIMIT);
    stacked: 3-D parameters w1 [E, F, D], w3 [E, F, D], w2 [E, D, F] instead of a ModuleList of `Expert`;
    shared: a shared expert added afterwards; router_fp32: fp32 router logits whatever the experts' dtype.
    Input [..., D].
    """

    def __init__(
        self,
        num_experts: int = 4,
        k: int = 2,
        dim: int = 32,
        ffn: int = 48,
        router: str = "softmax_topk_renorm",
        activation: str = "silu_gated",
        bias: bool = False,
        shared: bool = False,
        form: str = "loop_where",
        stacked: bool = False,
        router_fp32: bool = False,
    ):
        super().__init__()
        if router not in ROUTERS or form not in FORMS:
            raise ValueError(f"moe_fx: router={router!r} / form={form!r}: expected one of {ROUTERS} / {FORMS}")
        if form == "gather_einsum" and not stacked:
            raise ValueError("moe_fx: form='gather_einsum' gathers 3-D weights: it needs stacked=True")
        self.k, self.router, self.form, self.stacked, self.router_fp32 = k, router, form, stacked, router_fp32
        self.gate = nn.Linear(dim, num_experts, bias=False)
        if router == "sigmoid_bias_scaled":
            self.register_buffer("e_score_correction_bias", torch.randn(num_experts) * 0.1)
        if stacked:
            E, gated = num_experts, activation.endswith("_gated")
            self.gated, self.act, self.up = gated, _ACTIVATIONS[activation.removesuffix("_gated")], _up(activation)
            self.w1 = nn.Parameter(torch.randn(E, ffn, dim) / dim**0.5)
            self.w3 = nn.Parameter(torch.randn(E, ffn, dim) / dim**0.5) if gated else None
            self.w2 = nn.Parameter(torch.randn(E, dim, ffn) / ffn**0.5)
            self.b1 = nn.Parameter(torch.randn(E, ffn) * 0.1) if bias else None
            self.b3 = nn.Parameter(torch.randn(E, ffn) * 0.1) if bias and gated else None
            self.b2 = nn.Parameter(torch.randn(E, dim) * 0.1) if bias else None
        else:
            self.experts = nn.ModuleList(Expert(dim, ffn, activation, bias) for _ in range(num_experts))
        self.shared_expert = Expert(dim, ffn) if shared else None

    def route(self, x_TD):
        if self.router_fp32:
            logits_TE = F.linear(x_TD.float(), self.gate.weight.float())
        else:
            logits_TE = self.gate(x_TD)
        if self.router.startswith("softmax_topk"):
            return softmax_topk(logits_TE, self.k, self.router.endswith("renorm"))
        if self.router == "topk_softmax":
            values_TK, ids_TK = logits_TE.topk(self.k, dim=-1)
            return values_TK.softmax(dim=-1), ids_TK
        scores_TE = logits_TE.sigmoid()
        if self.router == "sigmoid_topk_renorm":
            weights_TK, ids_TK = scores_TE.topk(self.k, dim=-1)
        else:
            ids_TK = (scores_TE + self.e_score_correction_bias).topk(self.k, dim=-1).indices
            weights_TK = scores_TE.gather(1, ids_TK)
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return weights_TK * 2.5 if self.router == "sigmoid_bias_scaled" else weights_TK, ids_TK

    def expert(self, e: int, h):
        if not self.stacked:
            return self.experts[e](h)

        def lin(w, b):
            y = h @ w[e].t()
            return y if b is None else y + b[e]

        a = self.act(lin(self.w1, self.b1))
        a = a * self.up(lin(self.w3, self.b3)) if self.gated else a
        y = a @ self.w2[e].t()
        return y if self.b2 is None else y + self.b2[e]

    def gather_einsum(self, x_TD, weights_TK, ids_TK):
        def lin(w, b, x, spec):
            y = torch.einsum(spec, x, w[ids_TK])
            return y if b is None else y + b[ids_TK]

        a = self.act(lin(self.w1, self.b1, x_TD, "td,tkfd->tkf"))
        a = a * self.up(lin(self.w3, self.b3, x_TD, "td,tkfd->tkf")) if self.gated else a
        y_TKD = lin(self.w2, self.b2, a, "tkf,tkdf->tkd")
        return torch.einsum("tkd,tk->td", y_TKD, weights_TK)

    def forward(self, x):
        x_TD = x.reshape(-1, x.shape[-1])
        weights_TK, ids_TK = self.route(x_TD)
        weights_TK = weights_TK.to(x.dtype)
        E = self.gate.weight.shape[0]
        if self.form == "gather_einsum":
            out_TD = self.gather_einsum(x_TD, weights_TK, ids_TK)
        elif self.form == "dense":
            gates_TE = torch.zeros(x_TD.shape[0], E, dtype=x.dtype, device=x.device).scatter(1, ids_TK, weights_TK)
            y_ETD = torch.stack([self.expert(e, x_TD) for e in range(E)])
            out_TD = torch.einsum("te,etd->td", gates_TE, y_ETD)
        elif self.form == "masked_sum":
            out_TD = 0
            for e in range(E):
                out_TD = out_TD + self.expert(e, x_TD) * (weights_TK * (ids_TK == e)).sum(dim=-1, keepdim=True)
        else:
            out_TD = torch.zeros_like(x_TD)
            for e in range(E):
                if self.form == "loop_where":
                    token_idx, slot_idx = torch.where(ids_TK == e)
                    out_TD.index_add_(
                        0, token_idx, self.expert(e, x_TD[token_idx]) * weights_TK[token_idx, slot_idx, None]
                    )
                else:
                    mask_TK = ids_TK == e
                    rows = mask_TK.any(dim=-1).nonzero().squeeze(-1)
                    w_rows = (weights_TK * mask_TK).sum(dim=-1)[rows]
                    out_TD[rows] += self.expert(e, x_TD[rows]) * w_rows[:, None]
        if self.shared_expert is not None:
            out_TD = out_TD + self.shared_expert(x_TD)
        return out_TD.reshape(x.shape)
