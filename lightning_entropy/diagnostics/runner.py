"""When and on what the diagnostics run; every number goes through the step's ``MetricBank``.

Training step (``before_update`` / ``after_update`` around the update):
    diag/dH_measured        mean over the measured tokens of H_after - H_before, the same tokens and
                            prompts before and after the step's updates (no sampling noise)
    diag/dH_pred_cov        -Cov(log pi, A), METHODS §6.2's batch estimator, per unit step (the
                            law's exact constants are [UNVERIFIED] in METHODS; the correlation and
                            slope do not depend on them)
    diag/dH_pred_disc       -mean_t A_t (S_t - N_t), the discriminator of METHODS §6.3, per unit step:
                            the softmax policy-gradient first order; arXiv 2602.03392's own GRPO
                            expression is only partially known (METHODS marks it partial)
    diag/dH_pred_linear     grad_theta mean_t H_t . (theta_after - theta_before): the exact first-order
                            change of the actual update, whatever the optimizer (one extra backward)
    diag/corr_*, slope_*    running Pearson correlation and slope of measured on predicted
    diag/token_corr_disc    within the step, over tokens: correlation of H_after - H_before with
                            -A_t (S_t - N_t) (is each token's own first-order direction right?)
    train/answer_entropy, train/distinct_answers   per group, METHODS §6.5
Validation: val/pass@k for every k, val/support, val/answer_entropy, val/distinct_answers,
val/effective_rank (of the last hidden states of each response: arXiv 2509.23808's layer and axis
are not known, METHODS §8.12), val/lens_entropy_layer<k>; and law/* (the entropy-performance law,
§6.1), fitted when the step's rollout entropy is known (a validation at step s pairs with the
rollout of step s, drawn by the same policy).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_entropy.batch import RolloutBatch
from lightning_entropy.components.common import group_index, rank_in_group
from lightning_entropy.diagnostics import maths as M
from lightning_entropy.forward import PolicyForward, _response_positions, model_inputs
from lightning_entropy.metrics import Covariance, MetricBank, ScalarMean, SumRatio, TokenMean

LAW_TARGETS = ("val/acc", "val/pass@1")


class Diagnostics:
    """Built from the ``diagnostics`` config section (validated in ``config.py``)."""

    def __init__(self, cfg: Any, forward: PolicyForward) -> None:
        self.cfg, self.forward = cfg, forward
        self.fits = {"cov": M.RunningFit(), "disc": M.RunningFit(), "linear": M.RunningFit()}
        self.law_points: list[tuple[float, float, float]] = []  # (H, val/acc, val/pass@1)
        self.pending: dict[int, dict[str, float]] = {}  # validations waiting for their step's entropy
        # (measured rows, their (H, log p, S, N) before the update, grad of sum H, grad . theta)
        self._before: tuple[RolloutBatch, tuple[Tensor, ...], list[Tensor], float] | None = None

    @staticmethod
    def due(on: bool, every: int, step: int) -> bool:
        return bool(on) and step % every == 0

    def pass_ks(self, ks: list[int], samples: int) -> list[int]:
        return list(range(1, samples + 1)) if self.cfg.pass_at_all_k else list(ks)

    # ---- measured vs predicted entropy change ---------------------------------------------------
    def _terms(self, policy: torch.nn.Module, b: RolloutBatch, grad: bool = False) -> tuple[Tensor, ...]:
        """(H, log p, S, N) per token; with ``grad`` also g = d sum_t H_t / d theta (one backward)."""
        from lightning_entropy import ops

        was = policy.training
        policy.eval()
        params = [p for p in policy.parameters() if p.requires_grad] if grad else []
        g = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        parts = []
        for mb in self.forward.micro_batches(b):
            with torch.set_grad_enabled(grad):
                logits = self.forward.logits(policy, mb)
                if grad:
                    ent = ops.logprobs_and_entropy(
                        logits,
                        mb.response_ids,
                        temperature=self.forward.temperature,
                        chunk_size=self.forward.chunk_size,
                        entropy_grad=True,
                    )[1]
                    parts_g = torch.autograd.grad((ent * mb.response_mask).sum(), params, allow_unused=True)
                    for acc, gi in zip(g, parts_g):
                        if gi is not None:
                            acc += gi
            with torch.no_grad():
                t = self.forward.temperature
                parts.append(
                    M.discriminator_terms(logits.detach(), mb.response_ids, t, self.forward.chunk_size)
                )
            del logits
        policy.train(was)
        return *(torch.cat(x) for x in zip(*parts)), (params, g)

    def before_update(self, policy: torch.nn.Module, batch: RolloutBatch, step: int) -> None:
        c = self.cfg
        if self.due(c.entropy_change, c.entropy_change_every, step):
            rows = batch
            if c.entropy_change_rows:  # whole groups: their advantages are measured against each other
                first = batch.group_ids[: c.entropy_change_rows]
                rows = batch.index(torch.isin(batch.group_ids, first).nonzero().squeeze(1))
            terms = self._terms(policy, rows, grad=c.entropy_change_linear)
            params, g = terms[-1]
            self._before = (rows, terms[:-1], g, _dot(g, params))

    def after_update(self, policy: torch.nn.Module, batch: RolloutBatch, bank: MetricBank) -> None:
        """The step's answer statistics, and the entropy change when ``before_update`` measured."""
        self.on_rollout(batch, bank)
        if self._before is None:
            return
        rows, (h0, lp, s, n), g, dot0 = self._before
        self._before = None
        h1 = self._terms(policy, rows)[0]
        adv = rows.advantages
        mask = rows.response_mask.float()
        bank.update("diag/entropy_before", h0, mask)
        bank.update("diag/dH_measured", h1 - h0, mask)
        bank.update("diag/dH_pred_cov", -lp, adv, mask, kind=Covariance)
        pred = M.predicted_change_discriminator(adv, s, n)
        bank.update("diag/dH_pred_disc", pred, mask)
        dh = h1 - h0  # token level: does each token's entropy move the way its own S_t says?
        for key, x, y in (("cov", pred, dh), ("var_pred", pred, pred), ("var_meas", dh, dh)):
            bank.update(f"diag/_tok_{key}", x, y, mask, kind=Covariance)
        if g:  # g . (theta_after - theta_before) over this rank's tokens; pooled: the token-mean
            params = [p for p in policy.parameters() if p.requires_grad]
            bank.update("diag/dH_pred_linear", _dot(g, params) - dot0, mask.sum(), kind=SumRatio)

    # ---- answers ------------------------------------------------------------------------------
    def on_rollout(self, batch: RolloutBatch, bank: MetricBank, prefix: str = "train/") -> None:
        if not self.cfg.answers:
            return
        answers = [i.get("extracted", i.get("completion")) for i in batch.info]
        sizes = M.answer_clusters(answers, batch.group_ids.tolist()).values()
        bank.update(
            f"{prefix}answer_entropy", torch.tensor([M.answer_entropy(s) for s in sizes]), kind=ScalarMean
        )
        bank.update(
            f"{prefix}distinct_answers", torch.tensor([float(len(s)) for s in sizes]), kind=ScalarMean
        )

    # ---- validation ---------------------------------------------------------------------------
    def on_validation(
        self, policy: torch.nn.Module, drawn: RolloutBatch, correct: Tensor, step: int, bank: MetricBank
    ) -> None:
        c = self.cfg
        self.on_rollout(drawn, bank, prefix="val/")
        if c.pass_at_all_k:
            bank.update("val/support", M.support(correct, drawn.group_ids.cpu()), kind=ScalarMean)
        rank = self.due(c.effective_rank, c.effective_rank_every, step)
        lens = self.due(c.logit_lens, c.logit_lens_every, step)
        if rank or lens:
            if c.hidden_samples:
                gids = drawn.group_ids
                position = rank_in_group(torch.arange(len(gids), device=gids.device), *group_index(gids))[0]
                drawn = drawn.index((position < c.hidden_samples).nonzero().squeeze(1))
            self._hidden_views(policy, drawn, bank, rank, lens)

    @torch.no_grad()
    def _hidden_views(
        self, policy: torch.nn.Module, b: RolloutBatch, bank: MetricBank, rank: bool, lens: bool
    ) -> None:
        """One forward per micro-batch: ER of the last hidden states at the response tokens, and the
        entropy of every decoder layer's logit-lens policy at the positions predicting them."""
        decoder, head = policy.get_decoder(), policy.get_output_embeddings()
        if lens and not (hasattr(decoder, "layers") and hasattr(decoder, "norm")):
            raise RuntimeError(
                f"diagnostics.logit_lens needs a decoder with .layers and .norm (Llama/Qwen-style); "
                f"{type(decoder).__name__} has not both: set diagnostics.logit_lens=false"
            )
        outputs: list[Tensor] = []
        hooks = (
            [
                layer.register_forward_hook(
                    lambda _m, _i, o: outputs.append(o[0] if isinstance(o, tuple) else o)
                )
                for layer in decoder.layers
            ]
            if lens
            else []
        )
        was = policy.training
        policy.eval()
        try:
            for mb in self.forward.micro_batches(b):
                outputs.clear()
                last = decoder(**model_inputs(mb)).last_hidden_state
                mask = mb.response_mask.float()
                P = mb.prompt_ids.shape[1]
                if rank:
                    er = M.effective_rank(last[:, P:], mask)
                    bank.update("val/effective_rank", er[mask.sum(-1) > 0], kind=ScalarMean)
                pos = _response_positions(mb)
                norm = decoder.norm if self.cfg.logit_lens_norm else None
                for k, h in enumerate(outputs, start=1):
                    ent = M.lens_entropy(h[:, pos], head.weight, self.forward.temperature, norm)
                    bank.update(f"val/lens_entropy_layer{k}", ent, mask, kind=TokenMean)
        finally:
            for hk in hooks:
                hk.remove()
            policy.train(was)

    # ---- values computed from pooled numbers --------------------------------------------------
    def validation_values(self, step: int, values: dict[str, float]) -> None:
        if self.cfg.entropy_law:
            self.pending[step] = {k: values[k] for k in LAW_TARGETS if k in values}

    def step_values(self, step: int, values: dict[str, float]) -> dict[str, float]:
        """Numbers derived from the pooled step values: running fits and the law's coefficients.
        The token-level moments (``diag/_tok_*``) are taken out of ``values``: only their correlation
        is logged."""
        out: dict[str, float] = {}
        tok = [values.pop(f"diag/_tok_{k}", math.nan) for k in ("cov", "var_pred", "var_meas")]
        if tok[1] > 0 and tok[2] > 0:
            out["diag/token_corr_disc"] = tok[0] / math.sqrt(tok[1] * tok[2])
        if "diag/dH_measured" in values:
            for name, fit in self.fits.items():
                if f"diag/dH_pred_{name}" in values:
                    fit.update(values[f"diag/dH_pred_{name}"], values["diag/dH_measured"])
                out[f"diag/corr_{name}"], out[f"diag/slope_{name}"] = fit.corr, fit.slope
        val = self.pending.pop(step, None)
        if val is not None and "train/entropy" in values:
            nan = math.nan
            self.law_points.append(
                (values["train/entropy"], val.get("val/acc", nan), val.get("val/pass@1", nan))
            )
            out["law/points"] = float(len(self.law_points))
            for i, target in enumerate(LAW_TARGETS, start=1):
                pts = [(p[0], p[i]) for p in self.law_points if math.isfinite(p[i])]
                a, b = M.fit_entropy_law([h for h, _ in pts], [r for _, r in pts])
                name = target.split("/")[1]
                out[f"law/{name}_a"], out[f"law/{name}_b"], out[f"law/{name}_ceiling"] = a, b, b - a
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "fits": {k: f.state_dict() for k, f in self.fits.items()},
            "law_points": [list(p) for p in self.law_points],
            "pending": {int(k): dict(v) for k, v in self.pending.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, f in self.fits.items():
            f.load_state_dict(state.get("fits", {}).get(k, {}))
        self.law_points = [tuple(p) for p in state.get("law_points", [])]
        self.pending = {int(k): dict(v) for k, v in state.get("pending", {}).items()}


def _dot(g: list[Tensor], params: list[Tensor]) -> float:
    """sum_i g_i . p_i in float64 (the first-order change is a small difference of two such sums)."""
    return float(sum((gi * p.detach().to(torch.float64)).sum() for gi, p in zip(g, params))) if g else 0.0
