"""llama.cpp's half of `make gguf-check`, run by the llama-cpp-python venv (.venv-gguf), not the project's.

Reads a JSON request on stdin: {"model": path, "texts": [...], "chats": [[messages], ...], "max_tokens": n,
"out": folder}. For each text: its token ids (no BOS, special tokens parsed, as transformers with
add_special_tokens=False) and the logits at every position (saved as out/logits-<i>.npy). For each chat:
the greedy reply through the GGUF's own chat template and whether it ended on a stop token.
Writes the answer as JSON on stdout. Imports only llama_cpp and numpy.
"""

import json
import sys
from pathlib import Path

import numpy as np
from llama_cpp import Llama

GGML_TYPE_F32 = 0


def main() -> None:
    request = json.load(sys.stdin)
    out = Path(request["out"])
    # KV cache in f32 (llama.cpp's default is f16): the check is about the file, not the cache's rounding
    llm = Llama(model_path=request["model"], n_ctx=1024, logits_all=True, n_threads=2, seed=0, verbose=False,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)  # fmt: skip
    texts = []
    for i, text in enumerate(request["texts"]):
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        np.save(out / f"logits-{i}.npy", np.array(llm.scores[: len(ids)], dtype=np.float32))
        texts.append({"ids": ids})
    chats = []
    for messages in request["chats"]:
        llm.reset()
        reply = llm.create_chat_completion(
            messages=messages, temperature=0.0, top_k=1, max_tokens=request["max_tokens"], seed=0
        )
        choice = reply["choices"][0]
        chats.append({"text": choice["message"]["content"], "stopped": choice["finish_reason"] == "stop"})
    json.dump({"texts": texts, "chats": chats, "metadata": {k: v for k, v in llm.metadata.items()
                                                             if k.startswith(("tokenizer.ggml.pre", "general.file"))}},
              sys.stdout)  # fmt: skip


if __name__ == "__main__":
    main()
