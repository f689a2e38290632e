"""A tiny Llama-shaped causal LM with a real BPE tokenizer and a chat template, built offline.

Model hubs are out of reach in tests and demos, so batchgen builds its own model: a byte-level
BPE tokenizer trained with the ``tokenizers`` library on a generated corpus, a 2-layer Llama
trained for a few seconds on the same corpus (so it writes word-like text and sometimes stops),
saved with ``save_pretrained``. Everything downstream loads it through ``from_pretrained``, the
same path a hub model takes. Deterministic for a given seed on a given machine.

Its tokenizer deliberately has no pad token, a hazard real models have too.
"""

from __future__ import annotations

import random
from pathlib import Path

CONTEXT = 512
# Without tools, and for messages without tool calls, this renders exactly as the template
# before tools did, so the demos' prompts are unchanged. Tools are shown in a system-like block
# that asks for the JSON convention batchgen.shard.responses parses:
# <tool_call>{"name": ..., "arguments": {...}}</tool_call>. <|tool|> is plain text to the
# tokenizer (not a special token): adding one would change the vocabulary and the weights.
CHAT_TEMPLATE = (
    "{% if tools %}<|system|>\nYou can call these tools. Answer with <tool_call>"
    "{\"name\": ..., \"arguments\": {...}}</tool_call>.\n"
    "{% for t in tools %}{% set f = t['function'] if t['function'] is defined else t %}"
    "{% set params = (f['parameters'] | default({}))['properties'] | default({}) %}"
    "{{ f['name'] }}({{ params | list | join(', ') }}): {{ f['description'] | default('') }}\n"
    "{% endfor %}<|end|>\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['content'] is not none %}{{ m['content'] }}{% endif %}"
    "{% if m['tool_calls'] %}{% for call in m['tool_calls'] %}"
    "{% set f = call['function'] if call['function'] is defined else call %}"
    "{% if m['content'] or not loop.first %}{{ '\\n' }}{% endif %}"
    "<tool_call>{\"name\": {{ f['name'] | tojson }}, \"arguments\": "
    "{% if f['arguments'] is string %}{{ f['arguments'] }}{% else %}{{ f['arguments'] | tojson }}"
    "{% endif %}}</tool_call>{% endfor %}{% endif %}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_SPECIAL = ["<|endoftext|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

_SUBJECTS = "the cat|a robot|the river|my friend|the old town|a small bird|the ocean|the teacher".split("|")
_VERBS = "sees|builds|follows|likes|paints|finds|carries|remembers".split("|")
_OBJECTS = "a red apple|the bright moon|a quiet garden|the long road|a warm cup of tea|the city lights".split("|")
_TAILS = "today.|at night.|in the morning.|with great care.|again and again.|before the rain.".split("|")
_TOPICS = "rivers|robots|tea|gardens|the moon|cities|birds|music|bread|mountains".split("|")


def corpus(n: int = 1200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        sentence = " ".join(
            [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_TAILS)]
        ).capitalize()
        topic = rng.choice(_TOPICS)
        if rng.random() < 0.5:
            lines.append(sentence)
        else:
            lines.append(
                f"<|user|>\nWrite one sentence about {topic}.<|end|>\n<|assistant|>\n"
                f"{sentence}<|end|>\n"
            )
    return lines


def build_tiny_model(out_dir: str | Path, seed: int = 0, train_steps: int = 120) -> Path:
    """Build, train briefly and save the tiny model and tokenizer to ``out_dir``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = corpus(seed=seed)

    # 1. Tokenizer: byte-level BPE, so any UTF-8 text round-trips.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|end|>",
        unk_token=None,
        additional_special_tokens=[t for t in _SPECIAL if t != "<|end|>"],
        model_max_length=CONTEXT,
    )
    tokenizer.chat_template = CHAT_TEMPLATE

    # 2. Model: Llama-shaped, small enough to train and run in seconds on a laptop CPU.
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)

    # 3. A few seconds of training so generations look like text and sometimes end.
    ids = [t for line in texts for t in tokenizer(line + "<|end|>")["input_ids"]]
    data = torch.tensor(ids[: (len(ids) // 64) * 64]).view(-1, 64)
    gen = torch.Generator().manual_seed(seed)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(train_steps):
        batch = data[torch.randint(0, len(data), (16,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    model.eval()

    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
