"""Independent float64 references: plain Python loops over groups, samples and tokens.

They share no code with gift_megatron.algo; autograd through the float64 scalars gives the
reference gradients.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def _mean(xs):
    return sum(xs) / len(xs)


def _bessel_std(xs):
    if len(xs) < 2:
        return torch.zeros((), dtype=F64)
    m = _mean(xs)
    return torch.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def groups_of(group_index):
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(group_index.tolist()):
        groups.setdefault(g, []).append(i)
    return list(groups.values())


def ref_advantages(rewards, group_index, eps=1e-6, estimator="grpo"):
    adv = [None] * len(rewards)
    for members in groups_of(group_index):
        r = [torch.tensor(float(rewards[i]), dtype=F64) for i in members]
        m, s = _mean(r), _bessel_std(r)
        for i, ri in zip(members, r):
            adv[i] = (ri - m) / (s + eps) if estimator == "grpo" else ri - m
    return adv


def _token_rows(x_BT, mask_BT):
    """x as a list of lists of float64 scalars (only the masked positions)."""
    return [[x_BT[i, t] for t in range(x_BT.shape[1]) if mask_BT[i, t] > 0] for i in range(x_BT.shape[0])]


def ref_gift(logp, base, mask, rewards, group_index, *, floor, eps=1e-6, detach=True, p=0.0, z_scale=1.0):
    """sum over groups and members of (A_i - z_i)^2, divided by the number of samples."""
    lp, bs = _token_rows(logp, mask), _token_rows(base, mask)
    s = [sum(a - b for a, b in zip(lp[i], bs[i])) / (len(lp[i]) ** p) for i in range(len(lp))]
    adv = ref_advantages(rewards, group_index, eps)
    total = torch.zeros((), dtype=F64)
    for members in groups_of(group_index):
        sv = [s[i] for i in members]
        st = [x.detach() for x in sv] if detach else sv
        m, sd = _mean(st), _bessel_std(st)
        denom = torch.clamp(sd, min=floor) + eps
        for i, si in zip(members, sv):
            z = z_scale * (si - m) / denom
            total = total + (adv[i] - z) ** 2
    return total / len(lp)


def ref_ppo(logp, old, ref, mask, adv, *, low, high, kl_coef, mode, max_len):
    lp, ol = _token_rows(logp, mask), _token_rows(old, mask)
    rf = _token_rows(ref, mask) if ref is not None else None
    n_seq, n_tok = len(lp), sum(len(r) for r in lp)
    total = torch.zeros((), dtype=F64)
    for i in range(n_seq):
        seq = torch.zeros((), dtype=F64)
        for t in range(len(lp[i])):
            ratio = torch.exp(lp[i][t] - ol[i][t])
            a = adv[i]
            tok = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - low, 1 + high))
            if kl_coef:
                d = rf[i][t] - lp[i][t]
                tok = tok + kl_coef * (torch.exp(d) - d - 1)
            seq = seq + tok
        if mode == "seq-mean-token-mean":
            total = total + seq / len(lp[i]) / n_seq
        elif mode == "token-mean":
            total = total + seq / n_tok
        else:
            total = total + seq / (n_seq * max_len)
    return total


def ref_gspo(logp, old, mask, adv, *, low, high):
    lp, ol = _token_rows(logp, mask), _token_rows(old, mask)
    total = torch.zeros((), dtype=F64)
    for i in range(len(lp)):
        ratio = torch.exp(sum(a - b for a, b in zip(lp[i], ol[i])) / len(lp[i]))
        a = adv[i]
        total = total + torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - low, 1 + high))
    return total / len(lp)


def ref_logprobs(logits_BTV, target_BT):
    """log softmax by the definition, in float64, one position at a time."""
    out = torch.empty(target_BT.shape, dtype=F64)
    x = logits_BTV.to(F64)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            row = x[b, t]
            m = float(row.max())
            lse = m + math.log(float(torch.exp(row - m).sum()))
            out[b, t] = row[target_BT[b, t]] - lse
    return out
