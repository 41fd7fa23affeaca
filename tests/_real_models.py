"""Tiny real-architecture models built in a temp folder, as a researcher's own checkpoints would be:
a random Llama with a trained BPE tokenizer (BOS added by its post-processor, a chat template, a second
stop id in generation_config) and a GPT-2 with dropout."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|eot|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
QUESTIONS = [(f"What is {a} plus {b}?", a + b) for a in range(1, 9) for b in range(1, 5)]


def _bpe(with_bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|eot|>", "<|user|>", "<|assistant|>", "<|system|>"]
    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = [f"{q} The answer is \\boxed{{{a}}}. #### {a}" for q, a in QUESTIONS] * 4
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(corpus, trainer)
    if with_bos:
        bos = core.token_to_id("<s>")
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=specials[3:],
    )


def build_llama(path: Path) -> Path:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = _bpe(with_bos=True)
    tok.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # Llama-3-Instruct style: the chat turn ends with a token that is not the tokenizer's EOS
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|eot|>")],
        pad_token_id=tok.pad_token_id,
        repetition_penalty=1.3,  # must not leak into RL sampling
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_gpt2(path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _bpe(with_bos=False)
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=128,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_chat_parquet(path: Path) -> Path:
    """verl-style rows: prompt = chat messages, the answer nested in reward_model.ground_truth."""
    rows = [
        {
            "data_source": "toy",
            "prompt": [{"role": "user", "content": q}],
            "reward_model": {"style": "rule", "ground_truth": str(a)},
            "extra_info": {"index": i},
        }
        for i, (q, a) in enumerate(QUESTIONS)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_gsm8k_jsonl(path: Path) -> Path:
    lines = [json.dumps({"question": q, "answer": f"{q[8:-1]} makes {a}.\n#### {a}"}) for q, a in QUESTIONS]
    path.write_text("\n".join(lines) + "\n")
    return path
