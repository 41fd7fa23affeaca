"""Forward passes over a RolloutBatch: next-token log-probs and full-vocabulary entropy of the
response tokens, for the training update (with grad) and the old-policy / reference pass (no grad)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_entropy import ops
from lightning_entropy.batch import RolloutBatch

# Old-policy extras a component can ask for through ``requires`` (filled by ``old_policy_pass``).
UCAS_EXTRAS = frozenset({"self_certainty", "sampled_logits"})
OLD_PASS_EXTRAS = UCAS_EXTRAS | {"discriminator_baseline"}


def model_inputs(b: RolloutBatch) -> dict[str, Tensor]:
    ids = torch.cat([b.prompt_ids, b.response_ids], 1)
    attn = torch.cat([b.prompt_mask, b.response_mask], 1)
    # left padding: positions count real tokens, exactly as generate() numbered them
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    return {"input_ids": ids, "attention_mask": attn, "position_ids": pos, "use_cache": False}


def _response_positions(b: RolloutBatch) -> Tensor:
    """Indices of the positions whose next-token logits predict the response tokens."""
    P, T = b.prompt_ids.shape[1], b.response_ids.shape[1]
    return torch.arange(P - 1, P + T - 1, device=b.response_ids.device)


@dataclass
class PolicyForward:
    """How the policy is evaluated on responses: temperature, chunking and the logits path."""

    temperature: float = 1.0
    chunk_size: int = 256
    from_hidden: bool = False  # log-probs from the last hidden states and the LM head, chunked
    micro_batch_size: int | None = None

    def logits(self, model: torch.nn.Module, b: RolloutBatch) -> Tensor:
        """Next-token logits at the response positions [B, T, V] (raw, before temperature); those of
        a layer's internal policy when ``b.policy_view`` names one.

        The positions are selected before the LM head (``logits_to_keep`` as an index tensor), so the
        logits come out contiguous and ``ops`` reads them as flat rows without a gathered copy."""
        if b.policy_view is not None and b.policy_view.layer is not None:
            return model.get_output_embeddings()(self.layer_hidden(model, b))
        return model(**model_inputs(b), logits_to_keep=_response_positions(b)).logits

    def layer_hidden(self, model: torch.nn.Module, b: RolloutBatch) -> Tensor:
        """The residual stream after decoder layer ``b.policy_view.layer`` at the response positions
        [B, T, D] (final norm applied when asked), read by a forward hook on that layer; gradients
        reach that layer and the ones below it only."""
        view, decoder = b.policy_view, model.get_decoder()
        layers = getattr(decoder, "layers", None)
        if layers is None or not 0 <= view.layer < len(layers):
            n = "no indexable" if layers is None else len(layers)
            raise ValueError(f"loss.layer={view.layer}: the policy has {n} decoder layers (0-based index)")
        captured: list[Tensor] = []
        hook = layers[view.layer].register_forward_hook(
            lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out)
        )
        try:
            decoder(**model_inputs(b))
        finally:
            hook.remove()
        hidden = captured[0].index_select(1, _response_positions(b))
        return decoder.norm(hidden) if view.final_norm else hidden

    def logprobs_entropy(
        self, model: torch.nn.Module, b: RolloutBatch, entropy_grad: bool = False, keep_logits: bool = False
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        """(logits or None, log p of the response tokens [B, T], entropy [B, T]) at the temperature;
        under ``b.logit_scale`` s (z' = s z) where a loss set one, i.e. at temperature T / s, and
        under ``b.policy_view`` (a layer's policy; top-k log p, the entropy staying full-vocabulary)."""
        temperature = self.temperature if b.logit_scale is None else self.temperature / b.logit_scale
        topk = b.policy_view.topk if b.policy_view is not None else None
        if self.from_hidden and not keep_logits and topk is None:
            if b.policy_view is not None and b.policy_view.layer is not None:
                hidden = self.layer_hidden(model, b)
            else:
                hidden = model.get_decoder()(**model_inputs(b)).last_hidden_state
                hidden = hidden.index_select(1, _response_positions(b))
            head = model.get_output_embeddings()
            lp, ent = ops.logprobs_and_entropy_from_hidden(
                hidden,
                head.weight,
                b.response_ids,
                lm_head_bias=head.bias,
                temperature=temperature,
                chunk_size=self.chunk_size,
                entropy_grad=entropy_grad,
            )
            return None, lp, ent
        logits = self.logits(model, b)
        lp, ent = ops.logprobs_and_entropy(
            logits, b.response_ids, temperature=temperature, chunk_size=self.chunk_size,
            entropy_grad=entropy_grad,
        )
        if topk is not None:
            lp = ops.topk_logprobs(logits, b.response_ids, topk, temperature=temperature)
        return (logits if keep_logits else None), lp, ent

    def micro_batches(self, b: RolloutBatch) -> list[RolloutBatch]:
        return b.split(self.micro_batch_size or b.size)

    @torch.no_grad()
    def old_policy_pass(
        self,
        policy: torch.nn.Module,
        batch: RolloutBatch,
        ref_policy: torch.nn.Module | None = None,
        extras: bool | frozenset[str] = False,
        policy_stats: bool = True,
        logit_scales: tuple[float, ...] = (),
    ) -> None:
        """Fill log pi_old and its entropy (``policy_stats``), the reference log-probs (``ref_policy``)
        and the ``extras`` (names of OLD_PASS_EXTRAS; True: the UCAS ones) for every response token,
        in eval mode; with ``logit_scales``, log pi_old under z' = s z for each s as well."""
        extras = UCAS_EXTRAS if extras is True else frozenset(extras or ())
        was = policy.training
        policy.eval()
        cols: dict[str, list[Tensor]] = {}
        for mb in self.micro_batches(batch):
            if policy_stats:
                logits = self.logits(policy, mb)
                lp, ent = ops.logprobs_and_entropy(
                    logits, mb.response_ids, temperature=self.temperature, chunk_size=self.chunk_size
                )
                topk = mb.policy_view.topk if mb.policy_view is not None else None
                if topk is not None:
                    lp = ops.topk_logprobs(logits, mb.response_ids, topk, temperature=self.temperature)
                cols.setdefault("old_logprobs", []).append(lp)
                cols.setdefault("entropy", []).append(ent)
                if extras & UCAS_EXTRAS:
                    c, z = ops.self_certainty_and_token_logit(
                        logits, mb.response_ids, temperature=self.temperature, chunk_size=self.chunk_size
                    )
                    cols.setdefault("self_certainty", []).append(c)
                    cols.setdefault("sampled_logits", []).append(z)
                if logit_scales:  # ERA: the same logits at temperature T / s
                    scaled = [
                        ops.topk_logprobs(logits, mb.response_ids, topk, temperature=self.temperature / s)
                        if topk is not None
                        else ops.logprobs_and_entropy(
                            logits,
                            mb.response_ids,
                            temperature=self.temperature / s,
                            chunk_size=self.chunk_size,
                            compute_entropy=False,
                        )[0]
                        for s in logit_scales
                    ]
                    cols.setdefault("scaled_old_logprobs", []).append(torch.stack(scaled, -1))
                if "discriminator_baseline" in extras:  # Clip_V
                    n = ops.discriminator_baseline(
                        logits, ent, temperature=self.temperature, chunk_size=self.chunk_size
                    )
                    cols.setdefault("discriminator_baseline", []).append(n)
                del logits
            if ref_policy is not None:
                rl, _ = ops.logprobs_and_entropy(
                    self.logits(ref_policy, mb), mb.response_ids, temperature=self.temperature,
                    compute_entropy=False, chunk_size=self.chunk_size,
                )
                cols.setdefault("ref_logprobs", []).append(rl)
        policy.train(was)
        mask = batch.response_mask.float()
        for name, parts in cols.items():
            x = torch.cat(parts)
            setattr(batch, name, x * (mask if x.dim() == 2 else mask[..., None]))
