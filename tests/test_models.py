import torch

from lightning_entropy.components.samplers import HFSampler, response_mask_from_ids
from lightning_entropy.models import build_char_tokenizer, build_tiny_model, load_policy, load_tokenizer


def tiny(tok, seed=0):
    return build_tiny_model(
        len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_positions=64, seed=seed
    )


def test_char_tokenizer_roundtrip_and_save_load(tmp_path):
    tok = build_char_tokenizer()
    text = "12+34=r 5*(6-7)"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert again.padding_side == "left" and again.eos_token_id == 1 and again.pad_token_id == 0


def test_char_tokenizer_beside_a_qwen2_config_keeps_its_spaces(tmp_path):
    """The built-in policy's folder holds a Qwen2 config.json: the tokenizer must still load as the
    saved character tokenizer (transformers < 5.20 would pick Qwen2Tokenizer and drop the spaces)."""
    tok = build_char_tokenizer()
    tiny(tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    text = "2 6 2 8>18:"
    again = load_tokenizer(tmp_path)
    ids = again(text, add_special_tokens=False)["input_ids"]
    assert ids == tok(text, add_special_tokens=False)["input_ids"] and len(ids) == len(text)
    assert again.decode(ids) == text


def test_tiny_policy_roundtrips_through_from_pretrained(tmp_path):
    tok = build_char_tokenizer()
    model = tiny(tok)
    model.save_pretrained(tmp_path)
    loaded = load_policy(tmp_path)
    x = torch.randint(3, 50, (2, 7))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, loaded(input_ids=x).logits, atol=1e-6)
    assert load_policy(tmp_path, dtype="bfloat16").dtype == torch.bfloat16


def test_response_mask_includes_first_eos_and_flags_truncation():
    eos = 1
    ids = torch.tensor([[5, 6, 1, 0, 0], [5, 6, 7, 8, 9], [1, 0, 0, 0, 0], [5, 1, 5, 1, 0]])
    mask, truncated = response_mask_from_ids(ids, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False, False]


def test_hf_sampler_groups_padding_and_truncation():
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    model = tiny(tok)
    sampler = HFSampler(temperature=1.0, max_new_tokens=4)
    batch = sampler.generate(model, tok, ["1+2=", "33+44="], group_size=3)
    assert batch.size == 6 and batch.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert batch.prompt_ids.shape[1] == 6 and batch.prompt_mask[:3, :2].sum() == 0  # left padding
    assert batch.response_ids.shape[1] <= 4
    # everything after the mask is padding; a truncated row has no EOS and a full mask
    assert torch.all(batch.response_ids[batch.response_mask == 0] == tok.pad_token_id)
    for row, m, tr in zip(batch.response_ids, batch.response_mask, batch.truncated):
        has_eos = bool((row[m.bool()] == tok.eos_token_id).any())
        assert tr.item() == (not has_eos)
    assert [i["prompt"] for i in batch.info] == ["1+2="] * 3 + ["33+44="] * 3
    greedy = sampler.generate(model, tok, ["1+2="], group_size=2, temperature=0.0)
    assert torch.equal(greedy.response_ids[0], greedy.response_ids[1])
