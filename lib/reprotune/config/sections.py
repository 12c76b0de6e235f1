"""Typed params: one frozen dataclass per params.yaml section, and the one source of params.schema.json.

Stages receive these, never raw dicts. Each field says everything about its key:
  - the annotation gives the JSON type (`X | None` allows null);
  - `key(default, **constraints)` gives the default and the JSON Schema constraints (`choices` is the enum);
  - the docstring under it is the description; a section's class docstring describes the section.
`reprotune.schema` turns these into params.schema.json (`make schema`), and a test keeps the committed
file equal to what it generates. At run time `check.load_params` validates against that file and fills every
default from it, then `build_params` builds these classes; so the fields carry their defaults as metadata
only, never as Python defaults (which would be a second, differently typed copy: tuples for lists,
dataclasses for mappings).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, get_type_hints

# JSON Schema keywords `key` accepts, plus its own: choices (enum), items (constraints on list items, same
# keywords), keys (the keys a mapping may have). Checked so that a misspelt keyword fails loudly instead of
# landing in the schema as an unknown keyword that validators ignore.
_CONSTRAINTS = frozenset(
    {
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "minLength",
        "minItems",
        "uniqueItems",
        "pattern",
        "choices",
        "items",
        "keys",
    }
)


def key(default: Any = MISSING, **constraints: Any) -> Any:
    """A params key: its default (none: the key is required) and its JSON Schema constraints."""
    unknown = (set(constraints) | set(constraints.get("items", {}))) - _CONSTRAINTS
    if unknown:
        raise TypeError(f"unknown constraint(s) {sorted(unknown)}; allowed: {sorted(_CONSTRAINTS)}")
    metadata = {"schema": constraints} if default is MISSING else {"schema": constraints, "default": default}
    return field(metadata=metadata)


# Where the train stage can report its run (the Trainer's names); dvclive is always on (see TrainConfig.report_to).
TRACKERS = ("dvclive", "wandb", "mlflow", "tensorboard")

# Data file formats by name suffix (the validate stage's readers); a dataset's ds_type names one for other names.
DATA_FORMATS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".arrow": "arrow",
}

# Named chat templates the base stage can put into the tokenizer: every one Axolotl 0.19 ships, by its names
# (model/templates/<name>.jinja holds each; a test keeps the two lists equal).
CHAT_TEMPLATE_NAMES = (
    "alpaca",
    "aya",
    "chatml",
    "cohere",
    "command_a",
    "command_a_rag",
    "command_a_tool_use",
    "deepseek_v2",
    "deepseek_v3",
    "exaone",
    "exaone4",
    "falcon_h1",
    "gemma",
    "gemma3",
    "gemma3n",
    "gemma4",
    "gemma4_unified",
    "jamba",
    "llama3",
    "llama3_2_vision",
    "llama4",
    "llava",
    "metharme",
    "mistral_v1",
    "mistral_v2v3",
    "mistral_v3_tekken",
    "mistral_v7_tekken",
    "nemotron_h",
    "phi_3",
    "phi_35",
    "phi_4",
    "pixtral",
    "qwen2_vl",
    "qwen3",
    "qwen3_5",
    "qwen_25",
)
# Axolotl's chat_template values (jinja aside): the tokenizer's own, a named one, or the tokenizer's own if any
CHAT_TEMPLATES = (
    "tokenizer_default",
    *CHAT_TEMPLATE_NAMES,
    *(f"tokenizer_default_fallback_{n}" for n in CHAT_TEMPLATE_NAMES),
)
SPECIAL_TOKEN_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")
# The Trainer's AdamW variants (train.optimizer): torch, bitsandbytes, torchao.
OPTIMIZERS = (
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_bnb_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "adamw_torch_8bit",
    "adamw_torch_4bit",
)
LR_SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "polynomial")


@dataclass(frozen=True)
class BaseConfig:
    """Which base model to fine-tune."""

    model: str = key("builtin:tiny-llama", minLength=1)
    """builtin:tiny-llama (built offline), a local folder or .gguf file under models/local/, or a Hugging
    Face hub id (org/name)."""
    revision: str | None = key(None, minLength=1)
    """Hub ids only: branch, tag or commit; resolved to a commit sha and recorded in models/base/."""
    trust_remote_code: bool = key(False)
    """Run model code shipped with a hub model. Off: only architectures built into transformers load."""
    gguf_dtype: str = key("fp32", choices=("fp32", "bf16", "fp16"))
    """GGUF bases only: dtype of the dequantized weights. fp32 keeps the dequantized values exactly; bf16
    halves the size (for 7B+ models)."""
    chat_template: str = key("tokenizer_default", choices=(*CHAT_TEMPLATES, "jinja"))
    """The chat template written into the base tokenizer, as Axolotl names them: tokenizer_default (its own),
    a named one, tokenizer_default_fallback_<name> (its own if any, else the named one), or jinja
    (chat_template_jinja)."""
    chat_template_jinja: str | None = key(None, minLength=1)
    """The template text when chat_template is jinja."""
    special_tokens: dict[str, str] = key({}, keys=SPECIAL_TOKEN_ROLES)
    """Special-token roles (Axolotl's special_tokens): a token the vocabulary has, or a new one, added as a
    special token (the embeddings grow, see tokens). A new eos_token also stops generation."""
    tokens: tuple[str, ...] = key((), uniqueItems=True, items={"minLength": 1})
    """Tokens added to the vocabulary (Axolotl's tokens), e.g. markup the data uses. The base stage grows the
    embedding (and an untied output head) by one row per new token, set to the mean of the existing rows;
    training learns those rows and the adapter saves only them."""

    @property
    def is_builtin(self) -> bool:
        return self.model.startswith("builtin:")


@dataclass(frozen=True)
class MessageMapping:
    role: str = key("role", minLength=1)
    """Message key holding the speaker (ShareGPT: from)."""
    content: str = key("content", minLength=1)
    """Message key holding the text (ShareGPT: value)."""


@dataclass(frozen=True)
class DatasetConfig:
    path: str = key(minLength=1)
    """A local .jsonl/.json/.parquet/.csv file, or a hub dataset id (org/name)."""
    type: str = key(choices=("alpaca", "chat_template", "chat", "completion"))
    """alpaca: instruction/input/output; chat_template (Axolotl's name; `chat` is the same): a list of
    messages rendered by the chat template; completion: raw text."""
    split: str = key("train", minLength=1)
    """Hub datasets only: the split to read."""
    field_instruction: str = key("instruction", minLength=1)
    """alpaca: instruction field."""
    field_input: str = key("input", minLength=1)
    """alpaca: optional input field."""
    field_output: str = key("output", minLength=1)
    """alpaca: response field."""
    field_system: str = key("system", minLength=1)
    """alpaca: optional system prompt field."""
    field_messages: str = key("messages", minLength=1)
    """chat: the list of messages (ShareGPT: conversations)."""
    message_property_mappings: MessageMapping = key({"role": "role", "content": "content"})
    """chat: which message keys hold role and content (ShareGPT: from / value)."""
    roles: dict[str, tuple[str, ...]] = key({}, keys=("system", "user", "assistant", "tool"))
    """chat: extra role names mapped to system/user/assistant/tool (human and gpt are known already)."""
    drop_system_message: bool = key(False)
    """chat: leave out a conversation's system message (Axolotl's key), e.g. when the data's system text
    must not be trained into the model."""
    field_text: str = key("text", minLength=1)
    """completion: the text field."""
    data_files: tuple[str, ...] | None = key(None, minItems=1, items={"minLength": 1})
    """Files to read when path is a folder (names or glob patterns under it, each matched in sorted order)
    or a hub dataset (files in its repository). null: every data file of the folder / the hub's default."""
    ds_type: str | None = key(None, choices=tuple(dict.fromkeys(DATA_FORMATS.values())))
    """File format when the name does not say (Axolotl's ds_type): json (JSON Lines or an array), parquet,
    csv, text (one record {field_text: line} per line), arrow (Arrow IPC stream, as datasets saves)."""
    name: str | None = key(None, minLength=1)
    """Hub datasets only: the configuration (subset) to load."""
    shards: int | None = key(None, minimum=1)
    """Read one of this many shards of the dataset (shards_idx picks it), cut as Axolotl cuts them: the records
    shuffled with tokenize.seed, then split into contiguous shards (datasets' shuffle(seed).shard())."""
    shards_idx: int = key(0, minimum=0)
    """Which shard (0-based) when shards is set."""
    weight: float = key(1.0, exclusiveMinimum=0, maximum=100)
    """Training copies per record: 0.5 keeps half the dataset's training records, 2 repeats each twice,
    1.5 repeats half of them; which ones is drawn with tokenize.seed after the train/val split, so a copy never
    lands in validation. Counts per dataset in metrics/tokenize.json."""
    roles_to_train: tuple[str, ...] | None = key(
        None, minItems=1, uniqueItems=True, items={"choices": ("system", "user", "assistant", "tool")}
    )
    """chat: this dataset's trained roles; null: tokenize.roles_to_train."""
    train_on_eos: str | None = key(None, choices=("turn", "last", "all", "none"))
    """chat: this dataset's trained end-of-turn tokens; null: tokenize.train_on_eos."""

    @property
    def kind(self) -> str:
        """The type with aliases resolved: chat_template is chat."""
        return canonical_type(self.type)


def canonical_type(dataset_type: str) -> str:
    return "chat" if dataset_type == "chat_template" else dataset_type


@dataclass(frozen=True)
class ReplayConfig:
    """Replay of the base model's own answers (the replay stage): rows that keep what the base knew."""

    source: str = key("none", choices=("none", "prompts", "self"))
    """none: no replay; prompts: the base's answers to the prompt file `prompts`; self: its answers to the
    training data's own instructions (self-distillation: alpaca instruction and input, a conversation's first
    user turn), never to a validation record's."""
    prompts: str = key("data/prompts/replay.jsonl", minLength=1)
    """source prompts: a prompt file under data/prompts/ (.jsonl with a "prompt" per line, or .txt). The shipped
    one holds 400 everyday prompts, none of them in evaluate.general_prompts' file."""
    weight: float = key(0.2, exclusiveMinimum=0, exclusiveMaximum=1)
    """Replay's share of the training sequences: 0.2 adds one replay copy for every four training copies of
    the data (after data.datasets weights), drawn as a dataset weight is."""
    max_prompts: int | None = key(None, minimum=1)
    """At most this many prompts, drawn with `seed` (in file order); null: all of them."""
    max_new_tokens: int = key(128, minimum=1)
    """Answer length cap. An answer that has not ended (stop token) within it is kept as cut: its text is
    trained, its end-of-turn token is not (the model must not learn to stop mid-sentence). Counted in
    metrics/replay.json."""
    temperature: float = key(0.0, minimum=0)
    """0: greedy (the base's most likely answer); above 0: sampled at this temperature with `seed`."""
    seed: int = key(42, minimum=0)
    """Seed of the prompt draw (max_prompts) and of sampling."""
    batch_size: int | str = key("auto", minimum=1, pattern="^auto$")
    """Prompts answered together (one KV cache per batch). auto: 32. With temperature 0 it does not change
    the answers."""


@dataclass(frozen=True)
class DataConfig:
    """Training data: files to read and how to treat bad records."""

    datasets: tuple[DatasetConfig, ...] = key(({"path": "data/sample/alpaca.jsonl", "type": "alpaca"},), minItems=1)
    """Data sources, read in order."""
    test_datasets: tuple[DatasetConfig, ...] = key(())
    """An explicit validation set (Axolotl's test_datasets), entries as in datasets; exclusive with
    tokenize.val_set_size (set it to 0). Training records equal to a test record are dropped as duplicates."""
    on_invalid: str = key("reject", choices=("reject", "error"))
    """reject: keep bad records in data/validated/rejects.jsonl with a reason and go on; error: stop at the
    first bad record."""
    dedup: bool = key(True)
    """Drop exact duplicates of an earlier record (after normalisation); they are counted in metrics."""
    replay: ReplayConfig = key(
        {
            "source": "none",
            "prompts": "data/prompts/replay.jsonl",
            "weight": 0.2,
            "max_prompts": None,
            "max_new_tokens": 128,
            "temperature": 0.0,
            "seed": 42,
            "batch_size": "auto",
        }
    )
    """Training rows of the base's own answers, against forgetting what it knew (the replay stage)."""


@dataclass(frozen=True)
class TokenizeConfig:
    """Prompt templates, label masking, train/val split and packing."""

    sequence_len: int = key(2048, minimum=16, maximum=1048576)
    """Tokens per training row (a packed bin or one padded sequence). Longer: more context, more memory."""
    sample_packing: bool = key(True)
    """Pack several sequences per row (best-fit decreasing). Faster training; positions restart per sequence."""
    train_on_inputs: bool = key(False)
    """Also train on prompt tokens. Off: labels are -100 outside the response / trained turns."""
    roles_to_train: tuple[str, ...] = key(
        ("assistant",), minItems=1, uniqueItems=True, items={"choices": ("system", "user", "assistant", "tool")}
    )
    """Chat roles whose turns (and end-of-turn tokens) carry labels."""
    train_on_eos: str = key("turn", choices=("turn", "last", "all", "none"))
    """Which end-of-turn tokens (the special token a chat template closes a turn with: <|im_end|>, </s>)
    carry labels, as Axolotl's train_on_eos: turn: each trained turn's; last: only the last trained
    turn's; all: every turn's, trained or not; none: none (the model never learns to stop). Chat records
    only: alpaca and completion sequences always train their EOS."""
    alpaca_format: str = key("alpaca", choices=("alpaca", "chat_template"))
    """How alpaca records are rendered: Axolotl's alpaca prompt (its preamble, then ### Instruction/### Input/
    ### Response), or the tokenizer's chat template."""
    excess_length: str = key("drop", choices=("drop", "truncate", "error"))
    """A sequence longer than sequence_len: drop it (counted), cut it, or stop with an error."""
    val_set_size: float = key(0.05, minimum=0)
    """Validation split: a fraction in [0, 1) of the sequences, or a whole count >= 1. 0: no validation."""
    seed: int = key(42, minimum=0)
    """Seed of the train/val split and the shuffle."""
    num_proc: int = key(2, minimum=1, maximum=256)
    """Worker processes for tokenization. Does not change the output."""
    batch_size: int = key(1000, minimum=1)
    """Records per tokenizer batch. Bigger: faster, more memory. Does not change the output."""


@dataclass(frozen=True)
class QuantConfig:
    """4-bit loading of the base for training (QLoRA)."""

    load_in_4bit: bool = key(True)
    """Load the frozen base in 4 bits (QLoRA). Off: plain LoRA on a 16/32-bit base."""
    bnb_4bit_quant_type: str = key("nf4", choices=("nf4", "fp4"))
    """4-bit data type; NF4 is the QLoRA paper's."""
    bnb_4bit_use_double_quant: bool = key(True)
    """Quantize the quantization constants too (the QLoRA paper measures a saving of 0.37 bits per parameter)."""
    bnb_4bit_compute_dtype: str = key("auto", choices=("auto", "bf16", "fp16", "fp32"))
    """Dtype of the de-quantized matmuls. auto: the training dtype."""
    bnb_4bit_quant_storage: str = key("auto", choices=("auto", "uint8", "bf16", "fp16", "fp32"))
    """Storage dtype of packed 4-bit weights. auto: uint8, or the compute dtype under FSDP."""


@dataclass(frozen=True)
class LoraConfig:
    """The low-rank adapter."""

    r: int = key(32, minimum=1, maximum=4096)
    """Adapter rank. Higher: more capacity, more trainable parameters."""
    alpha: float = key(16, exclusiveMinimum=0)
    """Scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA)."""
    dropout: float = key(0.05, minimum=0, maximum=1, exclusiveMaximum=1)
    """Dropout on the adapter input."""
    target_linear: bool = key(True)
    """Adapt every linear layer except the output head. Exclusive with target_modules."""
    target_modules: tuple[str, ...] | None = key(None, items={"minLength": 1}, minItems=1)
    """Module name suffixes to adapt (e.g. [q_proj, v_proj]); each must match a module."""
    modules_to_save: tuple[str, ...] | None = key(None, items={"minLength": 1})
    """Modules trained in full and saved with the adapter (embed_tokens, lm_head when tokens were added)."""
    use_rslora: bool = key(False)
    """Rank-stabilised scaling alpha / sqrt(r)."""
    use_dora: bool = key(False)
    """Weight-decomposed LoRA (DoRA)."""


@dataclass(frozen=True)
class FsdpConfig:
    """Fully sharded data parallelism (train.distributed: fsdp): each process holds 1/N of the base's weights.
    Names as in Axolotl's fsdp_config (with or without its fsdp_ prefix)."""

    version: int = key(2, choices=(2,))
    """FSDP version: 2 (torch's fully_shard, per-parameter sharding; what accelerate and Axolotl use now)."""
    auto_wrap_policy: str = key("TRANSFORMER_BASED_WRAP", choices=("TRANSFORMER_BASED_WRAP",))
    """Which modules become a sharding unit (gathered whole for their forward): each decoder layer."""
    transformer_layer_cls_to_wrap: str | None = key(None, minLength=1)
    """Class name of the decoder layer (LlamaDecoderLayer, Qwen2DecoderLayer, ...). null: the one the model
    names itself (transformers' _no_split_modules)."""
    reshard_after_forward: bool = key(True)
    """Free a layer's gathered weights after its forward and gather them again for backward: least memory.
    false: keep them until backward (one all-gather per layer less, a layer's full weights held longer)."""
    offload_params: bool = key(False)
    """Keep the shards (and their optimizer state) in CPU memory, copying to the GPU per layer: fits a base
    larger than the GPUs' memory together, much slower."""
    cpu_ram_efficient_loading: bool = key(False)
    """CUDA: only the first process reads the weights, the others receive their shards (host memory of one
    copy instead of one per process). Sharding on CPU always loads shard by shard."""
    state_dict_type: str = key("SHARDED_STATE_DICT", choices=("SHARDED_STATE_DICT", "FULL_STATE_DICT"))
    """Checkpoints for resuming: each process writes its own shards (SHARDED) or the first writes whole tensors
    (FULL: more memory on it). The finished adapter is always one ordinary peft folder."""
    activation_checkpointing: bool = key(False)
    """Recompute each layer's activations in backward, done by FSDP. Exclusive with train.gradient_checkpointing
    (the same thing done by transformers): set one."""


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation run."""

    micro_batch_size: int = key(2, minimum=1)
    """Rows (bins) per device per step."""
    eval_batch_size: int | None = key(None, minimum=1)
    """Rows per device per evaluation step. null: micro_batch_size."""
    gradient_accumulation_steps: int = key(4, minimum=1)
    """Micro-batches per optimizer step."""
    num_epochs: float = key(1, exclusiveMinimum=0)
    """Passes over the training split (ignored when max_steps > 0)."""
    max_steps: int = key(-1, minimum=-1)
    """Optimizer steps; -1 or 0: use num_epochs."""
    learning_rate: float = key(0.0002, exclusiveMinimum=0, maximum=1)
    """Peak learning rate."""
    lr_scheduler: str = key("cosine", choices=LR_SCHEDULERS)
    """Decay after warmup: cosine (to cosine_min_lr_ratio of the peak, 0 unless set), linear, constant,
    constant_with_warmup (the same as constant here: warmup is honoured by both), or polynomial (the
    Trainer's: power 1 down to 1e-7)."""
    cosine_min_lr_ratio: float | None = key(None, minimum=0, maximum=1)
    """cosine only: the floor of the decay as a fraction of the peak (Axolotl's key; the Trainer's
    cosine_with_min_lr). null: decay to 0."""
    warmup_ratio: float | None = key(None, minimum=0, maximum=1)
    """Warmup as a fraction of steps. Exclusive with warmup_steps."""
    warmup_steps: int | None = key(None, minimum=0)
    """Warmup in steps. Exclusive with warmup_ratio."""
    weight_decay: float = key(0.0, minimum=0)
    """AdamW weight decay on adapter weights."""
    max_grad_norm: float = key(1.0, minimum=0)
    """Gradient clipping norm; 0 disables."""
    optimizer: str = key("adamw_torch", choices=OPTIMIZERS)
    """AdamW, by the Trainer's names: adamw_torch (exact, runs everywhere), adamw_torch_fused (one kernel per
    step), adamw_bnb_8bit / paged_adamw_8bit / paged_adamw_32bit (bitsandbytes: 8-bit states, paged to host
    memory on CUDA), adamw_torch_8bit / adamw_torch_4bit (torchao's low-bit states; the `lowbit` extra).
    Low-bit states save memory on large adapters at a small cost in exactness."""
    adam_beta1: float = key(0.9, minimum=0, exclusiveMaximum=1)
    """AdamW's first-moment decay."""
    adam_beta2: float = key(0.999, minimum=0, exclusiveMaximum=1)
    """AdamW's second-moment decay."""
    adam_epsilon: float = key(1e-08, exclusiveMinimum=0)
    """AdamW's denominator term."""
    seed: int = key(42, minimum=0)
    """Seed of adapter init, dropout and data order."""
    bf16: str | bool = key("auto", choices=("auto", True, False))
    """bfloat16 mixed precision. auto: on CUDA sm80+ only."""
    fp16: bool = key(False)
    """float16 mixed precision (older GPUs). Exclusive with bf16: true."""
    attn_implementation: str = key("auto", choices=("auto", "sdpa", "eager", "flash_attention_2"))
    """auto: flash_attention_2 when installed on CUDA, else sdpa."""
    gradient_checkpointing: bool = key(True)
    """Recompute activations in backward: much less activation memory, one more forward pass of time."""
    chunked_cross_entropy: bool = key(True)
    """The loss from the final hidden states of supervised positions only, projected through the output head a
    chunk of rows at a time: no [tokens x vocabulary] logits (4.2 GB in fp32 for 8,192 tokens of Llama 3's
    vocabulary), no head work at prompt positions. Equal to the full-logits loss up to float rounding. Axolotl's
    cut_cross_entropy / liger_fused_linear_cross_entropy / chunked_cross_entropy. false: full logits."""
    eval_steps: int | None = key(50, minimum=1)
    """Evaluate on the validation split every N optimizer steps. Exclusive with evals_per_epoch."""
    evals_per_epoch: int | None = key(None, minimum=1)
    """Evaluations per epoch (Axolotl's key): eval_steps derived from the packed train split's steps per
    epoch when training starts. Exclusive with eval_steps."""
    save_steps: int | None = key(50, minimum=1)
    """Write a resumable checkpoint every N optimizer steps. Exclusive with saves_per_epoch."""
    saves_per_epoch: int | None = key(None, minimum=1)
    """Checkpoints per epoch (Axolotl's key), derived like evals_per_epoch. Exclusive with save_steps."""
    logging_steps: int = key(10, minimum=1)
    """Log loss and learning rate every N optimizer steps."""
    loss_watchdog_threshold: float | None = key(5.0, exclusiveMinimum=0)
    """Stop when the training loss stays above this for `loss_watchdog_patience` logs; null disables."""
    loss_watchdog_patience: int = key(3, minimum=1)
    """Consecutive logs above the threshold before stopping."""
    early_stopping_patience: int | None = key(None, minimum=1)
    """Stop when the validation loss has not improved for this many evaluations in a row (the Trainer's
    early stopping, as Axolotl runs it): the adapter kept is the best evaluation's (a checkpoint is written at
    every evaluation for it), and metrics/train.json says where it stopped and which step it kept. Needs a
    validation split. null: train to the end."""
    launcher: str = key("auto", choices=("auto", "python", "accelerate"))
    """auto: accelerate launch when several GPUs are visible (or num_machines > 1), else a plain process."""
    distributed: str = key("auto", choices=("auto", "ddp", "fsdp"))
    """How several processes share the work. ddp: each holds the whole model, gradients averaged; fsdp: the
    base's weights sharded across the processes (the `fsdp` block); auto: ddp. One process: neither."""
    fsdp: FsdpConfig = key(
        {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": None,
            "reshard_after_forward": True,
            "offload_params": False,
            "cpu_ram_efficient_loading": False,
            "state_dict_type": "SHARDED_STATE_DICT",
            "activation_checkpointing": False,
        }
    )
    """FSDP settings, read when distributed is fsdp."""
    num_machines: int = key(1, minimum=1)
    """Machines (nodes) of one run; each runs the stage with its own machine_rank (README: several machines)."""
    machine_rank: int | None = key(None, minimum=0)
    """This machine's rank, 0 (the main machine, which writes the adapter) to num_machines - 1. null: NODE_RANK
    from the environment (as torchrun reads it), else 0; so every machine can share one params.yaml."""
    main_process_ip: str | None = key(None, minLength=1)
    """Address of the machine of rank 0, reachable from the others. null: MASTER_ADDR from the environment."""
    main_process_port: int | None = key(None, minimum=1, maximum=65535)
    """Port on it. null: MASTER_PORT from the environment, else a free port (one machine only)."""
    report_to: tuple[str, ...] = key(("dvclive",), minItems=1, uniqueItems=True, items={"choices": TRACKERS})
    """Where the run's curves and params go: dvclive (always: the stage's dvclive/ curves that dvc.yaml
    declares) and any of wandb, mlflow, tensorboard (each an optional extra: pip install -e '.[wandb]').
    Credentials only from the environment (WANDB_API_KEY, MLFLOW_TRACKING_USERNAME, ...), never from params.
    Changing a tracker key reruns training (a tracker sees only a run that happens) but no later stage:
    the adapter does not record them."""
    wandb_project: str | None = key(None, minLength=1)
    """W&B project (Axolotl's key). null: WANDB_PROJECT from the environment, else "huggingface"."""
    wandb_entity: str | None = key(None, minLength=1)
    """W&B team or user. null: WANDB_ENTITY from the environment, else the account's default."""
    wandb_name: str | None = key(None, minLength=1)
    """W&B run name. null: one W&B makes up."""
    wandb_mode: str | None = key(None, choices=("online", "offline", "disabled"))
    """online: sent as it runs; offline: kept in trackers/wandb/ for `wandb sync`; disabled: no W&B run.
    null: WANDB_MODE from the environment, else online."""
    mlflow_tracking_uri: str | None = key(None, minLength=1)
    """MLflow tracking server or store (http://host:5000, file:/path). null: MLFLOW_TRACKING_URI from the
    environment, else a local file store in trackers/mlruns/."""
    mlflow_experiment_name: str | None = key(None, minLength=1)
    """MLflow experiment. null: MLFLOW_EXPERIMENT_NAME from the environment, else MLflow's Default."""
    mlflow_run_name: str | None = key(None, minLength=1)
    """MLflow run name. null: one MLflow makes up."""


@dataclass(frozen=True)
class MergeConfig:
    """Folding the adapter into a 16-bit copy of the base."""

    dtype: str = key("auto", choices=("auto", "bf16", "fp16", "fp32"))
    """dtype of the merged weights. auto: bf16 on CUDA sm80+, else the base's stored dtype. Never 4-bit."""
    verify_sequences: int = key(4, minimum=1)
    """Validation sequences on which merged logits must equal base+adapter logits."""
    fold_into: str = key("dequantized", choices=("dequantized", "original"))
    """Weights the adapter is folded into. dequantized: the 4-bit weights it was trained against, dequantized,
    so the shipped model is the trained one; original: the base's 16/32-bit weights (peft's merge_and_unload),
    which the adapter was not fitted to. Same thing without quant.load_in_4bit."""


@dataclass(frozen=True)
class EvaluateConfig:
    """Base vs tuned on the validation split."""

    max_sequences: int = key(200, minimum=1)
    """Validation sequences scored for loss and exact match."""
    max_new_tokens: int = key(32, minimum=1)
    """Greedy generation length for exact-match checks."""
    num_samples: int = key(8, minimum=0)
    """Validation generations written to metrics/samples.jsonl."""
    batch_size: int | str = key("auto", minimum=1, pattern="^auto$")
    """Sequences scored and prompts answered together (padded, one KV cache per batch): the same figures and
    answers as one at a time, in fewer passes over the weights. auto: 32; more on a GPU with memory to spare
    for the batch's KV cache."""
    prompts: tuple[str, ...] = key(
        ("What is the capital of France?", "Give one tip for staying healthy."), items={"minLength": 1}
    )
    """General questions outside the training tasks, answered by every model in metrics/samples.jsonl (through
    the chat template): what fine-tuning kept or lost."""
    general_prompts: str | None = key("data/prompts/general.jsonl", minLength=1)
    """Retention: a prompt file under data/prompts/ (.jsonl with a "prompt" per line, or .txt). The base answers
    each greedily; every model's mean NLL on those answers and how many of its own would begin as the base's
    (first 8 tokens) go to the `retention` block of metrics/evaluate.json. The shipped file holds 240 everyday
    prompts. null: no retention figures."""
    general_max_new_tokens: int = key(32, minimum=1)
    """Length cap of the base's answers to general_prompts (the retention reference)."""


@dataclass(frozen=True)
class ExportConfig:
    """The deployable folder."""

    formats: tuple[str, ...] = key(
        ("safetensors",), minItems=1, uniqueItems=True, items={"choices": ("safetensors", "gguf")}
    )
    """safetensors always; gguf adds a llama.cpp file (Llama architectures)."""
    max_shard_size: str = key("2GB", pattern=r"^[0-9]+(\.[0-9]+)?(KB|MB|GB)$")
    """Largest safetensors shard, e.g. 500MB or 5GB."""
    gguf_dtype: str = key("f16", choices=("f16", "f32", "q8_0"))
    """Tensor type of the GGUF file's matrices: f16, f32, or q8_0 (8-bit blocks, what llama.cpp users serve)."""


@dataclass(frozen=True)
class Params:
    """One section per pipeline stage. Every key is optional; the default is used when a key is left out."""

    base: BaseConfig
    data: DataConfig
    tokenize: TokenizeConfig
    quant: QuantConfig
    lora: LoraConfig
    train: TrainConfig
    merge: MergeConfig
    evaluate: EvaluateConfig
    export: ExportConfig


# The section list, in params.yaml (and model card) order, read off Params so it exists once.
SECTION_TYPES: dict[str, type] = {f.name: get_type_hints(Params)[f.name] for f in fields(Params)}
SECTIONS: tuple[str, ...] = tuple(SECTION_TYPES)


def _tuple(value: Any) -> Any:
    """YAML lists become tuples so the frozen dataclasses stay hashable and immutable."""
    return tuple(value) if isinstance(value, list) else value


def _dataset(raw: dict) -> DatasetConfig:
    raw = dict(raw)
    raw["message_property_mappings"] = MessageMapping(**raw["message_property_mappings"])
    raw["roles"] = {k: tuple(v) for k, v in sorted(raw["roles"].items())}
    return DatasetConfig(**raw)


def build_params(filled: dict) -> Params:
    """Typed Params from a dict that passed the schema and has every default filled in."""
    sections = {}
    for name, cls in SECTION_TYPES.items():
        raw = {k: _tuple(v) for k, v in filled[name].items()}
        if name == "data":
            for group in ("datasets", "test_datasets"):
                raw[group] = tuple(_dataset(d) for d in filled["data"][group])
            raw["replay"] = ReplayConfig(**filled["data"]["replay"])
        if name == "train":
            raw["fsdp"] = FsdpConfig(**filled["train"]["fsdp"])
        sections[name] = cls(**raw)
    return Params(**sections)
