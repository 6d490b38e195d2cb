"""Writes a Hugging Face safetensors directory from a GGUF, for vLLM.

Run with the vLLM virtual environment's python (it has transformers, torch,
gguf). save_pretrained refuses a GGUF-quantized model, so the state dict is
written with safetensors directly; the embeddings are tied, so lm_head is left
out. Usage: python convert_gguf_to_hf.py GGUF_FILE OUT_DIR
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    gguf_path, out_dir = sys.argv[1], sys.argv[2]
    directory, name = os.path.split(os.path.abspath(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tokenizer.save_pretrained(out_dir)


if __name__ == "__main__":
    main()
