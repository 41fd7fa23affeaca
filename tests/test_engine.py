"""The vLLM engine glue that needs no vLLM: checkpoint names and full parameters under sharding."""

import torch
import torch.distributed as dist

from lightning_entropy.engine import full_parameters, hf_name, unwrap
from lightning_entropy.models import build_char_tokenizer, build_tiny_model
from tests._dist import run_two_ranks


def _tiny():
    return build_tiny_model(
        len(build_char_tokenizer()),
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        max_positions=64,
        seed=0,
    )


def test_checkpoint_names_lose_wrapper_prefixes():
    assert hf_name(
        "module._fsdp_wrapped_module.model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight"
    ) == ("model.layers.0.mlp.up_proj.weight")
    assert hf_name("_orig_mod.lm_head.weight") == "lm_head.weight"


def test_full_parameters_of_a_plain_and_a_wrapped_model_are_its_checkpoint():
    model = _tiny()
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to the embedding
    got = dict(full_parameters(model))
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    wrapped = torch.nn.Module()
    wrapped.module = model  # what DDP looks like from outside
    assert unwrap(wrapped) is model
    assert dict(full_parameters(wrapped)).keys() == expected.keys()


def _fsdp2_worker(rank, world, port):
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = _tiny()
    expected = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert any(hasattr(p, "full_tensor") for p in model.parameters())  # really sharded
    got = dict(full_parameters(model))
    assert got.keys() == expected.keys(), sorted(set(got) ^ set(expected))
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    dist.destroy_process_group()


def test_full_parameters_gather_fsdp2_shards_one_tensor_at_a_time():
    """Two CPU ranks, each holding half of every parameter (FSDP2): the gathered tensors are the
    unsharded model's, under its checkpoint names."""
    run_two_ranks(_fsdp2_worker)
