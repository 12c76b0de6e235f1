"""Typed params: one frozen dataclass per params.yaml section.

Stages receive these, never raw dicts. Defaults, allowed values and descriptions live in one place,
params.schema.json; `check.load_params` fills defaults from it before building these classes, and a
test keeps the field names here equal to the schema's keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BaseConfig:
    model: str
    """builtin:tiny-llama, a local folder under models/local/, or a hub id (org/name)."""
    revision: str | None
    """Hub only: branch, tag or commit, resolved to a commit sha recorded in models/base/."""
    trust_remote_code: bool
    """Allow model code shipped with a hub model to run."""

    @property
    def is_builtin(self) -> bool:
        return self.model.startswith("builtin:")


@dataclass(frozen=True)
class MessageMapping:
    role: str
    """Message key holding the speaker (ShareGPT: from)."""
    content: str
    """Message key holding the text (ShareGPT: value)."""


@dataclass(frozen=True)
class DatasetConfig:
    path: str
    """Local .jsonl/.json/.parquet/.csv file, or a hub dataset id."""
    type: str
    """alpaca | chat | completion."""
    split: str
    """Hub datasets: the split to read."""
    field_instruction: str
    """alpaca: instruction field."""
    field_input: str
    """alpaca: optional input field."""
    field_output: str
    """alpaca: response field."""
    field_system: str
    """alpaca: optional system prompt field."""
    field_messages: str
    """chat: list-of-messages field."""
    message_property_mappings: MessageMapping
    """chat: keys of role and content in each message."""
    roles: dict[str, tuple[str, ...]]
    """chat: extra role aliases per canonical role."""
    field_text: str
    """completion: text field."""


@dataclass(frozen=True)
class DataConfig:
    datasets: tuple[DatasetConfig, ...]
    """Data sources, read in order."""
    on_invalid: str
    """reject (keep going, rejects file) | error (stop at the first bad record)."""
    dedup: bool
    """Drop exact duplicates after normalisation."""


@dataclass(frozen=True)
class TokenizeConfig:
    sequence_len: int
    """Tokens per training row."""
    sample_packing: bool
    """Pack several sequences per row (best-fit decreasing)."""
    train_on_inputs: bool
    """Also put labels on prompt tokens."""
    roles_to_train: tuple[str, ...]
    """Chat roles whose turns carry labels."""
    alpaca_format: str
    """alpaca (### prompt) | chat_template."""
    excess_length: str
    """drop | truncate | error, for sequences over sequence_len."""
    val_set_size: float
    """Fraction in [0, 1) or a whole count >= 1."""
    seed: int
    """Split and shuffle seed."""
    num_proc: int
    """Tokenizer worker processes (output does not depend on it)."""
    batch_size: int
    """Records per tokenizer batch (output does not depend on it)."""


@dataclass(frozen=True)
class QuantConfig:
    load_in_4bit: bool
    """QLoRA: base frozen in 4 bits."""
    bnb_4bit_quant_type: str
    """nf4 | fp4."""
    bnb_4bit_use_double_quant: bool
    """Quantize the quantization constants."""
    bnb_4bit_compute_dtype: str
    """auto | bf16 | fp16 | fp32."""
    bnb_4bit_quant_storage: str
    """auto | uint8 | bf16 | fp16 | fp32."""


@dataclass(frozen=True)
class LoraConfig:
    r: int
    """Adapter rank."""
    alpha: float
    """Scale numerator (alpha / r)."""
    dropout: float
    """Adapter input dropout."""
    target_linear: bool
    """Adapt every linear layer but the output head."""
    target_modules: tuple[str, ...] | None
    """Explicit module name suffixes (exclusive with target_linear)."""
    modules_to_save: tuple[str, ...] | None
    """Modules trained in full."""
    use_rslora: bool
    """alpha / sqrt(r) scaling."""
    use_dora: bool
    """Weight-decomposed LoRA."""


@dataclass(frozen=True)
class TrainConfig:
    micro_batch_size: int
    """Rows per device per step."""
    gradient_accumulation_steps: int
    """Micro-batches per optimizer step."""
    num_epochs: float
    """Passes over the training split."""
    max_steps: int
    """Optimizer steps; <= 0 uses num_epochs."""
    learning_rate: float
    """Peak learning rate."""
    lr_scheduler: str
    """cosine | linear | constant."""
    warmup_ratio: float | None
    """Warmup fraction (exclusive with warmup_steps)."""
    warmup_steps: int | None
    """Warmup steps (exclusive with warmup_ratio)."""
    weight_decay: float
    """AdamW weight decay."""
    max_grad_norm: float
    """Clipping norm; 0 disables."""
    optimizer: str
    """adamw_torch | paged_adamw_8bit | adamw_bnb_8bit."""
    seed: int
    """Adapter init, dropout and data order."""
    bf16: str | bool
    """auto | true | false."""
    fp16: bool
    """float16 mixed precision."""
    attn_implementation: str
    """auto | sdpa | eager | flash_attention_2."""
    gradient_checkpointing: bool
    """Recompute activations in backward."""
    eval_steps: int
    """Evaluate every N optimizer steps."""
    save_steps: int
    """Checkpoint every N optimizer steps."""
    logging_steps: int
    """Log every N optimizer steps."""
    loss_watchdog_threshold: float | None
    """Stop when the loss stays above this; None disables."""
    loss_watchdog_patience: int
    """Logs above the threshold before stopping."""
    launcher: str
    """auto | python | accelerate."""


@dataclass(frozen=True)
class MergeConfig:
    dtype: str
    """auto | bf16 | fp16 | fp32 (never 4-bit)."""
    verify_sequences: int
    """Sequences on which merged logits must equal base+adapter logits."""


@dataclass(frozen=True)
class EvaluateConfig:
    max_sequences: int
    """Validation sequences scored."""
    max_new_tokens: int
    """Greedy generation length."""
    num_samples: int
    """Generations written to metrics/samples.jsonl."""


@dataclass(frozen=True)
class ExportConfig:
    formats: tuple[str, ...]
    """safetensors and optionally gguf."""
    max_shard_size: str
    """Largest safetensors shard (e.g. 2GB)."""
    gguf_dtype: str
    """f16 | f32."""


@dataclass(frozen=True)
class Params:
    base: BaseConfig
    data: DataConfig
    tokenize: TokenizeConfig
    quant: QuantConfig
    lora: LoraConfig
    train: TrainConfig
    merge: MergeConfig
    evaluate: EvaluateConfig
    export: ExportConfig


def _tuple(value: Any) -> Any:
    """YAML lists become tuples so the frozen dataclasses stay hashable and immutable."""
    return tuple(value) if isinstance(value, list) else value


def _dataset(raw: dict) -> DatasetConfig:
    raw = dict(raw)
    raw["message_property_mappings"] = MessageMapping(**raw["message_property_mappings"])
    raw["roles"] = {k: tuple(v) for k, v in sorted(raw["roles"].items())}
    return DatasetConfig(**raw)


SECTION_TYPES: dict[str, type] = {
    "base": BaseConfig,
    "data": DataConfig,
    "tokenize": TokenizeConfig,
    "quant": QuantConfig,
    "lora": LoraConfig,
    "train": TrainConfig,
    "merge": MergeConfig,
    "evaluate": EvaluateConfig,
    "export": ExportConfig,
}


def build_params(filled: dict) -> Params:
    """Typed Params from a dict that passed the schema and has every default filled in."""
    sections = {}
    for name, cls in SECTION_TYPES.items():
        raw = {k: _tuple(v) for k, v in filled[name].items()}
        if name == "data":
            raw["datasets"] = tuple(_dataset(d) for d in filled["data"]["datasets"])
        sections[name] = cls(**raw)
    return Params(**sections)
