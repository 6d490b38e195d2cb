"""Drives a model-runtime gateway serving an embedding model with OpenAI's
official Python client, as RAG pipelines call it: `embeddings.create` with
the SDK's default encoding (base64, which it decodes) and with floats, and
a chat request, which the SDK must see refused. Prints what came back as
one JSON object for the cli suite to check.

Environment: BASE_URL (the gateway's root), API_KEY, MODEL.
"""

import json
import math
import os

import openai as sdk
from openai import OpenAI

base = os.environ["BASE_URL"]
client = OpenAI(
    base_url=base + "/v1", api_key=os.environ["API_KEY"], max_retries=0, timeout=120
)
model = os.environ["MODEL"]
texts = ["Hello, world!", "東京は日本の首都です。", "🙂 emoji"]

# The SDK asks for base64 unless told otherwise, and decodes it; the raw
# answer shows the server sent a base64 string.
raw = client.embeddings.with_raw_response.create(model=model, input=texts)
default = raw.parse()
sent = raw.http_response.json()["data"][0]["embedding"]
floats = client.embeddings.create(model=model, input=texts, encoding_format="float")
single = client.embeddings.create(model=model, input=texts[0])
out = {
    "model": default.model,
    "dims": [len(d.embedding) for d in default.data],
    "indices": [d.index for d in default.data],
    "norms": [math.sqrt(sum(x * x for x in d.embedding)) for d in default.data],
    "default": [list(d.embedding) for d in default.data],
    "float": [d.embedding for d in floats.data],
    "single": single.data[0].embedding,
    "prompt_tokens": default.usage.prompt_tokens,
    "sent_base64": isinstance(sent, str),
}
try:
    client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    out["chat"] = {"refused": False}
except sdk.APIStatusError as err:
    out["chat"] = {"refused": True, "status": err.status_code, "message": str(err)}
print(json.dumps(out))
