"""Drives a model-runtime gateway through the other protocols clients
speak, with their official Python clients: OpenAI's Responses API (as agent
frameworks call it: plain, streamed through the SDK's accumulator, parsed
into a pydantic model, continued by previous_response_id) and Anthropic's
Messages API (as coding agents call it: plain, streamed through the SDK's
accumulator, count_tokens, a tool call and its result, a wrong key), and the
legacy completions API (a raw prompt, plain and streamed). Prints
what came back as one JSON object for the cli suite to check.

Environment: BASE_URL (the gateway's root), API_KEY, MODEL. Any exception
the SDKs raise (a refused request, an event they cannot accumulate) ends the
script with a traceback and a non-zero exit.
"""

import json
import os

import anthropic
from openai import OpenAI
from pydantic import BaseModel


class City(BaseModel):
    city: str
    country: str


base = os.environ["BASE_URL"]
key = os.environ["API_KEY"]
model = os.environ["MODEL"]
openai = OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)
claude = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0, timeout=120)
out = {}

QUESTION = "What is the capital of France?"
asked = dict(
    model=model,
    instructions="You are a helpful assistant.",
    input=QUESTION,
    # Room for the whole answer: the SDK's stream gives a final response
    # only for `response.completed`, not for one cut off (`incomplete`).
    max_output_tokens=64,
    temperature=0,
)

# Responses: plain, then streamed through the SDK's accumulator.
plain = openai.responses.create(**asked)
out["responses_plain"] = {
    "text": plain.output_text,
    "status": plain.status,
    "input_tokens": plain.usage.input_tokens,
}
with openai.responses.stream(**asked) as stream:
    deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
    final = stream.get_final_response()
out["responses_stream"] = {"deltas": "".join(deltas), "text": final.output_text}

# Structured output parsed by the SDK into the pydantic model.
parsed = openai.responses.parse(
    model=model,
    input="Where is the Eiffel tower?",
    text_format=City,
    max_output_tokens=64,
    temperature=0,
)
out["responses_parsed"] = parsed.output_parsed.model_dump()

# A stored response, continued.
first = openai.responses.create(**asked, store=True)
second = openai.responses.create(
    model=model,
    previous_response_id=first.id,
    input="And of Germany?",
    max_output_tokens=8,
    temperature=0,
)
out["responses_continued"] = {
    "first_input": first.usage.input_tokens,
    "first_output": first.usage.output_tokens,
    "second_input": second.usage.input_tokens,
}

# The legacy completions API: a raw prompt continued, plain and streamed.
counting = dict(model=model, prompt="1, 2, 3, 4, 5, 6,", max_tokens=8, temperature=0)
completion = openai.completions.create(**counting)
chunks = openai.completions.create(**counting, stream=True)
out["completions"] = {
    "text": completion.choices[0].text,
    "streamed": "".join(chunk.choices[0].text for chunk in chunks if chunk.choices),
}

# Messages: plain, streamed through the SDK's accumulator, counted. This SDK
# no longer offers `temperature` (Anthropic's newest models fix it), so the
# greedy setting older clients send goes as an extra field.
greedy = {"temperature": 0}
conversation = dict(
    model=model,
    system="Answer briefly.",
    messages=[{"role": "user", "content": QUESTION}],
)
message = claude.messages.create(**conversation, max_tokens=24, extra_body=greedy)
out["messages_plain"] = {
    "text": message.content[0].text,
    "stop_reason": message.stop_reason,
    "input_tokens": message.usage.input_tokens,
    "output_tokens": message.usage.output_tokens,
}
with claude.messages.stream(**conversation, max_tokens=24, extra_body=greedy) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
out["messages_stream"] = {
    "text": text,
    "final": final.content[0].text,
    "output_tokens": final.usage.output_tokens,
}
out["count_tokens"] = claude.messages.count_tokens(**conversation).input_tokens

# A required tool call, and its result sent back as the SDK's docs show.
tool = {
    "name": "get_weather",
    "description": "The current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
asking = [{"role": "user", "content": "What is the weather in Paris?"}]
called = claude.messages.create(
    model=model,
    max_tokens=64,
    extra_body=greedy,
    tools=[tool],
    tool_choice={"type": "any"},
    messages=asking,
)
use = next(block for block in called.content if block.type == "tool_use")
reply = claude.messages.create(
    model=model,
    max_tokens=24,
    extra_body=greedy,
    tools=[tool],
    tool_choice={"type": "none"},
    messages=asking
    + [
        {"role": "assistant", "content": called.content},
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": use.id,
                    "content": "It is 18 degrees Celsius and sunny.",
                }
            ],
        },
    ],
)
out["tool_use"] = {
    "stop_reason": called.stop_reason,
    "name": use.name,
    "input": use.input,
    "reply": reply.content[0].text,
}

# A wrong key: the SDK's own error class, from Anthropic's error shape.
try:
    anthropic.Anthropic(base_url=base, api_key="wrong", max_retries=0).messages.create(
        **conversation, max_tokens=4
    )
    out["wrong_key"] = "accepted"
except anthropic.AuthenticationError as err:
    out["wrong_key"] = err.body

print(json.dumps(out))
