"""Zero-computation experts (LongCat-Flash): router ids E..E+Z-1 return the token itself, times its weight.

Legend: T tokens, D model dim, K top-k, E experts with weights, Z identity experts.

The four ops never see them: before dispatch a pick of an identity expert becomes a dropped pick (id -1,
weight 0: dispatch sorts it past the last expert's group, experts and combine add nothing for it), and after
combine each token adds itself times the summed weight of its identity picks:

    ids_TK, weights_TK, identity_T1 = split(ids_TK, weights_TK, E)
    out_TD = combine(experts(dispatch(x_TD, ids_TK, weights_TK))) + x_TD · identity_T1

The rewrite puts both calls in the graph around the ops (`passes/rewrite.py`); the experts probe runs them
around the reference ops (`passes/experts.run_experts`). Only lowerings that take dropped picks run such a
spec (`MoESpec.dropped_picks`).
"""

from __future__ import annotations

import torch


def split(ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int):
    """(ids_TK with identity picks as -1, weights_TK with them 0, identity_T1: their summed weight, fp32)."""
    identity_TK = ids_TK >= num_experts
    weights_TK = weights_TK.float()
    identity_T1 = torch.where(identity_TK, weights_TK, 0.0).sum(-1, keepdim=True)
    return ids_TK.masked_fill(identity_TK, -1), weights_TK.masked_fill(identity_TK, 0.0), identity_T1


def add(out_TD: torch.Tensor, x_TD: torch.Tensor, identity_T1: torch.Tensor) -> torch.Tensor:
    """out_TD plus each token times the summed weight of its identity picks, in out's dtype."""
    return out_TD + (x_TD.float() * identity_T1).to(out_TD.dtype)
