"""Export: the deployable folder models/export/, checkable by anyone who receives it.

Modules (import the one you need; this package file imports nothing):
- bundle.py    `build_export`: the merged safetensors shards (+ index), tokenizer, generation config,
               optional GGUF, the model card and the manifest, into one folder.
- card.py      README.md model card: base model and its pinned revision, data files with their
               SHA-256, the params that produced it (as YAML), metrics, the reprotune version.
               Scrubbed of secrets (HF tokens, secret-named environment values) and absolute paths.
- manifest.py  manifest.json (SHA-256 of every file) and `verify_manifest`.
- gguf.py      a llama.cpp GGUF file (f32/f16/q8_0) for Llama-architecture models, written with the `gguf`
               package: llama.cpp tensor names, rotary Q/K permutation, hyperparameters, BPE tokenizer,
               chat template and stop tokens; the pre-tokenizer name from reprotune.llama_cpp.
- modelfile.py Ollama's Modelfile: FROM the GGUF, TEMPLATE (ChatML), SYSTEM, stop parameters.
               Tensors stream from the merged shards through reprotune.tensors.

Trade-offs: GGUF is written directly (no llama.cpp checkout or converter script), so only the
Llama layout and byte-level BPE tokenizers are covered; other architectures are refused with a
message pointing to llama.cpp's convert_hf_to_gguf.py. Of the quantized types only q8_0 is written
(the gguf package quantizes it exactly as ggml does); for 4-bit k-quants run llama.cpp's
llama-quantize on the f16 file. `make gguf-check` loads the files with llama.cpp itself.
"""
