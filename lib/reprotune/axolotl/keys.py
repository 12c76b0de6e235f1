"""The key map: what becomes of every Axolotl key this importer knows (KEYS), of families of keys (PATTERNS),
and of each dataset entry's keys (DATASET_KEYS). The README's key map is printed from these tables."""

from __future__ import annotations

from reprotune.axolotl import values as v
from reprotune.axolotl.rules import (
    ATTN,
    MAPPED,
    PER_EPOCH,
    PIPELINE_DOES_IT,
    SPEED_ONLY,
    TRANSLATED,
    Rule,
    ignored,
    same,
    unsupported,
)

OBSERVABILITY_ONLY = "metrics export only; the model trained is the same (DVCLive logs the run)"
FUSED_LOSS = "the loss from supervised positions, head in chunks: no [tokens x vocabulary] logits"
# true switches it on (reprotune's default); false leaves the default: no loss plugin, the same model either way
FUSED_LOSS_RULE = Rule(MAPPED, "train.chunked_cross_entropy", FUSED_LOSS, v.flag("train.chunked_cross_entropy", True))
WITH_WANDB = "when W&B is on (wandb_project set), as in Axolotl"
WITH_MLFLOW = "when MLflow is on (mlflow_experiment_name set), as in Axolotl"
# intervals Axolotl tests for truth: 0 is unset there
ZERO_IS_UNSET = ("eval_steps", "save_steps", "evals_per_epoch", "saves_per_epoch")

