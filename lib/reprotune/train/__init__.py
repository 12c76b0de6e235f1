"""The `train` stage: a LoRA adapter on a 4-bit (QLoRA) or full-precision base, with the HF Trainer.

Features
- Model (model.py): bitsandbytes NF4/FP4 with double quantization, compute dtype and attention from
  hardware.resolve (bf16 + flash-attn varlen on Ampere+ GPUs, fp32 + sdpa on CPU), then peft LoRA on
  every Linear but the output head (or on checked `target_modules`), rsLoRA, DoRA, modules_to_save.
- Batches (batches.py): padding-free packing. A micro-batch's bins become one (1, tokens) row whose
  position_ids restart per sequence and which has no attention mask; the sequences stay apart
  (flash-attn varlen on GPUs, sdpa run per sequence otherwise: attention.py), proven by a test
  that scores each sequence alone and packed. Unpacked data gets padded batches with masks.
- Optimisation (run.py): AdamW by the Trainer's names (torch, fused torch, bitsandbytes 8-bit and
  paged, torchao 8/4-bit when the lowbit extra is installed) with its betas and epsilon;
  cosine (with an optional floor), linear, constant and polynomial schedules with warmup by ratio or
  steps; accumulation, clipping, bf16/fp16 from the hardware, periodic validation loss, early
  stopping on it (the best evaluation's adapter kept), gradient checkpointing (non-reentrant).
- Loss (loss.py, train.chunked_cross_entropy): from the final hidden states of supervised positions only,
  projected through the output head a chunk at a time; no [tokens x vocabulary] logits, no head work at
  prompt positions; equal to the full-logits loss up to float rounding. Measured (benchmarks/bench_loss.py,
  2-core CPU, rows 10% supervised): 1.07x the supervised tokens/s on the built-in model (vocabulary 4,096),
  1.65x on a 20M Llama with 32,000; one 2,048-token step with a 128,256-token vocabulary peaks at 1.38 GiB
  against 4.02 GiB. On SmolLM2-135M (bench_smollm2.py) 1.29x, 1.72x with the preset's lora.dropout 0.
- Guards (trainer.py, callbacks.py): a loss watchdog and a non-finite-loss check raise
  TrainingStopped; the stage exits 1 with its message. Both agree across DDP processes.
- Resume (checkpoints.py): see below.
- Outputs: models/adapter/ (adapter, tokenizer, training_config.json with the params read and
  the resolved hardware) written atomically; metrics/train.json (final train/eval loss, token
  counts, steps, dtype, attention) and metrics/runtime/train.json (seconds, supervised tokens/s,
  peak memory, device: not locked); per-step curves under dvclive/. CPU runs are bit-for-bit
  repeatable.
- Trackers (trackers.py): train.report_to adds W&B, MLflow and TensorBoard beside DVCLive through
  the Trainer's callbacks; names from params, credentials from the environment only.
- Launch (launch.py): in-process, or `accelerate launch` with one process per GPU, on one machine or several
  (train.num_machines, machine_rank, main_process_ip/port).
- Sharing the model (sharding.py, train.distributed): DDP, or FSDP2 sharding the base (accelerate's plugin
  on CUDA, QLoRA included; transformers' load-time sharding on CPU); metrics record what ran
  (`distributed`, `local_parameter_share`).
- Measured by benchmarks/bench_train.py (`make bench`; figures from a 2-core CPU in the README):
  the supervised tokens/s of padding-free packing against padded batches holding the same
  sequences, and the training memory of QLoRA against bf16 LoRA on a 290M Llama.
  benchmarks/gpu_check.py runs the same core on a GPU.

Resume: why checkpoints live outside DVC
checkpoints/train/ is git-ignored and deliberately not a DVC output. DVC deletes a stage's outputs
before running it, so a checkpoint declared as an output would be gone exactly when a rerun needs
it; `persist: true` would keep it but switches the run cache off for the stage. Outside DVC,
checkpoints survive a crash and the stage keeps its run cache. What DVC no longer guarantees, the
stage does itself: a checkpoint is used only if a marker written atomically after the Trainer
saved it exists and carries this run's fingerprint (params read, data/packed, base config and
provenance, process count, resolved hardware); every other checkpoint folder is deleted on start,
and all of them once the adapter is written. Resumed runs restore the optimizer, scheduler, RNG
states, data position, token counters and log history, so on CPU a killed and resumed run ends
with the same adapter and loss curve as an uninterrupted one.

Trade-offs
- Padding-free rows need attention that honours restarted position_ids. flash-attn varlen and the
  per-sequence sdpa cost sum(len^2); `attn_implementation: eager` builds a dense (tokens x tokens)
  block mask, O(tokens^2). Per-sequence sdpa loops in Python over a row's sequences per layer.
- The loss check costs one host sync per micro-batch (the Trainer's own NaN filter already did).
- Resume is exact only when train.save_steps is a multiple of train.logging_steps (else the first
  logged loss after a resume averages fewer steps); the stage warns when it is not.
- GPU runs repeat only up to kernel nondeterminism (atomics in flash-attn and cuBLAS backward).
- FSDP on CPU shards a full-precision base only (bitsandbytes shards 4-bit weights on CUDA only) and trains
  LoRA on the linear layers only (lora.modules_to_save would need a copy of a sharded module); both are
  refused with exit 2. QLoRA + FSDP runs through accelerate on CUDA only, checked by `make gpu-check`.
"""
