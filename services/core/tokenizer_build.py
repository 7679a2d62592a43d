"""Build a small, real, offline tokenizer for the demo checkpoint (`megascale demo-model`).

The tokenizer is a byte-level BPE trained with the `tokenizers` library on a short English corpus
embedded below, so it needs no network and no hub, and building it twice gives byte-identical
files. Byte-level means every UTF-8 string round-trips: ``decode(encode(text)) == text`` (the 256
byte symbols are always in the vocabulary, so there is never an unknown token).

Vocabulary size: the trainer merges pairs until the vocabulary reaches ``vocab_size`` or the
corpus has no pair left to merge (a few KB of text yields roughly 2,000 entries). The tokenizer's
vocabulary may therefore be *smaller* than the model's ``vocab_size``; the model's value is an
upper bound (every id the tokenizer produces is ``< vocab_size``), and the extra embedding rows
are simply never produced by encoding (a random model may still sample them; decoding such an id
yields an empty string).

Families (the special tokens come first, so their ids are small and fixed):

================  ==========================================  ===============================
family            special tokens (id)                         chat template
================  ==========================================  ===============================
``mixtral``       ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2          ``<s>[INST] ... [/INST]``;
                  bos is prepended by the post-processor      pad is ``<unk>`` (Llama style)
``qwen3_moe``     ``<|endoftext|>`` 0, ``<|im_start|>`` 1,    ChatML, ``add_generation_prompt``
                  ``<|im_end|>`` 2; no bos                    eos ``<|im_end|>``, pad
                                                              ``<|endoftext|>``
``gpt_oss``       ``<|endoftext|>`` 0, ``<|start|>`` 1,       harmony: ``<|start|>{role}
                  ``<|end|>`` 2, ``<|message|>`` 3,           <|message|>...<|end|>``, the
                  ``<|channel|>`` 4, ``<|return|>`` 5; no     assistant's final channel;
                  bos                                         eos ``<|return|>``
================  ==========================================  ===============================

The Mixtral chat template starts with the bos token (as the real Mixtral-Instruct template does),
so a rendered prompt must be encoded with ``add_special_tokens=False`` to avoid a second bos.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from services.errors import ConfigError

__all__ = ["FAMILIES", "MIN_VOCAB_SIZE", "build_demo_tokenizer", "normalize_family"]

FAMILIES: tuple[str, ...] = ("mixtral", "qwen3_moe", "gpt_oss")

# 256 byte symbols + at most 6 special tokens; a little headroom so a few merges exist.
MIN_VOCAB_SIZE = 300
MAX_VOCAB_SIZE = 1 << 20

# Special tokens in id order (id = position).
_SPECIALS: dict[str, tuple[str, ...]] = {
    "mixtral": ("<unk>", "<s>", "</s>"),
    "qwen3_moe": ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    "gpt_oss": ("<|endoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>",
                "<|return|>"),
}

# Role -> token text, as written to tokenizer_config.json (None = the family has no such token).
_ROLES: dict[str, dict[str, str | None]] = {
    "mixtral": {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": "<unk>"},
    "qwen3_moe": {"bos": None, "eos": "<|im_end|>", "unk": None, "pad": "<|endoftext|>"},
    "gpt_oss": {"bos": None, "eos": "<|return|>", "unk": None, "pad": "<|endoftext|>"},
}

# Content may be a string or an OpenAI-style list of parts; only text parts are rendered.
_CONTENT_MACRO = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

# Mistral style: an optional leading system message is folded into the first user turn; roles
# must then alternate user/assistant. The [/INST] already acts as the generation prompt.
_MIXTRAL_TEMPLATE = _CONTENT_MACRO + (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = render(messages[0]['content']) -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{{ bos_token }}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system -%}"
    "{{ '[INST] ' + system + '\\n\\n' + render(message['content']) + ' [/INST]' }}"
    "{%- else -%}{{ '[INST] ' + render(message['content']) + ' [/INST]' }}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ render(message['content']) + eos_token }}"
    "{%- else -%}"
    "{{ raise_exception('Only system, user and assistant roles are supported') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# ChatML as Qwen uses it (without tools or thinking blocks).
_QWEN3_TEMPLATE = _CONTENT_MACRO + (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + render(message['content']) + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# OpenAI's harmony format as gpt-oss uses it, without tools or the analysis channel: every
# message is <|start|>{role}<|message|>{content}<|end|>, the assistant's on the final channel;
# the generation prompt opens an assistant message.
_HARMONY_TEMPLATE = _CONTENT_MACRO + (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|start|>assistant<|channel|>final<|message|>' + render(message['content'])"
    " + '<|end|>' }}"
    "{%- else -%}"
    "{{ '<|start|>' + message['role'] + '<|message|>' + render(message['content'])"
    " + '<|end|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start|>assistant' }}{%- endif -%}"
)

_TEMPLATES = {"mixtral": _MIXTRAL_TEMPLATE, "qwen3_moe": _QWEN3_TEMPLATE,
              "gpt_oss": _HARMONY_TEMPLATE}

# Original text written for this project (no third-party content), a few KB of plain English
# with digits, punctuation and a little code so that common merges exist.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step.
Once upon a time, in a small town by the sea, there lived an old clockmaker and his cat. Every
morning he opened the shop at eight o'clock, wound the great clock in the window, and sat down to
work. People came from far away to buy his clocks, because they were said to never lose a second.
One winter evening a young girl knocked at the door. "My grandmother's clock has stopped," she
said, "and she says that time itself has stopped with it." The clockmaker smiled, took his tools,
and followed her through the snow. When they arrived, he opened the case, cleaned the gears, and
set the pendulum swinging again. The grandmother laughed and said, "Now I can get older again!"

Large language models generate text one token at a time. A request arrives with a prompt; the
server turns the prompt into tokens, runs the model over them once (the prefill), and then runs
it again and again, once per new token (the decode). Each step reads the key and value cache of
every previous token, so memory bandwidth, not arithmetic, is what limits the speed of decoding.
A mixture-of-experts model replaces the dense feed-forward block of each layer with many smaller
experts and a router. For every token the router picks the top two experts, weights their outputs
and adds them together. Only a small part of the model is used for each token, which makes the
model cheap to run for its size, but it also means that each expert sees only a few tokens.

Disaggregated serving puts attention on one group of machines and the experts on another. Many
attention replicas send their tokens to a shared pool of expert nodes, so each expert sees a
larger batch and its matrix multiplications become efficient again. To hide the time spent on
the network, the batch is split into micro-batches that move through the two groups like balls
in a game of ping-pong: while one micro-batch is with the experts, attention works on the next.

Questions and answers. What is the capital of France? The capital of France is Paris. How many
days are there in a week? There are seven days in a week: Monday, Tuesday, Wednesday, Thursday,
Friday, Saturday and Sunday. How many months are there in a year? There are twelve months, from
January to December. What is two plus two? Two plus two is four. What colour is the sky on a
clear day? It is blue. Why is the sea salty? Rivers carry minerals from the rocks into the sea,
and when the water evaporates the salt stays behind.

Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 16 20 32 64 100 128 256 512 1000 1024 2048 4096 8192.
Dates and times: 2024-05-17, 12:30 pm, 7:45 am, 3.14159, 2.71828, 1e-5, 99%, $42.50, #1, @home.
Punctuation: commas, periods. Semicolons; colons: dashes - and -- hyphens; (parentheses) [brackets]
{braces} <angles> 'single' "double" `backticks` / slash \\ backslash | pipe & and * star ~ tilde.

def greet(name: str) -> str:
    \"\"\"Return a friendly greeting for the given name.\"\"\"
    return f"Hello, {name}!"

for i in range(10):
    if i % 2 == 0:
        print(i, "is even")
    else:
        print(i, "is odd")

Dear team, thank you for your work this week. The new release is ready for testing, and we would
like to hear what you think of it before Friday. Please write down anything that looks wrong,
anything that is slow, and anything that is hard to understand. Good software is built by people
who read each other's work carefully and kindly. Best regards, and have a good weekend.

The weather today is cloudy with a chance of rain in the afternoon. Tomorrow will be sunny and
warm, with a light wind from the west. Later in the week the temperature will fall, and there may
be snow in the mountains. Remember to bring an umbrella, a warm coat, and a good book.

In the garden there are apple trees, pear trees, roses, tulips and a small pond with green frogs.
Children play on the grass, birds sing in the trees, and an old man reads the newspaper on a bench.
The baker sells fresh bread, the farmer sells eggs and milk, and the library lends books for free.
Learning is a treasure that will follow its owner everywhere. Knowledge is power, and practice
makes perfect. Write clearly, test often, measure before you optimise, and never stop learning.
"""


