import pytest

from lightning_entropy.components.base import AdvantageEstimator, PolicyLoss
from lightning_entropy.registry import ADVANTAGES, FAMILIES, RegistryError, register


def test_every_family_is_declared():
    assert set(FAMILIES) == {"sampler", "reward", "advantage", "selector", "loss", "regularizer"}


def test_duplicate_name_refused_and_override_allowed():
    @register("advantage", "_test_dup")
    class A(AdvantageEstimator):
        def __call__(self, batch):
            return batch.response_mask.float()

    with pytest.raises(RegistryError, match="already registered.*override=True"):

        @register("advantage", "_test_dup")
        class B(AdvantageEstimator):
            def __call__(self, batch):
                return batch.response_mask.float()

    @register("advantage", "_test_dup", override=True)
    class C(AdvantageEstimator):
        def __call__(self, batch):
            return batch.response_mask.float()

    assert ADVANTAGES.get("_test_dup") is C
    ADVANTAGES._entries.pop("_test_dup")  # keep registry-driven tests clean


def test_wrong_family_refused():
    with pytest.raises(RegistryError, match="must subclass"):

        @register("advantage", "_test_wrong")
        class L(PolicyLoss):
            def __call__(self, logprobs, batch, entropy):
                return logprobs, {}


def test_unknown_family_suggests():
    with pytest.raises(RegistryError, match="did you mean 'advantage'"):
        register("advantages", "x")


def test_unknown_name_lists_names_and_closest_match():
    with pytest.raises(RegistryError) as err:
        ADVANTAGES.get("rlooo", key="advantage")
    msg = str(err.value)
    assert "unknown advantage 'rlooo'" in msg and "config key 'advantage'" in msg
    assert "grpo" in msg and "dr_grpo" in msg and "did you mean 'rloo'" in msg


def test_unknown_hyperparameter_lists_accepted_with_defaults():
    with pytest.raises(RegistryError) as err:
        ADVANTAGES.build("grpo", {"epsilon": 1e-3}, key="advantage")
    msg = str(err.value)
    assert (
        "advantage.epsilon" in msg
        and "eps=1e-06" in msg
        and "norm_std=True" in msg
        and "Did you mean 'eps'" in msg
    )


def test_params_read_from_signature():
    params = {p.name: p.default for p in ADVANTAGES.params("grpo")}
    assert params == {"eps": 1e-6, "norm_std": True}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_registered_component_builds_with_defaults(family):
    reg = FAMILIES[family]
    assert reg.names(), f"family {family} has no members"
    for name in reg.names():
        if name.startswith("_test"):
            continue
        obj = reg.build(name)  # noqa: F841
        assert isinstance(obj, reg.base)
        state = obj.state_dict()
        obj.load_state_dict(state)
