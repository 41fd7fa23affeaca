"""Forward passes over a RolloutBatch: next-token log-probs and full-vocabulary entropy of the
response tokens, for the training update (with grad) and the old-policy / reference pass (no grad)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_entropy import ops
from lightning_entropy.batch import RolloutBatch

# Old-policy extras a component can ask for through ``requires`` (filled by ``old_policy_pass``).
OLD_PASS_EXTRAS = frozenset({"self_certainty", "sampled_logits"})


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
        """Next-token logits at the response positions [B, T, V] (raw, before temperature).

        The positions are selected before the LM head (``logits_to_keep`` as an index tensor), so the
        logits come out contiguous and ``ops`` reads them as flat rows without a gathered copy."""
        return model(**model_inputs(b), logits_to_keep=_response_positions(b)).logits

    def logprobs_entropy(
        self, model: torch.nn.Module, b: RolloutBatch, entropy_grad: bool = False, keep_logits: bool = False
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        """(logits or None, log p of the response tokens [B, T], entropy [B, T]) at the temperature."""
        if self.from_hidden and not keep_logits:
            hidden = model.get_decoder()(**model_inputs(b)).last_hidden_state
            hidden = hidden.index_select(1, _response_positions(b))
            head = model.get_output_embeddings()
            lp, ent = ops.logprobs_and_entropy_from_hidden(
                hidden,
                head.weight,
                b.response_ids,
                lm_head_bias=head.bias,
                temperature=self.temperature,
                chunk_size=self.chunk_size,
                entropy_grad=entropy_grad,
            )
            return None, lp, ent
        logits = self.logits(model, b)
        lp, ent = ops.logprobs_and_entropy(
            logits, b.response_ids, temperature=self.temperature, chunk_size=self.chunk_size,
            entropy_grad=entropy_grad,
        )
        return (logits if keep_logits else None), lp, ent

    def micro_batches(self, b: RolloutBatch) -> list[RolloutBatch]:
        return b.split(self.micro_batch_size or b.size)

    @torch.no_grad()
    def old_policy_pass(
        self,
        policy: torch.nn.Module,
        batch: RolloutBatch,
        ref_policy: torch.nn.Module | None = None,
        extras: bool = False,
        policy_stats: bool = True,
    ) -> None:
        """Fill log pi_old and its entropy (``policy_stats``), the reference log-probs (``ref_policy``)
        and the UCAS extras (``extras``) for every response token, in eval mode."""
        was = policy.training
        policy.eval()
        cols: dict[str, list[Tensor]] = {}
        for mb in self.micro_batches(batch):
            if policy_stats:
                logits = self.logits(policy, mb)
                lp, ent = ops.logprobs_and_entropy(
                    logits, mb.response_ids, temperature=self.temperature, chunk_size=self.chunk_size
                )
                cols.setdefault("old_logprobs", []).append(lp)
                cols.setdefault("entropy", []).append(ent)
                if extras:
                    c, z = ops.self_certainty_and_token_logit(
                        logits, mb.response_ids, temperature=self.temperature, chunk_size=self.chunk_size
                    )
                    cols.setdefault("self_certainty", []).append(c)
                    cols.setdefault("sampled_logits", []).append(z)
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
            setattr(batch, name, torch.cat(parts) * mask)
