"""Advantage estimators (METHODS.md §1): each checked against numbers worked out by hand from the
formula, plus the generic edge cases and a registry-driven smoke test of every registered name."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import lightning_entropy  # noqa: F401  (registers the built-in components)
from lightning_entropy.batch import RolloutBatch
from lightning_entropy.registry import ADVANTAGES, RegistryError

ATOL = 1e-5


def make_batch(
    rewards: list[float],
    groups: list[int],
    lengths: list[int] | None = None,
    T: int | None = None,
    entropy: list[list[float]] | torch.Tensor | None = None,
    **extra: object,
) -> RolloutBatch:
    """A RolloutBatch with right-padded masks of the given lengths (default: full length T)."""
    B = len(rewards)
    T = T or max(max(lengths or [4]), 1)
    lengths = lengths if lengths is not None else [T] * B
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    if entropy is None:
        ent = torch.ones(B, T)
    else:
        ent = (
            torch.tensor([row + [9.0] * (T - len(row)) for row in entropy])
            if isinstance(entropy, list)
            else entropy
        )
    fields = {
        k: (torch.tensor(v, dtype=torch.float32) if isinstance(v, list) else v) for k, v in extra.items()
    }
    return RolloutBatch(
        prompt_ids=torch.zeros(B, 2, dtype=torch.long),
        prompt_mask=torch.ones(B, 2, dtype=torch.long),
        response_ids=torch.zeros(B, T, dtype=torch.long),
        response_mask=mask,
        group_ids=torch.tensor(groups, dtype=torch.long),
        truncated=torch.tensor(lengths) == T,
        rewards=torch.tensor(rewards, dtype=torch.float32),
        entropy=ent.float(),
        **fields,
    )


def pad_rows(rows: list[list[float]], T: int, fill: float = 77.0) -> torch.Tensor:
    """Per-token values; padding gets a loud value that must never leak into a result."""
    return torch.tensor([row + [fill] * (T - len(row)) for row in rows], dtype=torch.float32)


def seq(adv: torch.Tensor) -> torch.Tensor:
    """First-token advantage of each row (sequence-level estimators broadcast one value)."""
    return adv[:, 0]


def build(name: str, **kwargs: object):
    return ADVANTAGES.build(name, kwargs)


def random_batch(seed: int = 0, n_groups: int = 5, group_size: int = 4, T: int = 6) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    B = n_groups * group_size
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = 0, T  # an empty response and a truncated one
    ids = (torch.arange(B) % n_groups) * 7 + 3  # interleaved, non-contiguous group ids
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    return RolloutBatch(
        prompt_ids=torch.zeros(B, 2, dtype=torch.long),
        prompt_mask=torch.ones(B, 2, dtype=torch.long),
        response_ids=torch.randint(0, 50, (B, T), generator=g),
        response_mask=mask,
        group_ids=ids,
        truncated=lengths == T,
        rewards=torch.randint(0, 2, (B,), generator=g).float(),
        old_logprobs=-torch.rand(B, T, generator=g),
        entropy=torch.rand(B, T, generator=g) * 3,
        self_certainty=torch.rand(B, T, generator=g) * 4,
        sampled_logits=torch.randn(B, T, generator=g) * 5,
        paired_rewards=torch.randint(0, 2, (B,), generator=g).float(),
    )


# ---- registry-driven -------------------------------------------------------------------------

EXPECTED = {
    "qae", "canon", "gtpo", "grpo_s", "entropy_adv", "mapo", "aapo", "ucas", "egsw", "riskpo",
    "passk", "opo", "reinforce_pp_baseline", "hapo_token", "copo", "ear",
}  # fmt: skip


def test_catalog_registered() -> None:
    assert EXPECTED <= set(ADVANTAGES.names())


@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_every_estimator_runs_with_defaults(name: str) -> None:
    batch = random_batch()
    est = build(name)
    adv = est(batch)
    assert adv.shape == batch.response_mask.shape
    assert torch.isfinite(adv).all()
    assert (adv[batch.response_mask == 0] == 0).all()
    for key in est.requires:
        assert key in {"ref_logprobs", "self_certainty", "sampled_logits", "paired_rewards"}
    for key in est.provides:  # extra fields the estimator writes: finite, zero on padding
        value = getattr(batch, key)
        assert value.shape[0] == batch.size and torch.isfinite(value).all()
        if value.dim() == 2:
            assert (value[batch.response_mask == 0] == 0).all()
    # a second call (stateful estimators move on) stays well-formed
    assert torch.isfinite(est(batch)).all()


@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_signature_and_docstring_contract(name: str) -> None:
    cls = ADVANTAGES.get(name)
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    for p in params:
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        assert p.kind is p.KEYWORD_ONLY and p.default is not inspect.Parameter.empty, (name, p.name)
    assert "arXiv" in (cls.__doc__ or ""), name


@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_truncation_flag_is_not_read(name: str) -> None:
    # A truncated response is scored by its reward like any other; the flag must not change A.
    batch = random_batch(seed=3)
    a = build(name)(batch)
    batch.truncated = ~batch.truncated
    assert torch.allclose(a, build(name)(batch))


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("qae", {"interpolation": "nearest"}),
        ("qae", {"k": float("nan")}),
        ("canon", {"metric": "perplexity"}),
        ("canon", {"lam": 1.5}),
        ("canon", {"anneal_schedule": "cosine"}),
        ("canon", {"max_response_length": 0}),
        ("gtpo", {"norm": "global"}),
        ("grpo_s", {"eps": 0.0}),
        ("entropy_adv", {"kappa": 0.0}),
        ("entropy_adv", {"alpha": -1.0}),
        ("entropy_adv", {"base": "nope"}),
        ("mapo", {"eps": 0.0}),
        ("aapo", {"clip_low": -0.1}),
        ("ucas", {"gamma": -1.0}),
        ("egsw", {"temperature": 0.0}),
        ("egsw", {"mode": "token"}),
        ("riskpo", {"alpha": 0.9, "beta": 0.2}),
        ("riskpo", {"bundle_size": 0}),
        ("passk", {"variant": "best"}),
        ("passk", {"k": 0}),
        ("riskpo", {"credit": "shapley"}),
        ("riskpo", {"quantile_mode": "mix"}),
        ("riskpo", {"lr_q": 0.0}),
        ("reinforce_pp_baseline", {"eps": 0.0}),
        ("hapo_token", {"fallback": 0.0}),
        ("ear", {"mode": "both"}),
        ("ear", {"beta": 0.0}),
        ("ear", {"base": "nope"}),
    ],
)
def test_bad_hyperparameters_raise(name: str, kwargs: dict) -> None:
    with pytest.raises(RegistryError) as err:
        build(name, **kwargs)
    assert isinstance(err.value.__cause__, ValueError)


# ---- QAE -------------------------------------------------------------------------------------


def test_qae_linear_matches_readme_example_and_lower_gives_gate() -> None:
    # G=8, K=0.4, three zeros: torch.quantile (linear) gives 0.8; the lower empirical quantile gives 1.
    r = [0, 0, 0, 1, 1, 1, 1, 1]
    lin = build("qae", k=0.4, interpolation="linear", norm_std=False)(make_batch(r, [0] * 8))
    assert torch.allclose(seq(lin), torch.tensor(r) - 0.8, atol=ATOL)
    low = build("qae", k=0.4, interpolation="lower", norm_std=False)(make_batch(r, [0] * 8))
    assert torch.allclose(seq(low), torch.tensor([-1.0, -1, -1, 0, 0, 0, 0, 0]))


def test_qae_two_regime_gate() -> None:
    # hard prompt (p = 0.2 <= 1-K): b = 0, only the success moves; easy (p = 0.8): b = 1, only the failure.
    # std of {1,0,0,0,0} (unbiased) = sqrt(0.2) = 0.4472136
    batch = make_batch([1, 0, 0, 0, 0, 1, 1, 1, 1, 0], [0] * 5 + [1] * 5)
    adv = seq(build("qae")(batch))
    s = math.sqrt(0.2) + 1e-6
    expected = torch.tensor([1 / s, 0, 0, 0, 0, 0, 0, 0, 0, -1 / s])
    assert torch.allclose(adv, expected, atol=ATOL)


def test_qae_gate_boundary_is_exact() -> None:
    # p = 1-K exactly is "hard": F(0) = 7/25 = K. In floating point 0.28*25 = 7.000000000000001.
    r = [0.0] * 7 + [1.0] * 18
    adv = seq(build("qae", k=0.28, norm_std=False)(make_batch(r, [0] * 25)))
    assert torch.equal(adv, torch.tensor(r))
    adv = seq(build("qae", k=0.4, norm_std=False)(make_batch([1, 1, 1, 0, 0], [0] * 5)))
    assert torch.equal(adv, torch.tensor([1.0, 1, 1, 0, 0]))


def test_qae_zero_share_with_binary_rewards() -> None:
    # Groups of 10 with c = 0..10 successes. Gate: c/G <= 1-K -> failures have zero advantage (G-c of
    # them), else successes (c). Total 83 of 110.
    G, K = 10, 0.4
    rewards, groups, zero = [], [], 0
    for c in range(G + 1):
        rewards += [1.0] * c + [0.0] * (G - c)
        groups += [c] * G
        zero += G - c if c / G <= 1 - K else c
    assert zero == 83
    est = build("qae", k=K)
    adv = seq(est(make_batch(rewards, groups)))
    assert int((adv == 0).sum()) == zero
    assert est.metrics["zero_frac"].item() == pytest.approx(zero / len(rewards))


def test_qae_ties_and_interpolation_modes() -> None:
    r = [0.2, 0.9, 0.5, 0.1]  # sorted 0.1 0.2 0.5 0.9
    lower = seq(build("qae", k=0.5, norm_std=False)(make_batch(r, [0] * 4)))
    assert torch.allclose(lower, torch.tensor(r) - 0.2)  # ceil(0.5*4)-th smallest
    linear = seq(build("qae", k=0.5, interpolation="linear", norm_std=False)(make_batch(r, [0] * 4)))
    assert torch.allclose(linear, torch.tensor(r) - torch.quantile(torch.tensor(r), 0.5))
    tied = [0.5, 0.5, 0.2, 0.9]  # sorted 0.2 0.5 0.5 0.9: both quantiles sit on the tie
    for interp in ("lower", "linear"):
        a = seq(build("qae", k=0.4, interpolation=interp, norm_std=False)(make_batch(tied, [0] * 4)))
        assert torch.allclose(a, torch.tensor(tied) - 0.5)


def test_qae_fallbacks_and_edges() -> None:
    r = torch.tensor([1.0, 0, 0, 1, 1, 0.5])
    batch = make_batch(r.tolist(), [0] * 6)
    mean, std = r.mean(), r.std()
    for k in (0.0, 1.0, -0.3, 2.0):  # K outside (0, 1): the group mean, i.e. GRPO
        assert torch.allclose(seq(build("qae", k=k)(batch)), (r - mean) / (std + 1e-6), atol=ATOL)
    # group of one keeps its raw reward; all-equal group gives 0
    adv = seq(build("qae")(make_batch([0.7, 1, 1, 1], [5, 6, 6, 6])))
    assert torch.allclose(adv, torch.tensor([0.7, 0, 0, 0]))


# ---- CANON -----------------------------------------------------------------------------------


def test_canon_entropy_hand_case_with_tie_across_the_split() -> None:
    # Masked-mean entropies m = [0.3, 0.1, 0.3, 0.5]; stable ascending sort: rows 1, 0 | 2, 3.
    # L = {1, 0} (row 0 wins the tie by batch order), H = {2, 3}; r = [1,0,0,0]: mu_L = 0.5, mu_H = 0.
    # lam=0.7, alpha=1.2, beta=0.1:
    #   row0 (L): 0.7 (1.2*1 - 0 - 0.1) + 0.3 (1 - 0.5) = 0.92;   row1 (L): 0.7 (-0.1) + 0.3 (-0.5) = -0.22
    #   rows 2, 3 (H): 0.7 (0 - 1.2*0.5 + 0.1) + 0.3 (0 - 0) = -0.35
    ent = [[0.3, 0.3], [0.1, 0.1, 0.1], [0.3], [0.4, 0.6, 0.5, 0.5]]
    batch = make_batch([1, 0, 0, 0], [0] * 4, lengths=[2, 3, 1, 4], entropy=ent)
    adv = build("canon", lam=0.7, alpha=1.2, beta=0.1)(batch)
    expected = torch.tensor([0.92, -0.22, -0.35, -0.35])
    assert torch.allclose(seq(adv), expected, atol=ATOL)
    assert (adv[batch.response_mask == 0] == 0).all()
    scaled = build("canon", lam=0.7, alpha=1.2, beta=0.1, max_response_length=10)(batch)
    assert torch.allclose(seq(scaled), expected / 10, atol=ATOL)


def test_canon_length_hand_case() -> None:
    # lengths [2, 1, 2, 3] (row 3 truncated at T=3): sort 1, 0 | 2, 3; r = [1,0,0,0]: mu_L = 0.5, mu_H = 0.
    #   L: lam (r - alpha mu_H - beta) + (1-lam)(r - mu_L): row0 0.7*0.9 + 0.3*0.5 = 0.78, row1 -0.07 - 0.15 = -0.22
    #   H: lam (alpha r - mu_L + beta) + (1-lam)(r - mu_H): rows 2, 3: 0.7 (-0.5 + 0.1) = -0.28
    batch = make_batch([1, 0, 0, 0], [0] * 4, lengths=[2, 1, 2, 3])
    assert batch.truncated.tolist() == [False, False, False, True]
    adv = build("canon", metric="length", lam=0.7, alpha=1.2, beta=0.1)(batch)
    assert torch.allclose(seq(adv), torch.tensor([0.78, -0.22, -0.28, -0.28]), atol=ATOL)


def test_canon_odd_group_single_and_equal() -> None:
    # n = 3: L = first floor(3/2) = 1 response. m = [0.2, 0.1, 0.3] -> L = {1}, H = {0, 2};
    # r = [1, 1, 0]: mu_L = 1, mu_H = 0.5. Defaults lam=1, alpha=1, beta=0: H: r - mu_L, L: r - mu_H.
    batch = make_batch([1, 1, 0], [0] * 3, lengths=[1, 1, 1], entropy=[[0.2], [0.1], [0.3]])
    assert torch.allclose(seq(build("canon")(batch)), torch.tensor([0.0, 0.5, -1.0]))
    # group of one: mu_L = mu_H = 0 -> A = r + lam*beta; all-equal rewards with alpha=1, beta=0 -> 0
    batch = make_batch([0.6, 1, 1, 1, 1], [0, 1, 1, 1, 1])
    assert torch.allclose(seq(build("canon", beta=0.1)(batch))[:1], torch.tensor([0.7]))
    assert torch.allclose(seq(build("canon", lam=0.3)(batch))[1:], torch.zeros(4))


def test_canon_reduces_to_dr_grpo_with_equal_halves() -> None:
    g = torch.Generator().manual_seed(1)
    r = torch.rand(12, generator=g)
    groups = [0] * 6 + [1] * 6
    batch = make_batch(r.tolist(), groups, entropy=torch.rand(12, 4, generator=g))
    mean = torch.tensor([r[:6].mean().item()] * 6 + [r[6:].mean().item()] * 6)
    assert torch.allclose(seq(build("canon", lam=0.5)(batch)), r - mean, atol=ATOL)


def test_canon_annealed_lambda() -> None:
    # batch mean reward m = 3/8; inter_first lam = 1 - m = 5/8, intra_first (code) lam = 3/8.
    r = [1, 0, 0, 0, 1, 1, 0, 0]
    ent = [[0.1], [0.2], [0.3], [0.4], [0.4], [0.3], [0.2], [0.1]]
    batch = make_batch(r, [0] * 4 + [1] * 4, lengths=[1] * 8, entropy=ent)
    # group 0: L = rows 0, 1 (mu_L = 0.5), H = rows 2, 3 (mu_H = 0)
    # group 1: L = rows 7, 6 (mu_L = 0),   H = rows 5, 4 (mu_H = 1)
    inter = torch.tensor([1 - 0, 0 - 0, 0 - 0.5, 0 - 0.5, 1 - 0, 1 - 0, 0 - 1, 0 - 1])  # alpha=1, beta=0
    intra = torch.tensor([1 - 0.5, 0 - 0.5, 0 - 0, 0 - 0, 1 - 1, 1 - 1, 0 - 0, 0 - 0])
    for schedule, lam in (("inter_first", 5 / 8), ("intra_first", 3 / 8)):
        est = build("canon", anneal=True, anneal_schedule=schedule, lam=0.0)
        adv = seq(est(batch))
        assert torch.allclose(adv, lam * inter + (1 - lam) * intra, atol=ATOL)
        assert est.metrics["lambda"].item() == pytest.approx(lam)


def test_canon_zero_entropy_and_empty_response() -> None:
    batch = make_batch([1, 0, 1, 0], [0] * 4, lengths=[0, 2, 2, 2], entropy=torch.zeros(4, 2))
    adv = build("canon")(batch)
    assert torch.isfinite(adv).all() and (adv[0] == 0).all()
    # all metrics 0 -> batch order decides: L = {0, 1} (mu_L = 0.5), H = {2, 3} (mu_H = 0.5)
    assert torch.allclose(seq(adv)[1:], torch.tensor([-0.5, 0.5, -0.5]))


# ---- GTPO / GRPO-S ---------------------------------------------------------------------------


def test_gtpo_hand_case() -> None:
    # O+ = rows 0, 1; O- = rows 2, 3. alpha1 = 1, alpha2 = 0.1.
    # O+: t0 d=2, sum H = 0.8: row0 1 + 0.1*2*0.2/0.8 = 1.05, row1 1.15; t1: row0 1.15, row1 1.05;
    #     t2 d=1: row0 1.1. Tokens {1.05, 1.15, 1.1, 1.15, 1.05}: mean 1.1, population std sqrt(0.002).
    # O-: t0 h=2, 1/H = {2, 4}: row2 -1 - 0.1*2*(2/6) = -1.0666667, row3 -1 - 0.1*2*(4/6) = -1.1333333;
    #     t1 h=1: row2 -1.1. Tokens mean -1.1, population std sqrt(2/3)/30.
    ent = [[0.2, 0.6, 0.5], [0.6, 0.2], [0.5, 0.25], [0.25]]
    batch = make_batch([1, 1, 0, 0], [0] * 4, lengths=[3, 2, 2, 1], entropy=ent)
    adv = build("gtpo")(batch)
    sp, sn = math.sqrt(0.002) + 1e-6, math.sqrt(2 / 3) / 30 + 1e-6
    expected = torch.tensor(
        [
            [-0.05 / sp, 0.05 / sp, 0.0],
            [0.05 / sp, -0.05 / sp, 0.0],
            [(1.1 - 1.0666667) / sn, 0.0, 0.0],
            [(1.1 - 1.1333333) / sn, 0.0, 0.0],
        ]
    )
    assert torch.allclose(adv, expected, atol=1e-4)


def test_gtpo_edges() -> None:
    # Zero entropy everywhere: shares collapse to 1/count, every shaped reward of a set is equal -> 0.
    batch = make_batch([1, 0, 1, 0], [0] * 4, lengths=[3, 2, 0, 1], entropy=torch.zeros(4, 3))
    adv = build("gtpo")(batch)
    assert torch.isfinite(adv).all() and (adv == 0).all()
    # all-right / all-wrong groups with uniform entropy and a group of one: 0
    batch = make_batch([1, 1, 0, 0, 1], [0, 0, 1, 1, 2], lengths=[2, 2, 3, 3, 4])
    assert build("gtpo")(batch).abs().max() < 1e-8  # float64 rounding of the mean only


def test_gtpo_joint_normalisation() -> None:
    # rows 0 (success) and 1 (failure), one token each, H = 0.5: r~ = 1.1 and -1.1; joint mean 0, std 1.1
    batch = make_batch([1, 0], [0, 0], lengths=[1, 1], entropy=[[0.5], [0.5]])
    adv = build("gtpo", norm="joint")(batch)
    assert torch.allclose(adv[:, 0], torch.tensor([1.0, -1.0]), atol=1e-5)
    assert (build("gtpo")(batch) == 0).all()  # separate: each set is a single token


def test_grpo_s_hand_case() -> None:
    # Hbar = [0.2, 0.6, 0.5, 0.25]; O+ shares 0.25, 0.75 of |O+| = 2: r^ = 1.05, 1.15;
    # O- inverse shares 2/6, 4/6: r^ = -1.0666667, -1.1333333. Row 4 is empty: excluded, A = 0.
    ent = [[0.2, 0.2], [0.5, 0.7], [0.5, 0.5], [0.25, 0.25], []]
    batch = make_batch([1, 1, 0, 0, 0], [0] * 5, lengths=[2, 2, 2, 2, 0], entropy=ent)
    shaped = torch.tensor([1.05, 1.15, -1.0 - 0.2 / 3, -1.0 - 0.4 / 3])
    adv = build("grpo_s")(batch)
    expected = (shaped - shaped.mean()) / (shaped.std() + 1e-6)
    assert torch.allclose(seq(adv)[:4], expected, atol=1e-5)
    assert (adv[4] == 0).all()
    sep = build("grpo_s", norm="separate")(batch)
    assert torch.allclose(seq(sep)[:4], torch.tensor([-1.0, 1.0, 1.0, -1.0]), atol=1e-4)


def test_grpo_s_edges() -> None:
    # group of one keeps r^ (GRPO convention): r^ = 1 + 0.1*1 = 1.1; all-equal uniform-entropy group -> 0;
    # zero entropy -> finite
    batch = make_batch([1, 0, 0, 0], [0, 1, 1, 1])
    adv = seq(build("grpo_s")(batch))
    assert torch.allclose(adv, torch.tensor([1.1, 0, 0, 0]), atol=1e-5)
    zero = make_batch([1, 0, 1, 0], [0] * 4, entropy=torch.zeros(4, 4))
    assert torch.isfinite(build("grpo_s")(zero)).all()


# ---- entropy advantage term / EGSW (composed on a base estimator) ------------------------------


def test_entropy_adv_hand_case() -> None:
    # GRPO on r = [1,0,0,0]: mean 0.25, std 0.5 -> A = [1.5, -0.5, -0.5, -0.5]; kappa = 2
    # row0 H = [0.5, 3.0]: psi = min(0.2, 0.75) = 0.2, min(1.2, 0.75) = 0.75 -> [1.7, 2.25]
    # row1 H = [0.1, 2.0]: psi = min(0.04, 0.25), min(0.8, 0.25) -> [-0.46, -0.25] (sign kept)
    ent = [[0.5, 3.0], [0.1, 2.0], [0.0, 0.0], [1.0, 1.0]]
    batch = make_batch([1, 0, 0, 0], [0] * 4, lengths=[2, 2, 2, 1], entropy=ent)
    # row2 H = 0: psi = 0; row3 H = [1.0, pad]: psi = min(0.4, 0.25) -> [-0.25, 0]
    adv = build("entropy_adv")(batch)
    a = 0.5 / (0.5 + 1e-6)  # GRPO's eps makes every A a hair smaller than the round numbers
    expected = torch.tensor(
        [[1.5 * a + 0.2, 2.25 * a], [-0.5 * a + 0.04, -0.25 * a], [-0.5 * a, -0.5 * a], [-0.25 * a, 0.0]]
    )
    assert torch.allclose(adv, expected, atol=1e-5)
    # base by name with kwargs: Dr. GRPO-style A = r - mean = [0.75, -0.25, ...]; row0 t1: min(1.2, 0.375)
    adv = build("entropy_adv", base_kwargs={"norm_std": False})(batch)
    assert adv[0, 1].item() == pytest.approx(0.75 + 0.375)
    # all-equal group: A = 0 -> psi = 0
    assert (build("entropy_adv")(make_batch([1, 1], [0, 0], entropy=torch.full((2, 4), 2.0))) == 0).all()


def test_entropy_adv_composition_requires_and_state() -> None:
    assert build("entropy_adv", base="ucas").requires == {"self_certainty", "sampled_logits"}
    assert build("entropy_adv").requires == frozenset()
    assert build("entropy_adv").state_dict() == {}
    est = build("entropy_adv", base="riskpo", base_kwargs={"bundle_size": 2, "quantile_mode": "track"})
    batch = random_batch(seed=4)
    est(batch)
    state = est.state_dict()
    assert state["base"]["q_track"] is not None
    twin = build("entropy_adv", base="riskpo", base_kwargs={"bundle_size": 2, "quantile_mode": "track"})
    twin.load_state_dict(state)
    assert torch.equal(est(batch), twin(batch))
    with pytest.raises(ValueError):
        build("entropy_adv").load_state_dict({"base": {"q_track": [0.0, 1.0]}})


def test_egsw_step_hand_case() -> None:
    # base dr_grpo on r = [1, 0]: A = [0.5, -0.5]. alpha = 0.5, P = 1.
    # t0: logits 0.5 + 0.5*1.0 = 1.0 and -0.5 + 0 = -0.5, softmax x 2 sequences; t1: only row 1 active -> w = 1
    batch = make_batch([1, 0], [0, 0], lengths=[1, 2], entropy=[[1.0], [0.0, 2.0]])
    adv = build("egsw", alpha=0.5, base="dr_grpo")(batch)
    w0 = math.exp(1.0) / (math.exp(1.0) + math.exp(-0.5))
    expected = torch.tensor([[0.5 * 2 * w0, 0.0], [-0.5 * 2 * (1 - w0), -0.5]])
    assert torch.allclose(adv, expected, atol=1e-6)
    plain = build("egsw", alpha=0.5, base="dr_grpo", rescale=False)(batch)
    assert torch.allclose(plain, torch.tensor([[0.5 * w0, 0.0], [-0.5 * (1 - w0), -0.5]]), atol=1e-6)


def test_egsw_trajectory_and_limits() -> None:
    # sequence means: row0 A = 0.5, H = 1.0 -> logit 1.0; row1 A = -0.5, H = 1.0 -> logit 0.0
    batch = make_batch([1, 0], [0, 0], lengths=[1, 2], entropy=[[1.0], [0.0, 2.0]])
    adv = build("egsw", alpha=0.5, base="dr_grpo", mode="trajectory")(batch)
    w0 = math.exp(1.0) / (math.exp(1.0) + 1.0)
    assert torch.allclose(adv, torch.tensor([[w0, 0.0], [-(1 - w0), -(1 - w0)]]), atol=1e-6)
    # a very hot softmax gives uniform weights: A unchanged
    hot = build("egsw", temperature=1e9)(random_batch(seed=2))
    assert torch.allclose(hot, build("grpo")(random_batch(seed=2)), atol=1e-5)


# ---- MAPO / AAPO / UCAS ----------------------------------------------------------------------


def test_mapo_hand_case_and_edges() -> None:
    # r = [1,0,0,0] (group ids interleaved with a second group): p = 0.25, lam = 0.75, mu = 0.25, sigma = 0.5
    # A_std = [1.5, -0.5], A_apd = [3, -1] -> A = [0.75*1.5 + 0.25*3, 0.75*-0.5 + 0.25*-1] = [1.875, -0.625]
    batch = make_batch([1, 1, 0, 1, 0, 1, 0, 1, 7], [0, 1, 0, 1, 0, 1, 0, 1, 2])
    adv = seq(build("mapo")(batch))
    assert torch.allclose(adv[[0, 2, 4, 6]], torch.tensor([1.875, -0.625, -0.625, -0.625]), atol=1e-4)
    # second group all right (p=1 -> lam=0, r - mu = 0); a group of one keeps its reward
    assert torch.allclose(adv[[1, 3, 5, 7, 8]], torch.tensor([0.0, 0, 0, 0, 7]))
    assert (build("mapo")(make_batch([0, 0, 0], [0] * 3)) == 0).all()  # all wrong: mu = 0


def test_aapo_hand_case() -> None:
    # GRPO (eps 1e-4) on [1,0,0,0] + clip(r - r', -0.2, 0.28)
    batch = make_batch([1, 0, 0, 0, 1, 1], [0] * 4 + [1, 1], paired_rewards=[0, 0, 1, 0, 0, 1])
    est = build("aapo")
    assert est.requires == {"paired_rewards"}
    a = 0.5 / (0.5 + 1e-4)
    expected = torch.tensor([1.5 * a + 0.28, -0.5 * a, -0.5 * a - 0.2, -0.5 * a, 0.28, 0.0])
    assert torch.allclose(seq(est(batch)), expected, atol=1e-6)  # all-equal group still gets a signal
    unscaled = build("aapo", scale_rewards=False, clip_high=1.0)(batch)
    assert torch.allclose(seq(unscaled)[[0, 4]], torch.tensor([0.75 + 1.0, 1.0]))


def _ucas_batch(rewards: tuple[float, ...] = (1, 0)) -> RolloutBatch:
    cert = pad_rows([[1.0, 2.0], [4.0, 1.0, 1.0]], 3)
    logits = pad_rows([[2.0, 4.0], [0.0, 10.0, 6.0]], 3, fill=100.0)
    return make_batch(list(rewards), [0, 0], lengths=[2, 3], self_certainty=cert, sampled_logits=logits)


def test_ucas_hand_case() -> None:
    # A = [+1, -1]/sqrt(2) (std 0.7071); C = [3, 6] -> C^ = [-1, 1]/sqrt(2)
    # m0 = exp(0.25/sqrt(2)), m1 = exp(0.35/sqrt(2)); lhat over valid tokens: min 0, max 10
    est = build("ucas")
    adv = est(_ucas_batch())
    a = 0.5 / (math.sqrt(0.5) + 1e-6)  # |A_i|
    c = 1.5 / (math.sqrt(4.5) + 1e-6)  # |C^_i|
    s0, s1 = a * math.exp(0.25 * c), -a * math.exp(0.35 * c)
    lh = [x / (10 + 1e-6) for x in (2.0, 4.0, 0.0, 10.0, 6.0)]
    expected = torch.tensor(
        [[s0 - 0.05 * lh[0], s0 - 0.05 * lh[1], 0.0], [s1, s1 - 0.05 * lh[3], s1 - 0.05 * lh[4]]]
    )
    assert torch.allclose(adv, expected, atol=1e-5)
    # the floor: a positive trajectory never turns negative
    floored = build("ucas", gamma=5.0)(_ucas_batch())
    assert (floored[0, :2] >= 0).all() and floored[0, 1] == 0
    assert floored[1, 1].item() == pytest.approx(s1 - 5.0 * lh[3], abs=1e-5)


def test_ucas_edges() -> None:
    # zero-advantage group: only the -gamma*lhat penalty remains (not a no-op)
    adv = build("ucas")(_ucas_batch([1, 1]))
    assert torch.allclose(adv[1], torch.tensor([0.0, -0.05, -0.05 * 0.6]), atol=1e-6)
    # equal logits everywhere -> lhat = 0.5; a group of one -> C^ = 0, m = 1
    b = make_batch(
        [1.0], [0], lengths=[2], self_certainty=torch.full((1, 2), 50.0), sampled_logits=torch.ones(1, 2)
    )
    assert torch.allclose(build("ucas")(b), torch.tensor([[1.0 - 0.025, 1.0 - 0.025]]))


# ---- RiskPO ----------------------------------------------------------------------------------

# Questions 10, 20 form bundle 0 (bundle_size 2), question 30 bundle 1. Rows are shuffled; the k-th
# response of a question is its k-th row in batch order.
RISK_ROWS = [(20, 0.), (10, 1.), (30, 1.), (20, 0.), (10, 0.), (20, 1.), (30, 0.), (10, 1.), (20, 1.)]  # fmt: skip
# papers: bundle 0 (min size 3): S = [1+0, 0+0, 1+1] = [1, 0, 2]; Q20's 4th response is in no paper.
#         bundle 1: S = [1, 0].
# batch quantiles (linear): bundle 0 q_a = 0.4, q_b = 1.8, std 1; bundle 1 q_a = 0.2, q_b = 0.9, std 0.7071.
# A_paper = (1.5 c + g)/2.5 / std, g = [(S-qa)+ - (S-qb)+ + qa - qb]/0.7, c = -(qa-S)+/0.2:
#   bundle 0: S=1 -> g = -0.8/0.7, c = 0 -> -0.4571429; S=0 -> g = -2, c = -2 -> -2; S=2 -> g = 0 -> 0
#   bundle 1: S=1 -> 0; S=0 -> g = -1, c = -1 -> -1/0.7071068
RISK_UNIFORM = [-0.4571429, -0.4571429, 0.0, -2.0, -2.0, 0.0, -1.4142136, 0.0, 0.0]


def _risk_batch() -> RolloutBatch:
    return make_batch([r for _, r in RISK_ROWS], [g for g, _ in RISK_ROWS])


def test_riskpo_batch_mode_uniform_credit() -> None:
    est = build("riskpo", bundle_size=2, credit="uniform", quantile_mode="batch")
    assert torch.allclose(seq(est(_risk_batch())), torch.tensor(RISK_UNIFORM), atol=1e-4)
    assert est.state_dict() == {"q_track": None}


def test_riskpo_credit_modes() -> None:
    base = torch.tensor(RISK_UNIFORM)
    # std: question reward stds (unbiased): Q10 [1,0,1] and Q20 [0,0,1,1]: 0.5773503; Q30 [1,0]: 0.7071068
    q_std = torch.tensor(
        [0.5773503, 0.5773503, 0.7071068, 0.5773503, 0.5773503, 0.5773503, 0.7071068, 0.5773503, 0.5773503]
    )
    std = build("riskpo", bundle_size=2, credit="std", quantile_mode="batch")(_risk_batch())
    assert torch.allclose(seq(std), base / (q_std + 1e-6), atol=1e-4)
    score = build("riskpo", bundle_size=2, credit="score", quantile_mode="batch")(_risk_batch())
    factor = torch.tensor([0.5 if r > 0 else 1.5 for _, r in RISK_ROWS])
    assert torch.allclose(seq(score), base * factor, atol=1e-4)


def test_riskpo_quantile_tracking_and_resume() -> None:
    est = build("riskpo", bundle_size=2, credit="uniform", quantile_mode="track")
    first = est(_risk_batch())  # warm-up: bundle quantiles, then q <- quantile of all papers
    assert torch.allclose(seq(first), torch.tensor(RISK_UNIFORM), atol=1e-4)
    # all papers [1, 0, 2, 1, 0]: torch.quantile at 0.2 -> 0.0, at 0.9 -> 1.6
    assert est.state_dict()["q_track"] == pytest.approx([0.0, 1.6])
    saved = est.state_dict()
    second = est(_risk_batch())
    # q_a = 0, q_b = 1.6 for every paper. Bundle 0 (std 1): S=1: g = (1 - 1.6)/0.7, c = 0; S=0: g = -1.6/0.7;
    # S=2: 0. Bundle 1 (std 0.7071): S=1 as bundle 0, S=0 as bundle 0.
    s1, s0 = (-0.6 / 0.7) / 2.5, (-1.6 / 0.7) / 2.5
    r2 = math.sqrt(0.5)
    expected = [s1, s1, s1 / r2, s0, s0, 0.0, s0 / r2, 0.0, 0.0]
    assert torch.allclose(seq(second), torch.tensor(expected), atol=1e-4)
    # SGD step: q_a += 0.1 (0.2 - mean[S < 0]) = 0.02; q_b += 0.1 (0.9 - 4/5) = 1.61
    assert est.state_dict()["q_track"] == pytest.approx([0.02, 1.61])
    resumed = build("riskpo", bundle_size=2, credit="uniform", quantile_mode="track")
    resumed.load_state_dict(saved)
    assert torch.equal(resumed(_risk_batch()), second)
    assert resumed.state_dict() == est.state_dict()


def test_riskpo_default_is_batch_quantiles() -> None:
    # the official trainer never feeds its tracked quantile into the advantage: batch is the default
    est = build("riskpo", bundle_size=2, credit="uniform")
    assert est.quantile_mode == "batch"
    for _ in range(2):  # no state carried over: the same answer every call
        assert torch.allclose(seq(est(_risk_batch())), torch.tensor(RISK_UNIFORM), atol=1e-4)
    assert est.state_dict() == {"q_track": None}


def test_riskpo_tracked_quantiles_on_a_zero_std_bundle_stay_bounded() -> None:
    est = build("riskpo", bundle_size=2, credit="uniform", quantile_mode="track")
    est(_risk_batch())  # warm-up: q_track = [0, 1.6]
    wrong = make_batch([0.0] * 9, [g for g, _ in RISK_ROWS])  # every response wrong: every S = 0, std 0
    adv = seq(est(wrong))
    # S = 0 against q_a = 0, q_b = 1.6: g = (0 - 1.6)/(0.7 + 1e-6), c = 0; A = g/2.5, divided by 1 (not eps)
    a = (-1.6 / (0.7 + 1e-6)) / 2.5 / (1 + 1e-6)
    in_paper = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)  # row 8, Q20 4th: no paper
    assert torch.allclose(adv[in_paper], torch.full((8,), a), atol=1e-6)
    assert (adv[~in_paper] == 0).all() and adv.abs().max() < 1.0  # was 5.5e6-scale before the guard


def test_riskpo_std_credit_floor() -> None:
    # Q0 [1,1,1] has std 0 -> divided by 1, not by ~0; Q1 [0,1,0] std 0.5773503. Papers S = [1, 2, 1]:
    # q_a = 1, q_b = 1.8, std(S) = 0.5773503. S=1: g = (1 - 1.8)/0.7, c = 0 -> A = g/2.5/std(S); S=2: 0.
    batch = make_batch([1, 1, 1, 0, 1, 0], [0, 0, 0, 1, 1, 1])
    adv = seq(build("riskpo", bundle_size=2, quantile_mode="batch")(batch))
    s = math.sqrt(1 / 3)
    a = (-0.8 / 0.7) / 2.5 / s
    assert torch.allclose(adv, torch.tensor([a, 0, a, a / s, 0, a / s]), atol=1e-4)


def test_riskpo_edges() -> None:
    # groups of one: every bundle has a single paper -> q_a = q_b = S -> 0
    assert (build("riskpo")(make_batch([1, 0, 1], [0, 1, 2])) == 0).all()
    # all-equal rewards: every paper score equal -> 0
    assert (build("riskpo", quantile_mode="batch")(make_batch([1.0] * 6, [0, 0, 1, 1, 2, 2])) == 0).all()


# ---- pass@k best-minus-second, OPO, REINFORCE++-baseline, HAPO -------------------------------


def test_passk_verl_best_minus_second_others_zero() -> None:
    # verl compute_grpo_passk_outcome_advantage: only the group's best response moves, by r_max - r_second
    batch = make_batch(
        [0.1, 0.7, 0.4, 1, 1, 1, 0, 1, 0.2, 0.9, 0.5, 0.9, 0.3], [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    )
    raw = seq(build("passk", variant="verl", norm_std=False)(batch))
    # [1,1,1,0,1]: r_max = r_second = 1 -> all 0 (the old estimator gave -1 to the 0); ties at 0.9 -> 0;
    # a group of one keeps its reward
    assert torch.allclose(raw, torch.tensor([0, 0.3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.3]), atol=1e-7)
    normed = seq(build("passk", variant="verl")(batch))
    assert normed[1].item() == pytest.approx(0.3 / (0.3 + 1e-6), abs=1e-6)  # std([0.1, 0.7, 0.4]) = 0.3
    assert (normed[[0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]] == 0).all()
    single = make_batch([0, 1, 0, 0], [0] * 4)
    assert torch.allclose(
        seq(build("passk", variant="verl", norm_std=False)(single)), torch.tensor([0.0, 1, 0, 0])
    )


def test_passk_analytic_hand_cases() -> None:
    # n=4, c=1, k=2: rho = 1 - C(3,2)/C(4,2) = 1/2, sigma = 1/2; A+ = (1/2)/s, A- = (1/2 - C(2,1)/C(3,1))/s
    s = 0.5 + 1e-6
    adv = seq(build("passk", k=2)(make_batch([0, 1, 0, 0], [0] * 4)))
    assert torch.allclose(adv, torch.tensor([-1 / 6 / s, 0.5 / s, -1 / 6 / s, -1 / 6 / s]).float(), atol=1e-6)
    # n=5, c=2, k=3: rho = 1 - C(3,3)/C(5,3) = 0.9, sigma = 0.3; A+ = 0.1/s, A- = (0.1 - C(2,2)/C(4,2))/s
    s = 0.3 + 1e-6
    adv = seq(build("passk", k=3)(make_batch([1, 0, 0, 1, 0], [0] * 5)))
    pos, neg = 0.1 / s, (0.1 - 1 / 6) / s
    assert torch.allclose(adv, torch.tensor([pos, neg, neg, pos, neg]), atol=1e-6)
    # k = 1 is GRPO with the population std: p = 1/4 -> A+ = 0.75/sqrt(3/16), A- = -0.25/sqrt(3/16)
    adv = seq(build("passk", k=1)(make_batch([1, 0, 0, 0], [0] * 4)))
    sd = math.sqrt(3 / 16) + 1e-6
    assert torch.allclose(adv, torch.tensor([0.75 / sd, -0.25 / sd, -0.25 / sd, -0.25 / sd]), atol=1e-6)
    # partial credit binarised at 0.5: [0.9, 0.2, 0.6, 0.1] is c=2 of n=4, k=2: rho = 5/6
    sd = math.sqrt(5 / 36) + 1e-6
    adv = seq(build("passk", k=2)(make_batch([0.9, 0.2, 0.6, 0.1], [0] * 4)))
    pos, neg = (1 / 6) / sd, (1 / 6 - 1 / 3) / sd
    assert torch.allclose(adv, torch.tensor([pos, neg, pos, neg]), atol=1e-6)


def test_passk_analytic_edges() -> None:
    # fewer than k wrong (n - c < k): every k-subset passes, rho = 1 -> 0; all wrong -> 0; all right -> 0
    for rewards in ([1, 0, 1], [0, 0, 0], [1, 1, 1]):
        assert (build("passk", k=3)(make_batch(rewards, [0] * 3)) == 0).all()
    # groups smaller than k use k = n; a group of one gets 0 (rho is 0 or 1); ties are exact
    adv = seq(build("passk", k=8)(make_batch([1, 0, 1, 0, 1], [0, 0, 1, 1, 2])))
    # n=2, c=1, k=2: rho = 1 -> 0
    assert torch.equal(adv, torch.zeros(5))
    same = build("passk", k=2)(make_batch([1, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 1]))
    assert torch.equal(same[:3], same[3:])


def test_opo_hand_case_and_edges() -> None:
    # lengths [2, 4, 6] (row 2 truncated at T=6): b = (2*1 + 4*0 + 6*1)/12 = 2/3
    batch = make_batch([1, 0, 1], [0] * 3, lengths=[2, 4, 6])
    assert torch.allclose(seq(build("opo")(batch)), torch.tensor([1 / 3, -2 / 3, 1 / 3]), atol=1e-6)
    # empty response weighs 0: b = 0 -> the other row gets 0; all-empty group -> plain mean; group of one -> r
    batch = make_batch([1, 0, 1, 0, 0.4], [0, 0, 1, 1, 2], lengths=[0, 3, 0, 0, 2])
    adv = build("opo")(batch)
    assert (adv[[0, 2, 3]] == 0).all()
    assert adv[1, 0].item() == 0.0 and adv[4, 0].item() == pytest.approx(0.4)


def test_reinforce_pp_baseline_hand_case() -> None:
    # x = r - group mean: g0 [0.5, -0.5], g1 [1/3, 1/3, -2/3]; tokens by length [2, 1 | 1, 3, 2]
    batch = make_batch([1, 0, 1, 1, 0], [0, 0, 1, 1, 1], lengths=[2, 1, 1, 3, 2])
    x = torch.tensor([0.5, -0.5, 1 / 3, 1 / 3, -2 / 3], dtype=torch.float64)
    tokens = torch.cat([x[i].repeat(n) for i, n in enumerate([2, 1, 1, 3, 2])])
    mu, var = tokens.mean(), tokens.var()  # unbiased
    adv = build("reinforce_pp_baseline")(batch)
    expected = ((x - mu) / torch.sqrt(var + 1e-8)).float()
    assert torch.allclose(seq(adv), expected, atol=1e-6)
    assert (adv[batch.response_mask == 0] == 0).all()
    empty = make_batch([1, 0], [0, 0], lengths=[0, 0], T=3)
    assert (build("reinforce_pp_baseline")(empty) == 0).all()


def test_hapo_token_hand_case_and_fallback() -> None:
    # tokens of the group: r = [1, 0, 0], lengths [1, 2, 3]: mu = 1/6, population sigma = sqrt(5)/6
    batch = make_batch([1, 0, 0], [0] * 3, lengths=[1, 2, 3])
    s = math.sqrt(5) / 6 + 1e-6
    assert torch.allclose(
        seq(build("hapo_token")(batch)), torch.tensor([5 / 6 / s, -1 / 6 / s, -1 / 6 / s]), atol=1e-5
    )
    # lengths [1, 30]: mu = 1/31, sigma = sqrt(30)/31, A0 = (30/31)/sigma = sqrt(30) >= 5 -> whole group takes GRPO: +-1/sqrt(2)
    batch = make_batch([1, 0], [0, 0], lengths=[1, 30])
    g = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert torch.allclose(seq(build("hapo_token")(batch)), torch.tensor([g, -g]), atol=1e-5)
    # a group of one -> 0 (mu = r); a group without tokens falls back to GRPO (its rows are masked anyway)
    assert (build("hapo_token")(make_batch([1.0], [0], lengths=[3])) == 0).all()
    assert torch.isfinite(build("hapo_token")(make_batch([1, 0], [0, 0], lengths=[0, 0], T=2))).all()


# ---- cross-rank invariance: 2 ranks x N prompts == 1 rank x 2N prompts --------------------------

DIST_CASES = [
    ("reinforce_pp_baseline", {}),
    ("ucas", {}),
    ("canon", {"anneal": True}),
    ("riskpo", {"bundle_size": 2, "quantile_mode": "batch"}),  # bundle {2, 3} straddles the ranks
    ("riskpo", {"bundle_size": 2, "quantile_mode": "track"}),
    ("qae", {}),
    ("copo", {"mode": "only-soft"}),  # the global advantage normalises over every rank's prompts
]


def _dist_batch() -> RolloutBatch:
    full = random_batch(seed=7, n_groups=5, group_size=4)
    full.info = [{"extracted": str(i % 3 if i % 5 else 0)} for i in range(full.size)]  # varied H_q
    return full


def _dist_worker(rank: int, path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}/rdv", rank=rank, world_size=2)
    full = _dist_batch()
    gidx = torch.unique(full.group_ids, return_inverse=True)[1]
    rows = torch.nonzero(gidx < 3).flatten() if rank == 0 else torch.nonzero(gidx >= 3).flatten()
    out = {}
    for i, (name, kwargs) in enumerate(DIST_CASES):
        est = build(name, **kwargs)
        est(full.index(rows))  # riskpo track: the second call uses the tracked (cross-rank) quantiles
        local = full.index(rows)
        adv = est(local)
        extra = {f: getattr(local, f) for f in est.provides}
        out[i] = (rows, adv, {k: v for k, v in est.metrics.items() if v.dim() == 0}, extra)
    torch.save(out, f"{path}/rank{rank}.pt")
    dist.destroy_process_group()


def test_statistics_are_taken_across_ranks(tmp_path) -> None:
    torch.multiprocessing.spawn(_dist_worker, args=(str(tmp_path),), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    full = _dist_batch()
    for i, (name, kwargs) in enumerate(DIST_CASES):
        est = build(name, **kwargs)
        est(full)
        ref = est(full)
        for part in parts:
            rows, adv, metrics, extra = part[i]
            assert torch.allclose(adv, ref[rows], atol=1e-5), name
            for f, value in extra.items():
                assert torch.allclose(value, getattr(full, f)[rows], atol=1e-6), (name, f)
            if name == "copo":
                assert full.global_advantages.abs().sum() > 0 and len(set(full.blend_weights.tolist())) > 1
            for key, value in metrics.items():
                assert torch.allclose(value.float(), est.metrics[key].float(), atol=1e-5), (name, key)


# ---- issue 11: fidelity -----------------------------------------------------------------------


def _equal_batch(value: float, dtype: torch.dtype = torch.float32) -> RolloutBatch:
    """Two groups of eight equal, non-dyadic rewards; ragged lengths with an empty and a truncated
    response; constant entropy, certainty and logits, and paired rewards equal to the rewards."""
    lengths = [0, 6, 3, 6, 5, 1, 2, 4] * 2
    B = len(lengths)
    batch = make_batch(
        [value] * B,
        [0] * 8 + [1] * 8,
        lengths=lengths,
        T=6,
        entropy=torch.full((B, 6), 0.7),
        self_certainty=torch.full((B, 6), 2.0),
        sampled_logits=torch.full((B, 6), 3.0),
    )
    batch.rewards = torch.full((B,), value, dtype=dtype)
    batch.paired_rewards = batch.rewards.clone()
    return batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [0.9, 0.3, 1 / 3])
@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_all_equal_non_dyadic_rewards_give_exactly_zero(name: str, value: float, dtype: torch.dtype) -> None:
    # METHODS.md §0: an all-equal group has no signal; float32 group statistics used to leave
    # rounding noise (grpo -0.056 on eight 0.9s). UCAS keeps its -gamma*lhat token penalty: with equal
    # logits lhat = 0.5, so every valid token gets exactly -0.05 * 0.5.
    batch = _equal_batch(value, dtype)
    adv = build(name)(batch)
    mask = batch.response_mask.bool()
    expected = torch.where(mask, -0.025 if name == "ucas" else 0.0, 0.0)
    assert torch.equal(adv, expected.to(adv.dtype)), (name, adv[mask].unique())


def test_ucas_all_equal_rewards_take_the_penalty_branch() -> None:
    # eight 0.9 rewards: A_i m_i is exactly 0, so the branch is the unfloored one: A_t = -gamma * lhat_t
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]] * 4 + [[4.0, 5.0, 6.0, 7.0]] * 4)
    batch = make_batch(
        [0.9] * 8,
        [0] * 8,
        lengths=[4] * 8,
        self_certainty=torch.arange(32.0).view(8, 4),
        sampled_logits=logits,
    )
    adv = build("ucas")(batch)
    lhat = logits / (7.0 + 1e-6)
    assert torch.allclose(adv, -0.05 * lhat, atol=1e-7)
    assert (adv[:, 0] <= 0).all() and adv[0, 0] == 0  # the lowest logit: exactly 0, never positive


def test_hapo_token_code_padding_quirk() -> None:
    # near-1 partial credit: tokens 0.95 x 2, 0.9 x 3 -> mu = 0.92, population sigma = sqrt(0.0006)
    batch = make_batch([0.95, 0.9], [0, 0], lengths=[2, 3], T=4)
    s = math.sqrt(0.0006) + 1e-6
    intended = seq(build("hapo_token")(batch))
    assert torch.allclose(intended, torch.tensor([0.03 / s, -0.02 / s]).float(), atol=1e-4)  # |A| < 5
    # the official code also tests the padding positions: (0 - 0.92)/sigma = -37.6 -> GRPO fallback
    quirk = seq(build("hapo_token", code_padding_quirk=True)(batch))
    g = 0.025 / (math.sqrt(0.00125) + 1e-6)
    assert torch.allclose(quirk, torch.tensor([g, -g]), atol=1e-5)
    # no padding (every response fills T): the quirk changes nothing
    full = make_batch([0.95, 0.9, 0.9], [0, 0, 0], lengths=[4, 4, 4])
    assert torch.equal(build("hapo_token", code_padding_quirk=True)(full), build("hapo_token")(full))
    # an empty response is all padding: tested with the quirk, skipped by the intended rule
    empty = make_batch([0.95, 0.9, 0.9], [0, 0, 0], lengths=[0, 4, 4])
    assert build("hapo_token")(empty)[1, 0].item() == 0.0  # mu = 0.9 over the tokens: no fallback
    assert build("hapo_token", code_padding_quirk=True)(empty)[1, 0].item() < 0  # GRPO: 0.9 < mean


# ---- COPO (arXiv 2508.04138, METHODS §8.1) -------------------------------------------------------


def copo_batch(rewards: list[float], groups: list[int], answers: list[str | None]) -> RolloutBatch:
    batch = make_batch(rewards, groups, lengths=[3] * len(rewards), T=4)
    batch.info = [{"extracted": a} for a in answers]
    return batch


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_copo_local_global_and_blend_by_hand() -> None:
    # prompt 0: rewards 1,1,0,0, answers 5,5,7,8 -> clusters (2,1,1): H = 0.5*1 + 2*0.25*2 = 1.5 bits,
    #   acc 0.5, A_loc = +-0.5/sqrt(1/3) = +-0.866025 (unbiased std)
    # prompt 1: four 0.9 rewards (non-dyadic, all equal), one answer: H = 0, acc 0.9, A_loc = 0 exactly
    # global over the 2 prompts: g = (0.5, 0.9), mean 0.7, unbiased std sqrt(0.08): A_glob = -+1/sqrt(2)
    # w_q = sigmoid(5 (H - 1)): sigmoid(2.5) = 0.924142, sigmoid(-5) = 0.006693; soft-with-zero zeroes
    # the w of the r = 0 responses (they train on the global loss only)
    batch = copo_batch([1, 1, 0, 0, 0.9, 0.9, 0.9, 0.9], [0] * 4 + [1] * 4, ["5", "5", "7", "8"] + ["3"] * 4)
    est = build("copo")
    adv = est(batch)
    a = 0.5 / math.sqrt(1 / 3)
    assert torch.allclose(seq(adv), torch.tensor([a, a, -a, -a, 0, 0, 0, 0]), atol=ATOL)
    assert torch.equal(adv[4:], torch.zeros(4, 4))  # exactly 0 for the all-0.9 group
    r2 = 1 / math.sqrt(2)
    assert torch.allclose(seq(batch.global_advantages), torch.tensor([-r2] * 4 + [r2] * 4), atol=ATOL)
    assert (batch.global_advantages[:, 3] == 0).all()  # padding
    w0, w1 = sigmoid(2.5), sigmoid(-5.0)
    assert torch.allclose(batch.blend_weights, torch.tensor([w0, w0, 0, 0, w1, w1, w1, w1]), atol=1e-6)
    assert est.metrics["answer_entropy"].tolist() == [1.5] * 4 + [0.0] * 4


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("only-soft", lambda w0, w1: [w0] * 4 + [w1] * 4),
        ("soft-with-forced", lambda w0, w1: [w0] * 4 + [0] * 4),  # A_loc = 0 in the all-0.9 group
        ("only-forced", lambda w0, w1: [1] * 4 + [0] * 4),
        ("only-zero", lambda w0, w1: [1, 1, 0, 0, 1, 1, 1, 1]),
        ("only-global", lambda w0, w1: [0] * 8),
        ("no-global", lambda w0, w1: [1] * 8),
    ],
)
def test_copo_modes(mode, expected) -> None:
    batch = copo_batch([1, 1, 0, 0, 0.9, 0.9, 0.9, 0.9], [0] * 4 + [1] * 4, ["5", "5", "7", "8"] + ["3"] * 4)
    build("copo", mode=mode)(batch)
    want = torch.tensor(expected(sigmoid(2.5), sigmoid(-5.0)), dtype=torch.float32)
    assert torch.allclose(batch.blend_weights, want, atol=1e-6)


def test_copo_entropy_coefficient_and_missing_answers() -> None:
    # entropy_coef: c_q = 1 - lam H_q with lam = (1 - 1/n)/log2 n. Prompt 0 (n = 4, H = 1.5):
    # lam = 0.75/2 = 0.375, c = 0.4375, g = 0.5 * 0.4375 = 0.21875. Prompt 1 (H = 0): g = 0.9.
    # Prompt 2: two empty answers (one "" cluster, H = 0), rewards 0: g = 0.
    batch = copo_batch(
        [1, 1, 0, 0, 0.9, 0.9, 0.9, 0.9, 0, 0],
        [0] * 4 + [1] * 4 + [2] * 2,
        ["5", "5", "7", "8"] + ["3"] * 4 + [None, None],
    )
    build("copo", entropy_coef=True)(batch)
    g = [0.21875, 0.9, 0.0]
    m = sum(g) / 3
    s = math.sqrt(sum((x - m) ** 2 for x in g) / 2)
    want = [(x - m) / (s + 1e-6) for x in g]
    assert torch.allclose(
        seq(batch.global_advantages), torch.tensor([want[0]] * 4 + [want[1]] * 4 + [want[2]] * 2)
    )
    assert batch.blend_weights[8:].tolist() == [0.0, 0.0]  # r = 0: global only


def test_copo_all_prompts_at_one_accuracy_and_single_prompt_give_zero_global() -> None:
    same = copo_batch([1, 0, 0, 1], [0, 0, 1, 1], ["1", "2", "1", "1"])  # acc 0.5 and 0.5: std 0
    build("copo")(same)
    assert torch.equal(same.global_advantages, torch.zeros(4, 4))
    one = copo_batch([1, 0], [0, 0], ["1", "2"])
    build("copo")(one)
    assert torch.equal(one.global_advantages, torch.zeros(2, 4))
    # an all-correct group: H = 0, w = sigmoid(-5) ~ 0.0067, A_loc = 0: almost purely global
    allc = copo_batch([1, 1, 0, 1], [0, 0, 1, 1], ["4", "4", "x", "4"])
    adv = build("copo")(allc)
    assert torch.equal(adv[:2], torch.zeros(2, 4))
    assert allc.blend_weights[:2].tolist() == pytest.approx([sigmoid(-5.0)] * 2)


# ---- EAR (ETTRL) -----------------------------------------------------------------------------


def test_ear_adv_res_hand_case_with_sign_flip_and_guard() -> None:
    # group 0, GRPO on r = [1,0,0,0]: A = [1.5, -0.5, -0.5, -0.5] (times GRPO's eps factor a).
    # mean token entropies H = [1.0, 2.0, 0.5, 4.5] (row 3 has one token; its padding reads 9.0)
    # -> group mean 2.0 -> Y = 2 - H/2 = [1.5, 1.0, 1.75, -0.25]: row 3 (H > 2 mean) flips sign.
    ent = [[0.5, 1.5], [2.0, 2.0], [0.0, 1.0], [4.5]]
    batch = make_batch([1, 0, 0, 0], [0] * 4, lengths=[2, 2, 2, 1], entropy=ent)
    a = 0.5 / (0.5 + 1e-6)
    est = build("ear")
    adv = est(batch)
    expected = torch.tensor([[2.25, 2.25], [-0.5, -0.5], [-0.875, -0.875], [0.125, 0.0]]) * a
    assert torch.allclose(adv, expected, atol=1e-5)
    assert adv[3, 0] > 0 > seq(build("grpo")(batch))[3]  # the flip the notes do not guard against
    # metrics: token-weighted Y and the share of tokens whose response flipped (1 of 7 tokens)
    mask = batch.response_mask.float()
    assert (est.metrics["sign_flip_frac"] * mask).sum() / mask.sum() == pytest.approx(1 / 7)
    # the guard y_min = 0 zeroes the flipped response and leaves the others alone
    guarded = build("ear", y_min=0.0)(batch)
    assert torch.allclose(guarded[:3], expected[:3], atol=1e-5) and (guarded[3] == 0).all()


def test_ear_group_mean_skips_empty_responses_and_equal_groups_keep_grpo() -> None:
    # group 5: r = [1, 0, 0], row 1 empty. Mean H over rows with tokens: (1.0 + 3.0) / 2 = 2.0
    # (not 4/3) -> Y = [1.5, -, 0.5]. GRPO: mean 1/3, unbiased std sqrt(1/3).
    # group 7: equal non-dyadic entropies 0.9 -> Y exactly 1 -> exactly GRPO's advantage.
    # group 9: all-equal rewards 0.9 -> A = 0 whatever Y.
    ent = [[1.0, 1.0], [], [2.0, 4.0], [0.9, 0.9], [0.9], [0.1, 0.2], [3.0]]
    batch = make_batch(
        [1, 0, 0, 1, 0, 0.9, 0.9], [5, 5, 5, 7, 7, 9, 9], lengths=[2, 0, 2, 2, 1, 2, 1], entropy=ent
    )
    adv = build("ear")(batch)
    std = math.sqrt(1 / 3)
    assert adv[0, 0].item() == pytest.approx(1.5 * (2 / 3) / (std + 1e-6), abs=1e-5)
    assert adv[2, 0].item() == pytest.approx(0.5 * (-1 / 3) / (std + 1e-6), abs=1e-5)
    assert (adv[1] == 0).all()
    grpo = build("grpo")(batch)
    assert torch.equal(adv[3:5], grpo[3:5])
    assert (adv[5:] == 0).all()
    # a group with zero entropy everywhere keeps Y = 1 (no 0/0)
    flat = make_batch([1, 0], [0, 0], entropy=torch.zeros(2, 4))
    assert torch.equal(build("ear")(flat), build("grpo")(flat))


def test_ear_adv_clip_and_base() -> None:
    # Adv-Clip with beta = 2 on Dr. GRPO-style A = r - mean = [2.5, -2.5] -> [2, -2]; entropy unused
    batch = make_batch([5, 0], [0, 0], lengths=[3, 1], entropy=[[100.0] * 3, [0.0]])
    adv = build("ear", mode="clip", base_kwargs={"norm_std": False})(batch)
    assert torch.allclose(adv, torch.tensor([[2.0, 2.0, 2.0], [-2.0, 0.0, 0.0]]))
    batch.entropy = None  # clip mode never reads entropy
    assert torch.allclose(
        build("ear", mode="clip", beta=1.0, base="dr_grpo")(batch)[:, 0], torch.tensor([1.0, -1.0])
    )
    with pytest.raises(ValueError, match="batch.entropy"):
        build("ear")(batch)


def test_copo_answers_from_the_completion_with_an_extractor() -> None:
    # Countdown-style completions: the reward's extracted expressions all differ (H = 2 bits), while
    # their final results (extractor: number) agree on three of four: clusters (3, 1),
    # H = -(3/4 log2 3/4 + 1/4 log2 1/4) = 0.811278 bits
    completions = ["3+4=7,7*3=21", "4*3=12,12+9=21", "9+9=18,18+3=21", "1+1=2"]
    batch = copo_batch([1, 1, 1, 0], [0] * 4, ["3+4*3", "4*3+9", "9+9+3", "1+1"])
    for info, c in zip(batch.info, completions):
        info["completion"] = c
    est = build("copo")
    est(batch)
    assert est.metrics["answer_entropy"].tolist() == [2.0] * 4
    est = build("copo", extractor="number")
    est(batch)
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert est.metrics["answer_entropy"].tolist() == pytest.approx([h] * 4)
    with pytest.raises(RegistryError, match="extractor"):
        build("copo", extractor="regex")
