"""Drives a model-runtime gateway with OpenAI's official Python client, the
way agent frameworks and structured-extraction code do, and prints what came
back as one JSON object for the cli suite to check.

Environment: BASE_URL (the gateway's root), API_KEY, MODEL. Any exception (a
refused request, an answer the SDK cannot parse into the pydantic model) ends
the script with a traceback and a non-zero exit.
"""

import json
import os

from openai import OpenAI, pydantic_function_tool
from pydantic import BaseModel


class City(BaseModel):
    city: str
    country: str


class GetWeather(BaseModel):
    """The current weather in a city."""

    city: str


client = OpenAI(
    base_url=os.environ["BASE_URL"] + "/v1",
    api_key=os.environ["API_KEY"],
    max_retries=0,
    timeout=120,
)
model = os.environ["MODEL"]
out = {}

# Structured output: the SDK turns the pydantic model into a strict JSON
# Schema and parses the answer back into it (it raises if it cannot).
parsed = client.chat.completions.parse(
    model=model,
    messages=[{"role": "user", "content": "Where is the Eiffel tower?"}],
    response_format=City,
    max_tokens=64,
    temperature=0,
)
message = parsed.choices[0].message
out["parsed"] = message.parsed.model_dump() if message.parsed else None
out["parsed_finish_reason"] = parsed.choices[0].finish_reason

# A required tool call, its arguments parsed by the SDK into GetWeather.
weather = pydantic_function_tool(GetWeather)
messages = [{"role": "user", "content": "What is the weather in Paris?"}]
first = client.chat.completions.parse(
    model=model,
    messages=messages,
    tools=[weather],
    tool_choice="required",
    max_tokens=64,
    temperature=0,
)
choice = first.choices[0]
call = choice.message.tool_calls[0]
out["call"] = {
    "finish_reason": choice.finish_reason,
    "id": call.id,
    "name": call.function.name,
    "arguments": call.function.parsed_arguments.model_dump(),
}

# The round trip: the assistant's call and the tool's result go back in the
# history, and the model answers in text.
messages.append(
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": call.function.arguments},
            }
        ],
    }
)
messages.append({"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"})
second = client.chat.completions.create(
    model=model,
    messages=messages,
    tools=[weather],
    tool_choice="none",
    max_tokens=48,
    temperature=0,
)
out["reply"] = {
    "finish_reason": second.choices[0].finish_reason,
    "content": second.choices[0].message.content,
    "tool_calls": second.choices[0].message.tool_calls,
}

# Streamed: the SDK's accumulator assembles the call from our deltas and
# parses it; it fails on a fragment that does not continue the arguments.
with client.chat.completions.stream(
    model=model,
    messages=[{"role": "user", "content": "Weather in Rome, please."}],
    tools=[weather],
    tool_choice={"type": "function", "function": {"name": "GetWeather"}},
    max_tokens=64,
    temperature=0,
) as stream:
    deltas = sum(1 for event in stream if event.type == "tool_calls.function.arguments.delta")
    final = stream.get_final_completion()
streamed = final.choices[0]
out["streamed"] = {
    "deltas": deltas,
    "finish_reason": streamed.finish_reason,
    "name": streamed.message.tool_calls[0].function.name,
    "arguments": streamed.message.tool_calls[0].function.parsed_arguments.model_dump(),
}

print(json.dumps(out))
