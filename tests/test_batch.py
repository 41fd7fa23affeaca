import pytest
import torch

from lightning_entropy.batch import RolloutBatch, make_agg_norm


def _batch(B=6, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 3, 1, 4, 0, 2])[:B]
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return RolloutBatch(
        prompt_ids=torch.ones(B, 2, dtype=torch.long),
        prompt_mask=torch.ones(B, 2, dtype=torch.long),
        response_ids=torch.randint(3, 20, (B, T), generator=g) * mask,
        response_mask=mask,
        group_ids=torch.arange(B) // 2,
        truncated=lengths == T,
        rewards=torch.rand(B, generator=g),
        token_weights=(torch.rand(B, T, generator=g) > 0.3).float() * mask,
        info=[{"i": i} for i in range(B)],
    )


MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def _reference(values, w, mode, n_seqs, const):
    # the definitions of METHODS.md §0, written out directly
    if mode == "token-mean":
        return (values * w).sum() / w.sum()
    rows = [i for i in range(w.shape[0]) if w[i].sum() > 0]
    if mode == "seq-mean-token-mean":
        return sum((values[i] * w[i]).sum() / w[i].sum() for i in rows) / len(rows)
    if mode == "seq-mean-token-sum":
        return sum((values[i] * w[i]).sum() for i in rows) / len(rows)
    return (values * w).sum() / (n_seqs * const)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("micro", [1, 2, 4, 6])
def test_micro_batch_split_does_not_change_loss_or_gradient(mode, micro):
    b = _batch()
    values = torch.randn(6, 5, requires_grad=True)
    norm = make_agg_norm([b], mode, const=5.0)
    ref = _reference(values, b.weights, mode, 6, 5.0)
    (g_ref,) = torch.autograd.grad(ref, values)
    total = 0
    for start in range(0, 6, micro):
        m = b.index(slice(start, start + micro))
        m.agg_norm = norm
        total = total + m.agg(values[start : start + micro], mode=mode)
    (g,) = torch.autograd.grad(total, values)
    assert torch.allclose(total, ref, atol=1e-6)
    assert torch.allclose(g, g_ref, atol=1e-6)


def test_empty_mask_gives_zero_not_nan():
    b = _batch()
    b.token_weights = torch.zeros_like(b.token_weights)
    for mode in MODES:
        out = b.agg(torch.randn(6, 5), mode=mode)
        assert torch.isfinite(out) and out == 0


def test_world_size_scaling_matches_single_process():
    # two "ranks" each holding half; DDP averages gradients, so each rank scales by world size
    b = _batch()
    values = torch.randn(6, 5)
    norm_all = make_agg_norm([b], "token-mean", const=5.0)
    halves = [b.index(slice(0, 3)), b.index(slice(3, 6))]
    pooled = make_agg_norm(halves, "token-mean", const=5.0)
    pooled.world_size = 2
    per_rank = []
    for i, h in enumerate(halves):
        h.agg_norm = pooled
        per_rank.append(h.agg(values[3 * i : 3 * i + 3]))
    assert torch.allclose(sum(per_rank) / 2, b.agg(values), atol=1e-6)
    assert norm_all.tokens == pooled.tokens


def test_index_split_cat_roundtrip():
    b = _batch()
    parts = b.split(4)
    assert [p.size for p in parts] == [4, 2]
    back = RolloutBatch.cat(parts)
    for name in ("response_ids", "response_mask", "group_ids", "rewards", "token_weights"):
        assert torch.equal(getattr(back, name), getattr(b, name))
    assert back.info == b.info
    sub = b.index([5, 0])
    assert sub.info == [{"i": 5}, {"i": 0}] and torch.equal(sub.group_ids, torch.tensor([2, 0]))