def normalize_family(family: str) -> str:
    """Return the canonical family name (one of :data:`FAMILIES`) or raise ConfigError.

    Accepts the Hugging Face ``model_type`` spelling and common variants (``Qwen3-MoE``).
    """
    key = family.strip().lower().replace("-", "_")
    if key == "qwen3moe":
        key = "qwen3_moe"
    if key == "gptoss":
        key = "gpt_oss"
    if key not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    return key


def _train(family: str, vocab_size: int) -> Tokenizer:
    specials = list(_SPECIALS[family])
    tok = Tokenizer(models.BPE())
    # No prefix space: text must round-trip exactly, including a leading character.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    if family == "mixtral":
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.Sequence(
            [
                # Keep byte offsets right for the byte-level pieces, then prepend bos (Llama).
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
                ),
            ]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def build_demo_tokenizer(
    out_dir: Path, family: str, vocab_size: int, *, model_max_length: int = 4096
) -> dict[str, int]:
    """Train the demo tokenizer and write ``tokenizer.json`` + ``tokenizer_config.json``.

    Args:
        out_dir: checkpoint directory (created if missing); existing tokenizer files are replaced.
        family: one of :data:`FAMILIES` (see :func:`normalize_family`).
        vocab_size: the model's vocabulary size, an upper bound for the tokenizer's (>= 300).
        model_max_length: written to ``tokenizer_config.json`` (the model's context length).

    Returns:
        Special token ids by role: ``eos`` and ``pad`` always; ``bos`` and ``unk`` for Mixtral;
        ``endoftext``, ``im_start`` and ``im_end`` for Qwen3-MoE; each harmony token by its
        name (``start``, ``end``, ``message``, ``channel``, ``return``) for gpt-oss. For
        Mixtral e.g.
        ``{"unk": 0, "bos": 1, "eos": 2, "pad": 0}``.

    Raises:
        ConfigError: unknown family, vocab_size out of range, or bad model_max_length.
    """
    fam = normalize_family(family)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ConfigError(f"vocab_size must be an integer, got {vocab_size!r}")
    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise ConfigError(
            f"vocab_size {vocab_size} out of range [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}] for the "
            "byte-level demo tokenizer"
        )
    if (
        isinstance(model_max_length, bool)
        or not isinstance(model_max_length, int)
        or (model_max_length < 1)
    ):
        raise ConfigError(f"model_max_length must be a positive integer, got {model_max_length!r}")

    tok = _train(fam, vocab_size)
    roles = _ROLES[fam]
    ids: dict[str, int] = {}
    for role, text in roles.items():
        if text is not None:
            ids[role] = _token_id(tok, text)
    if fam == "qwen3_moe":
        ids.update(
            endoftext=_token_id(tok, "<|endoftext|>"),
            im_start=_token_id(tok, "<|im_start|>"),
            im_end=_token_id(tok, "<|im_end|>"),
        )
    if fam == "gpt_oss":
        ids.update({t.strip("<|>"): _token_id(tok, t) for t in _SPECIALS[fam]})

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": roles["bos"],
        "eos_token": roles["eos"],
        "unk_token": roles["unk"],
        "pad_token": roles["pad"],
        "additional_special_tokens": [
            t for t in _SPECIALS[fam] if t not in {v for v in roles.values() if v}
        ],
        "add_bos_token": fam == "mixtral",
        "add_eos_token": False,
        # Byte-level decoding is exact; the clean-up would turn " ." into "." and break it.
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "chat_template": _TEMPLATES[fam],
    }
    text = json.dumps(config, indent=2) + "\n"
    (out / "tokenizer_config.json").write_text(text, encoding="utf-8")
    return ids


def _token_id(tok: Tokenizer, text: str) -> int:
    tid = tok.token_to_id(text)
    if tid is None:  # pragma: no cover - the trainer always adds special tokens
        raise RuntimeError(f"special token {text!r} missing from the trained vocabulary")
    return tid
