"""A tiny random-weight Llama with its own byte-level BPE tokenizer, built in milliseconds.

Nothing is downloaded: the tokenizer is trained on the text below and the weights are random
and seeded. Greedy tests compare batched with one-at-a-time decoding, which differ by float
noise (matrix kernels differ by batch size), so the argmax must have margins far above that
noise. Measured over 480 greedy steps: initializer_range 0.1 gives noise ~3e-6 and a smallest
top-2 gap of ~5e-4 (ratio ~170); larger ranges grow the noise faster than the gaps (0.5: ratio
~6, 1.0: ratio ~1.5), so 0.1 it is.
"""

from __future__ import annotations

from pathlib import Path

TINY_VOCAB_SIZE = 512
TINY_EOS = "<|im_end|>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_TEXT = """
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.
A serving engine cuts the generation into slices and batches requests of similar length.
Every slice has a bounded time and a bounded memory, so the scheduler never runs out of memory.
Paris is the capital of France, Berlin is the capital of Germany, Rome is the capital of Italy.
Madrid, Lisbon, Vienna, Prague, Warsaw, Budapest, Athens, Oslo, Stockholm and Helsinki are cities.
One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen.
Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May June.
The worker runs a model, keeps a cache of keys and values, and samples one token at every step.
Prefill reads the whole prompt at once; decode reads one token per request per step.
Padding on the left keeps the last token of every row in the same column of the batch.
Water boils at one hundred degrees and freezes at zero degrees on the Celsius scale.
Mathematics, physics, chemistry, biology, history, geography, music, painting and poetry.
Hello world! How are you today? I am fine, thank you. What is your name? My name is Tiny.
Red orange yellow green blue indigo violet black white grey brown pink purple silver gold.
Apples, bananas, cherries, grapes, lemons, mangoes, oranges, peaches, pears and plums.
The broker assigns batches to workers so that their expected completion times stay balanced.
Short requests should not wait behind long ones; slices return early when every request ends.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 32 64 128 256 512 1024 2048 4096 8192.
Punctuation: , . ; : ! ? ( ) [ ] { } < > = + - * / % & | ^ ~ # @ $ " ' ` _ \\ newline tab.
"""


def build_tokenizer(path: Path):
    """Train a byte-level BPE on the text above and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TEXT.splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token=TINY_EOS,
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def build_tiny_model(path: Path, seed: int = 0, initializer_range: float = 0.1) -> Path:
    """Write a tiny Llama (hidden 64, 2 layers, 4 heads, 2 kv heads) and its tokenizer to
    ``path``; returns ``path``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path)
    eos_id = tokenizer.convert_tokens_to_ids(TINY_EOS)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(path)
    return path
