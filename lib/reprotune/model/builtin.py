"""The built-in tiny model: a small, randomly initialised Llama with its own tokenizer.

`build_tiny_llama` writes a complete Hugging Face model folder that loads offline with
`AutoModelForCausalLM` / `AutoTokenizer`, so the whole pipeline (tokenize, QLoRA train, merge,
export) runs end to end on any machine with no download:

- tokenizer.json, tokenizer_config.json (+ chat template): a byte-level BPE tokenizer, vocab 4096,
  trained on the fixed corpus `tiny_corpus.txt` kept beside this module. It is never trained on the
  user's data, so new training data never rebuilds the base model (its DVC hash stays put).
  Specials: `<s>`, `</s>`, `<pad>`, `<|im_start|>`, `<|im_end|>`; nothing is added automatically
  (Qwen-style), and the chat template is ChatML.
- config.json, model.safetensors, generation_config.json: a LlamaForCausalLM (~5M parameters,
  hidden 256, 4 layers, GQA 4/2 heads) initialised from `torch.manual_seed(seed)` in fp32.
  Every Linear dimension is a multiple of 64 so bitsandbytes can quantise it to 4 bits.

The build is byte-identical for a given seed (and library versions): BPE training runs on one
thread, and the written JSON holds no paths or timestamps.
"""

from __future__ import annotations

import json
from pathlib import Path

from reprotune.config.check import BUILTIN_MAX_POSITIONS
from reprotune.io import temporary_env

CORPUS = Path(__file__).with_name("tiny_corpus.txt")
VOCAB_SIZE = 4096
MAX_LENGTH = BUILTIN_MAX_POSITIONS["builtin:tiny-llama"]
BOS, EOS, PAD, IM_START, IM_END = "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"
SPECIALS = [BOS, EOS, PAD, IM_START, IM_END]  # ids 0..4, in this order
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ARCH = dict(
    hidden_size=256,
    intermediate_size=704,  # 11 * 64: bitsandbytes 4-bit needs multiples of 64
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=MAX_LENGTH,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,  # separate lm_head, as in most real bases LoRA is aimed at
)


def build_tiny_llama(out_dir: Path, seed: int = 0) -> None:
    """Write the tiny model folder into the existing empty `out_dir` (byte-identical per seed)."""
    out_dir = Path(out_dir)
    tokenizer = _save_tokenizer(out_dir)
    _save_model(out_dir, tokenizer, seed)


def _train_bpe():
    """Train the byte-level BPE on the fixed corpus; returns a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())  # no unk: every byte has a token
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Lines keep their "\n" so newline runs (the prompt format relies on them) get merges too.
    lines = CORPUS.read_text(encoding="utf-8").splitlines(keepends=True)
    # tokenizers reads TOKENIZERS_PARALLELISM on every call; serial training rules out any
    # thread-order effect on merge ties, at a cost of about a second on this corpus.
    with temporary_env({"TOKENIZERS_PARALLELISM": "false"}):
        tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    return tok


def _save_tokenizer(out_dir: Path):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=MAX_LENGTH,
        clean_up_tokenization_spaces=False,  # decode must give back the exact text
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(out_dir)
    _check_no_paths(out_dir, out_dir)
    return tokenizer


def _save_model(out_dir: Path, tokenizer, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        **ARCH,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS],
        eos_token_id=[ids[EOS], ids[IM_END]],  # stop on plain EOS or at the end of a ChatML turn
        pad_token_id=ids[PAD],
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    _check_no_paths(out_dir, out_dir)


def _check_no_paths(out_dir: Path, root: Path) -> None:
    """Fail if any written JSON names the build folder: it is a temp dir, so the bytes would vary."""
    needle = json.dumps(str(root.resolve()))[1:-1]
    for p in sorted(out_dir.glob("*.json")):
        if needle in p.read_text(encoding="utf-8"):
            raise RuntimeError(f"{p.name} records the build path; the build would not be reproducible")
