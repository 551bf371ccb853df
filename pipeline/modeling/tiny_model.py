"""The ``tiny`` model: a random-init Llama and a byte-level BPE tokenizer, built in code.

Everything is deterministic from ``model.tiny.seed`` and needs no network, so tests exercise the
real HF code paths (chat template, pad/eos handling, save_pretrained/from_pretrained) in about a
second. The tokenizer is trained on generated arithmetic word problems (the domain of the default
synthetic data) plus a little general text, so typical prompts tokenize into a sane number of tokens.
"""

from __future__ import annotations

import random

import torch
from omegaconf import DictConfig

# ChatML, as SmolLM2 and Qwen use (without a default system prompt).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

NAMES = ["Ava", "Ben", "Carla", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kira", "Liam"]
ITEMS = ["apples", "books", "marbles", "pencils", "cookies", "stickers", "coins", "cards", "eggs", "shells"]
VERBS = [("buys", "+"), ("finds", "+"), ("gets", "+"), ("gives away", "-"), ("eats", "-"), ("loses", "-")]
GENERAL_TEXT = (
    "The answer is the number left at the end. Let us think step by step. First we add, then we subtract. "
    "Each box holds the same number of items, so we multiply. Which of the following is correct? "
    "A question about science: water boils at one hundred degrees. The sun is a star. Plants need light. "
    "Please answer with a single number. The total cost is the price times the quantity. Explain your reasoning. "
    "Once upon a time a small robot learned to count. It counted stars at night and birds in the morning. "
    "History, geography, biology, chemistry and physics are subjects taught in school. Correct, incorrect, "
    "because, therefore, however, remaining, altogether, difference, product, quotient, divided, multiplied."
)


def tiny_corpus(seed: int, problems: int = 400) -> list[str]:
    """Arithmetic word problems with step-by-step solutions in the chat format, plus general text."""
    rng = random.Random(seed)
    lines = [GENERAL_TEXT]
    for _ in range(problems):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        start, amount = rng.randint(2, 99), rng.randint(1, 60)
        verb, op = rng.choice(VERBS)
        result = start + amount if op == "+" else start - amount
        if rng.random() < 0.5:
            question = f"{name} has {start} {item}. {name} {verb} {amount} {item}. How many {item} does {name} have now?"
            answer = f"{name} starts with {start} {item}. {start} {op} {amount} = {result}.\n#### {result}"
        else:
            boxes, price = rng.randint(2, 12), rng.randint(1, 20)
            question = (f"A shop sells {item} in boxes of {amount}. {name} buys {boxes} boxes at ${price} each. "
                        f"How many {item} does {name} get, and what is the total cost?")
            answer = (f"Each box has {amount} {item}, so {boxes} * {amount} = {boxes * amount} {item}. "
                      f"The cost is {boxes} * {price} = {boxes * price} dollars.\n#### {boxes * amount}")
        lines.append(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n")
    return lines


def build_tiny_tokenizer(vocab_size: int, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    # Digits split one by one (as SmolLM2/Llama do), so numbers never merge into opaque tokens.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=TINY_SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # every byte encodable: no unknown tokens
    tokenizer.train_from_iterator(tiny_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|pad|>")
    fast.chat_template = TINY_CHAT_TEMPLATE
    # Like SmolLM2, no BOS is added on encode: the rendered chat prompt carries its own markers.
    return fast


def build_tiny_model(tiny_cfg: DictConfig):
    """(LlamaForCausalLM, tokenizer) from ``model.tiny``; same seed, same weights and vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    seed = int(tiny_cfg.seed)
    tokenizer = build_tiny_tokenizer(int(tiny_cfg.vocab_size), seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=int(tiny_cfg.hidden_size),
        intermediate_size=int(tiny_cfg.intermediate_size),
        num_hidden_layers=int(tiny_cfg.num_layers),
        num_attention_heads=int(tiny_cfg.num_heads),
        num_key_value_heads=int(tiny_cfg.num_heads),
        max_position_embeddings=int(tiny_cfg.max_position_embeddings),
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.float(), tokenizer