KEYS: dict[str, Rule] = {
    # base
    "base_model": Rule(MAPPED, "base.model", "hub ids get base.revision: main (pin it to a commit)", v.base_model),
    "revision_of_model": same("base.revision"),
    "trust_remote_code": same("base.trust_remote_code"),
    "base_model_config": ignored("the base model's own config.json is used"),
    "model_type": ignored("read from the base model's config"),
    "tokenizer_type": ignored("the base model's fast tokenizer is used (AutoTokenizer)"),
    "tokenizer_config": unsupported("a tokenizer from another folder; nearest: put it in the base model folder"),
    # data
    "datasets": Rule(MAPPED, "data.datasets", "each entry's keys are listed as datasets[i].key"),
    "test_datasets": Rule(MAPPED, "data.test_datasets", "each entry's keys are listed as test_datasets[i].key"),
    "val_set_size": same("tokenize.val_set_size"),
    "dataset_prepared_path": ignored(f"{PIPELINE_DOES_IT}: data/validated and data/packed, cached by DVC"),
    "push_dataset_to_hub": ignored("the prepared data lives in DVC's cache (dvc push to share it)"),
    "dataset_processes": same("tokenize.num_proc"),
    "dataset_num_proc": same("tokenize.num_proc"),
    "shuffle_merged_datasets": ignored("records keep file order; the split and training order are seeded"),
    "dataset_exact_deduplication": same("data.dedup", "exact duplicates after normalisation (reprotune's default: on)"),
    "chat_template": Rule(
        MAPPED,
        "base.chat_template",
        "every named template of Axolotl 0.19 (36), tokenizer_default, tokenizer_default_fallback_<name>",
        v.chat_template,
    ),
    "chat_template_jinja": Rule(
        MAPPED, "base.chat_template_jinja", "with base.chat_template: jinja", v.chat_template_jinja
    ),
    "default_system_message": unsupported("not available yet; nearest: a system message in the data"),
    "special_tokens": Rule(
        MAPPED,
        "base.special_tokens",
        "a token not in the vocabulary is added (embeddings grow; the adapter saves the new rows)",
        v.special_tokens,
    ),
    "tokens": same("base.tokens", "added to the vocabulary (embeddings grow; the adapter saves the new rows)"),
    "added_tokens_overrides": unsupported(
        "renaming the base's own added tokens is not available; nearest: base.tokens"
    ),
    "eot_tokens": ignored("the token that closes each turn in the chat template is found and trained by itself"),
    "sequence_len": same("tokenize.sequence_len"),
    "sample_packing": same("tokenize.sample_packing"),
    "eval_sample_packing": ignored("validation rows are packed like training rows"),
    "pad_to_sequence_len": ignored(SPEED_ONLY),
    "train_on_inputs": same("tokenize.train_on_inputs"),
    "excess_length_strategy": Rule(TRANSLATED, "tokenize.excess_length", "raise -> error", v.excess),
    # quantization and adapter
    "adapter": Rule(TRANSLATED, "quant.load_in_4bit", "qlora: 4-bit base; lora: 16/32-bit base", v.adapter),
    "load_in_4bit": Rule(MAPPED, "quant.load_in_4bit", "read with adapter when set", v.load_in_4bit),
    "load_in_8bit": unsupported("an 8-bit base is not available; nearest: adapter qlora (4-bit) or lora (16-bit)"),
    "bnb_config_kwargs": Rule(
        MAPPED, "quant.bnb_4bit_*", "bnb_4bit_* entries to the same names under quant", v.bnb_config
    ),
    "lora_r": same("lora.r"),
    "lora_alpha": same("lora.alpha"),
    "lora_dropout": same("lora.dropout"),
    "lora_target_linear": same("lora.target_linear"),
    "lora_target_modules": Rule(
        MAPPED, "lora.target_modules", "with lora_target_linear: true, the linear layers cover them", v.target_modules
    ),
    "lora_modules_to_save": same("lora.modules_to_save"),
    "peft_use_rslora": same("lora.use_rslora"),
    "peft_use_dora": same("lora.use_dora"),
    "lora_model_dir": unsupported("starting from an existing adapter is not available; the train stage resumes"),
    "lora_mlp_kernel": ignored(SPEED_ONLY),
    "lora_qkv_kernel": ignored(SPEED_ONLY),
    "lora_o_kernel": ignored(SPEED_ONLY),
    # training
    "micro_batch_size": same("train.micro_batch_size"),
    "batch_size": Rule(
        TRANSLATED,
        "train.gradient_accumulation_steps",
        "batch_size // micro_batch_size, as Axolotl derives it (when gradient_accumulation_steps is unset)",
        v.batch_size,
    ),
    "eval_batch_size": same("train.eval_batch_size"),
    "gradient_accumulation_steps": same("train.gradient_accumulation_steps"),
    "num_epochs": same("train.num_epochs"),
    "max_steps": same("train.max_steps"),
    "learning_rate": same("train.learning_rate"),
    "lr_scheduler": Rule(
        TRANSLATED,
        "train.lr_scheduler",
        "cosine, linear, constant, constant_with_warmup, polynomial; cosine_with_min_lr -> cosine with "
        "train.cosine_min_lr_ratio (lr_scheduler_kwargs.min_lr_rate)",
        v.scheduler,
    ),
    "lr_scheduler_kwargs": Rule(
        TRANSLATED, "", "min_lr_rate, with lr_scheduler cosine_with_min_lr", v.scheduler_kwargs
    ),
    "cosine_min_lr_ratio": same("train.cosine_min_lr_ratio", "cosine decays to this fraction of the peak"),
    "cosine_constant_lr_ratio": unsupported(
        "a constant phase inside cosine is not available; nearest: cosine_min_lr_ratio"
    ),
    "warmup_ratio": same("train.warmup_ratio"),
    "warmup_steps": same("train.warmup_steps"),
    "weight_decay": same("train.weight_decay"),
    "max_grad_norm": same("train.max_grad_norm"),
    "optimizer": Rule(
        TRANSLATED,
        "train.optimizer",
        "the Trainer's AdamW variants; adamw_8bit -> adamw_bnb_8bit, ao_adamw_8bit/4bit -> adamw_torch_8bit/4bit",
        v.optimizer,
    ),
    "adam_beta1": same("train.adam_beta1"),
    "adam_beta2": same("train.adam_beta2"),
    "adam_epsilon": same("train.adam_epsilon"),
    "optim_args": unsupported("optimizer arguments beyond adam_beta1/adam_beta2/adam_epsilon are not available"),
    "optim_target_modules": unsupported("GaLore-style optimizer targets are not available; LoRA adapters train"),
    "lr_groups": unsupported("per-module learning rates are not available"),
    "embedding_lr": unsupported("a separate embedding learning rate is not available"),
    "embedding_lr_scale": unsupported("a separate embedding learning rate is not available"),
    "seed": Rule(TRANSLATED, "train.seed, tokenize.seed", "one seed for the split and training", v.seed),
    "bf16": Rule(TRANSLATED, "train.bf16", "full -> true", v.bf16),
    "fp16": same("train.fp16"),
    "tf32": ignored(SPEED_ONLY),
    "flash_attention": Rule(
        TRANSLATED,
        ATTN,
        "true -> flash_attention_2",
        v.flag(ATTN, "flash_attention_2"),
    ),
    "sdp_attention": Rule(TRANSLATED, ATTN, "true -> sdpa", v.flag(ATTN, "sdpa")),
    "xformers_attention": Rule(TRANSLATED, ATTN, "true -> sdpa (same model)", v.flag(ATTN, "sdpa")),
    "flex_attention": Rule(TRANSLATED, ATTN, "true -> sdpa (same model)", v.flag(ATTN, "sdpa")),
    "sage_attention": unsupported("SageAttention quantizes attention, which changes the training; nearest: sdpa"),
    "eager_attention": Rule(TRANSLATED, ATTN, "true -> eager", v.flag(ATTN, "eager")),
    "low_cpu_mem_usage": ignored(f"models load with low memory already; {SPEED_ONLY}"),
    "use_kernels": ignored(f"kernels from the hub's kernel repositories: {SPEED_ONLY}"),
    "fused_attn_kernel": ignored(SPEED_ONLY),
    "gemma4_hybrid_attn_impl": ignored(f"flash attention on Gemma 4's sliding-window layers: {SPEED_ONLY}"),
    "resize_token_embeddings_to_32x": ignored(f"padding the vocabulary for tensor cores: {SPEED_ONLY}"),
    "scaling_softmax": unsupported("scaled-softmax (SSMax) attention changes the model; nearest: leave it off"),
    "is_llama_derived_model": ignored("read from the base model's config"),
    "is_mistral_derived_model": ignored("read from the base model's config"),
    "is_falcon_derived_model": ignored("read from the base model's config"),
    "is_qwen_derived_model": ignored("read from the base model's config"),
    "eval_max_new_tokens": ignored("Axolotl's in-training generation metrics; the evaluate stage has its own"),
    "eval_table_size": ignored("Axolotl's in-training sample table; metrics/samples.jsonl holds the evaluate stage's"),
    "eval_table_max_new_tokens": ignored("Axolotl's in-training sample table; see evaluate.max_new_tokens"),
    "save_strategy": Rule(
        TRANSLATED, "train.saves_per_epoch", "steps: as set; epoch -> saves_per_epoch 1", v.save_strategy
    ),
    "use_otel_metrics": ignored(OBSERVABILITY_ONLY),
    "otel_metrics_host": ignored(OBSERVABILITY_ONLY),
    "otel_metrics_port": ignored(OBSERVABILITY_ONLY),
    "attn_implementation": Rule(MAPPED, ATTN, "flex_attention, xformers -> sdpa (same model)", v.attention),
    "gradient_checkpointing": Rule(
        MAPPED, "train.gradient_checkpointing", "unsloth/offload -> true", v.gradient_checkpointing
    ),
    "gradient_checkpointing_kwargs": ignored(SPEED_ONLY),
    "activation_offloading": ignored(SPEED_ONLY),
    "torch_compile": ignored(SPEED_ONLY),
    "torch_compile_backend": ignored(SPEED_ONLY),
    "plugins": ignored(
        "the loss plugins' effect is train.chunked_cross_entropy (their keys map onto it); other kernels: " + SPEED_ONLY
    ),
    "cut_cross_entropy": FUSED_LOSS_RULE,
    "liger_fused_linear_cross_entropy": FUSED_LOSS_RULE,
    "chunked_cross_entropy": FUSED_LOSS_RULE,
    "chunked_cross_entropy_num_chunks": ignored("chunks are sized by memory (128 MiB of logits each)"),
    "eval_steps": Rule(MAPPED, "train.eval_steps", "", v.instead_of("train.eval_steps", "train.evals_per_epoch")),
    "save_steps": Rule(MAPPED, "train.save_steps", "", v.instead_of("train.save_steps", "train.saves_per_epoch")),
    "evals_per_epoch": Rule(
        TRANSLATED,
        "train.evals_per_epoch",
        PER_EPOCH,
        v.instead_of("train.evals_per_epoch", "train.eval_steps"),
    ),
    "saves_per_epoch": Rule(
        TRANSLATED,
        "train.saves_per_epoch",
        PER_EPOCH,
        v.instead_of("train.saves_per_epoch", "train.save_steps"),
    ),
    "logging_steps": same("train.logging_steps"),
    "loss_watchdog_threshold": same("train.loss_watchdog_threshold"),
    "loss_watchdog_patience": same("train.loss_watchdog_patience"),
    "early_stopping_patience": same(
        "train.early_stopping_patience", "evaluations without a lower validation loss; the best adapter is kept"
    ),
    "save_total_limit": ignored("the train stage keeps the last two checkpoints"),
    "save_safetensors": ignored("safetensors only, always"),
    "output_dir": ignored(f"{PIPELINE_DOES_IT}: fixed folders under models/"),
    "resume_from_checkpoint": ignored(f"{PIPELINE_DOES_IT}: the train stage resumes from its last checkpoint"),
    "auto_resume_from_checkpoints": ignored(f"{PIPELINE_DOES_IT}: the train stage resumes by itself"),
    "strict": ignored("params are always checked strictly (reprotune check)"),
    "debug": ignored("logging only"),
    "logging_first_step": ignored("logging only"),
    "save_first_step": ignored("checkpointing only"),
    "dataloader_num_workers": ignored(SPEED_ONLY),
    "dataloader_pin_memory": ignored(SPEED_ONLY),
    "dataloader_prefetch_factor": ignored(SPEED_ONLY),
    "group_by_length": ignored("rows are packed, which makes this moot"),
    "ddp_find_unused_parameters": ignored("set by the train stage"),
    # experiment trackers: train.report_to beside DVCLive, as Axolotl switches them on
    "use_tensorboard": Rule(MAPPED, "train.report_to", "tensorboard (the `tensorboard` extra)", v.tracker_switch),
    "use_wandb": Rule(MAPPED, "train.report_to", "wandb (the `wandb` extra)", v.tracker_switch),
    "use_mlflow": Rule(MAPPED, "train.report_to", "mlflow (the `mlflow` extra)", v.tracker_switch),
    "wandb_project": Rule(
        MAPPED,
        "train.wandb_project",
        "and wandb in train.report_to (the `wandb` extra)",
        v.tracker_key("wandb", "train.wandb_project"),
    ),
    "wandb_entity": Rule(MAPPED, "train.wandb_entity", WITH_WANDB, v.tracker_key("wandb", "train.wandb_entity")),
    "wandb_name": Rule(MAPPED, "train.wandb_name", WITH_WANDB, v.tracker_key("wandb", "train.wandb_name")),
    "wandb_mode": Rule(MAPPED, "train.wandb_mode", WITH_WANDB, v.tracker_key("wandb", "train.wandb_mode")),
    "wandb_run_id": Rule(
        TRANSLATED, "train.wandb_name", "the run's name when wandb_name is unset, as Axolotl does", v.wandb_run_id
    ),
    "wandb_watch": ignored(f"{OBSERVABILITY_ONLY}; W&B gradient watching is not wired in"),
    "wandb_log_model": ignored(f"{OBSERVABILITY_ONLY}; the adapter is in models/adapter (dvc push shares it)"),
    "mlflow_tracking_uri": Rule(
        MAPPED, "train.mlflow_tracking_uri", WITH_MLFLOW, v.tracker_key("mlflow", "train.mlflow_tracking_uri")
    ),
    "mlflow_experiment_name": Rule(
        MAPPED,
        "train.mlflow_experiment_name",
        "and mlflow in train.report_to (the `mlflow` extra)",
        v.tracker_key("mlflow", "train.mlflow_experiment_name"),
    ),
    "mlflow_run_name": Rule(
        MAPPED, "train.mlflow_run_name", f"{WITH_MLFLOW}; wandb_name names the run when W&B is on", v.mlflow_run_name
    ),
    "hf_mlflow_log_artifacts": ignored(f"{OBSERVABILITY_ONLY}; checkpoints are not uploaded to MLflow"),
    "merge_lora": ignored(f"{PIPELINE_DOES_IT}: the merge stage"),
    "hub_model_id": unsupported("pushing to a hub is not done by the pipeline; upload models/export yourself"),
    "hub_strategy": unsupported("pushing to a hub is not done by the pipeline; upload models/export yourself"),
    # training kinds this project does not do
    "rl": unsupported("preference / RL training (DPO, ORPO, KTO, GRPO) is not available; reprotune does SFT"),
    "reward_model": unsupported("reward-model training is not available; reprotune does SFT"),
    "process_reward_model": unsupported("reward-model training is not available; reprotune does SFT"),
    "deepspeed": unsupported(
        "DeepSpeed is not used; nearest: FSDP (fsdp_config: the base sharded across GPUs, ZeRO-3's role) or DDP"
    ),
    "fsdp": Rule(
        MAPPED,
        "train.distributed: fsdp",
        "full_shard, auto_wrap; offload and shard_grad_op set train.fsdp",
        v.fsdp_switch,
    ),
    "fsdp_config": Rule(MAPPED, "train.fsdp", "each key is listed as fsdp_config.key"),
    "fsdp_version": Rule(MAPPED, "train.fsdp.version", "2; 1 runs as FSDP2 (same sharding)", v.fsdp_version),
    "unfrozen_parameters": unsupported("full fine-tuning of chosen layers is not available; nearest: LoRA"),
    "processor_type": unsupported("vision and audio models are not available; text-only SFT"),
    "image_size": unsupported("vision models are not available; text-only SFT"),
    "image_resize_algorithm": unsupported("vision models are not available; text-only SFT"),
    "skip_prepare_dataset": unsupported("vision and audio datasets are not available; text-only SFT"),
    "remove_unused_columns": ignored("set by the train stage"),
    "lora_target_parameters": unsupported("LoRA on MoE expert parameters is not available yet"),
}
# The keys of an fsdp_config mapping, without Axolotl's optional fsdp_ prefix (both spellings are read).
FSDP1_ONLY = "an FSDP1 knob; FSDP2 (what runs) has no such setting"
FSDP_KEYS: dict[str, Rule] = {
    "version": Rule(MAPPED, "train.fsdp.version", "2; 1 runs as FSDP2 (same sharding)", v.fsdp_version),
    "auto_wrap_policy": Rule(MAPPED, "train.fsdp.auto_wrap_policy", "TRANSFORMER_BASED_WRAP", v.fsdp_wrap_policy),
    "transformer_layer_cls_to_wrap": Rule(
        MAPPED, "train.fsdp.transformer_layer_cls_to_wrap", "one class name", v.fsdp_layer_class
    ),
    "reshard_after_forward": Rule(MAPPED, "train.fsdp.reshard_after_forward", "", v.fsdp_flag("reshard_after_forward")),
    "offload_params": Rule(MAPPED, "train.fsdp.offload_params", "", v.fsdp_flag("offload_params")),
    "cpu_ram_efficient_loading": Rule(
        MAPPED, "train.fsdp.cpu_ram_efficient_loading", "", v.fsdp_flag("cpu_ram_efficient_loading")
    ),
    "state_dict_type": Rule(MAPPED, "train.fsdp.state_dict_type", "FULL or SHARDED", v.fsdp_state_dict),
    "activation_checkpointing": Rule(
        MAPPED,
        "train.fsdp.activation_checkpointing",
        "true turns train.gradient_checkpointing off: FSDP recomputes instead (the Trainer takes one of the two)",
        v.fsdp_flag("activation_checkpointing"),
    ),
    "sharding_strategy": Rule(
        TRANSLATED, "train.fsdp.reshard_after_forward", "FULL_SHARD -> true, SHARD_GRAD_OP -> false", v.fsdp_strategy
    ),
    "use_orig_params": ignored(FSDP1_ONLY),
    "sync_module_states": ignored(f"{FSDP1_ONLY}: every process loads or receives the same weights"),
    "limit_all_gathers": ignored(FSDP1_ONLY),
    "backward_prefetch": ignored(SPEED_ONLY),
    "forward_prefetch": ignored(SPEED_ONLY),
}
# Families of keys, matched when the key itself is not in KEYS.
PATTERNS: list[tuple[str, Rule]] = [
    (r"^(wandb|mlflow)_", ignored(OBSERVABILITY_ONLY)),
    (
        r"^(use_)?(comet|swanlab|trackio)",
        ignored("not wired in: DVCLive logs the run; train.report_to takes wandb, mlflow, tensorboard"),
    ),
    (r"^liger_", ignored(SPEED_ONLY)),
    (r"^(use_)?cut_cross_entropy", ignored(SPEED_ONLY)),
    (r"^flash_attn_", ignored(SPEED_ONLY)),
    (r"^(dpo|orpo|kto|simpo|grpo|trl|ipo|cpo)_", unsupported("preference / RL training is not available; SFT only")),
    (r"^(moe|expert)_|_moe_|^output_router_logits$", unsupported("MoE-specific options are not available yet")),
    (r"^(vision|audio|image)_", unsupported("vision and audio models are not available; text-only SFT")),
]
DATASET_KEYS: dict[str, Rule] = {
    "path": same("path"),
    "type": Rule(MAPPED, "type", "alpaca, chat_template, completion; alpaca_w_system.load_instruct -> alpaca"),
    "split": same("split"),
    "field_messages": same("field_messages"),
    "message_property_mappings": same("message_property_mappings"),
    "message_field_role": Rule(MAPPED, "message_property_mappings.role", "the older spelling"),
    "message_field_content": Rule(MAPPED, "message_property_mappings.content", "the older spelling"),
    "roles": same("roles"),
    "drop_system_message": same("drop_system_message"),
    "field_instruction": same("field_instruction"),
    "field_input": same("field_input"),
    "field_output": same("field_output"),
    "field_system": same("field_system"),
    "field": Rule(MAPPED, "field_text", "completion: the text field"),
    "roles_to_train": same("roles_to_train", "this dataset's; unset: tokenize.roles_to_train (assistant)"),
    "train_on_eos": same("train_on_eos", "this dataset's; unset: tokenize.train_on_eos (turn)"),
    "ds_type": same("ds_type", "json, parquet, csv, text, arrow; local files (the hub says its own)"),
    "chat_template": Rule(TRANSLATED, "", "tokenizer_default only: one template for all", v.dataset_chat_template),
    "data_files": Rule(MAPPED, "data_files", "files under a folder path or in the hub repository", v.data_files),
    "name": same("name", "the hub dataset's configuration"),
    "shards": same("shards", "cut as Axolotl cuts them: shuffled with tokenize.seed, then Dataset.shard"),
    "shards_idx": same("shards_idx"),
    "weight": same("weight", "training copies per record, drawn after the split (not in Axolotl itself)"),
}
DATASET_TYPES = {
    "alpaca": "alpaca",
    "alpaca_w_system.load_instruct": "alpaca",
    "chat_template": "chat_template",
    "completion": "completion",
}
