"""Reference vectors for the embeddings suite: transformers' own BERT on the
sentence-transformers directory, mean pooling over the attention mask, then
L2 normalisation (the recipe all-MiniLM-L6-v2 documents).

Usage: python embeddings.py MODEL_DIR < texts.json > reference.json
Each text is run alone (no padding), in float32, without truncation. The
answer is {"vectors": [...], "tokens": [...]}: each text's vector and the
token ids (special tokens included) the model's own tokenizer gives it.
"""

import json
import sys

import torch
from transformers import AutoModel, AutoTokenizer


def main() -> None:
    model_dir = sys.argv[1]
    texts = json.load(sys.stdin)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    vectors = []
    tokens = []
    with torch.no_grad():
        for text in texts:
            encoded = tokenizer(text, return_tensors="pt", truncation=False)
            tokens.append(encoded["input_ids"][0].tolist())
            hidden = model(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
            normalised = torch.nn.functional.normalize(pooled, p=2, dim=1)
            vectors.append(normalised[0].tolist())
    json.dump({"vectors": vectors, "tokens": tokens}, sys.stdout)


if __name__ == "__main__":
    main()
