import os

import pytest

# tests build their own tiny models; keep them out of the user's cache and off extra threads
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("le_cache")
    old = os.environ.get("LIGHTNING_ENTROPY_CACHE")
    os.environ["LIGHTNING_ENTROPY_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LIGHTNING_ENTROPY_CACHE", None)
    else:
        os.environ["LIGHTNING_ENTROPY_CACHE"] = old


# a 2-layer, 32-wide policy with a 30-step warm-start: seconds, not minutes
TINY = [
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64",
    "model.tiny.warmstart_steps=30",
    "model.tiny.warmstart_examples=500",
    "data.train_size=200",
    "data.val_size=8",
    "data.prompts_per_step=4",
    "algo.mini_batch_size=16",
    "sampler.group_size=4",
    "logging.val_every=2",
    "logging.val_samples=4",
    "logging.pass_k=[1,4]",
    "logging.progress=false",
    "logging.plot=false",
]
