#!/usr/bin/env python3
"""Drives a Flywheel server with the official `openai` client, unmodified, and prints a
JSON summary of what came back. Used by tests/http.rs; also handy by hand:

    python3 tests/openai_client.py http://127.0.0.1:8080/v1 smollm2 [api-key]
"""
import json
import sys

import openai
from openai import OpenAI

base_url, model = sys.argv[1], sys.argv[2]
api_key = sys.argv[3] if len(sys.argv) > 3 else "unused"
client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)
out = {"openai_version": openai.__version__}

out["models"] = [m.id for m in client.models.list().data]

# The same greedy chat request, asked whole and then streamed: the two must agree.
hello = dict(
    model=model,
    messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}],
    max_tokens=8,
    temperature=0,
    seed=1,
)
chat = client.chat.completions.create(**hello)
out["chat"] = {
    "content": chat.choices[0].message.content,
    "role": chat.choices[0].message.role,
    "finish_reason": chat.choices[0].finish_reason,
    "usage": chat.usage.model_dump(),
    "object": chat.object,
}

pieces, finish, usage, chunks = [], None, None, 0
stream = client.chat.completions.create(**hello, stream=True, stream_options={"include_usage": True})
for chunk in stream:
    chunks += 1
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
out["chat_stream"] = {"content": "".join(pieces), "finish_reason": finish, "usage": usage, "chunks": chunks}

done = client.completions.create(model=model, prompt="once upon a time", max_tokens=6, temperature=0)
out["completion"] = {
    "text": done.choices[0].text,
    "finish_reason": done.choices[0].finish_reason,
    "usage": done.usage.model_dump(),
}
streamed = client.completions.create(model=model, prompt="once upon a time", max_tokens=6, temperature=0, stream=True)
out["completion_stream"] = {"text": "".join(c.choices[0].text for c in streamed if c.choices)}

stopped = client.completions.create(
    model=model, prompt="once upon a time", max_tokens=6, temperature=0, stop=[done.choices[0].text[2:4] or "zz"]
)
out["completion_stop"] = {"text": stopped.choices[0].text, "finish_reason": stopped.choices[0].finish_reason}

as_json = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Describe a cat as JSON."}],
    max_tokens=40,
    temperature=0.8,
    seed=3,
    response_format={"type": "json_object"},
)
content = as_json.choices[0].message.content
out["json_mode"] = {"content": content, "parsed": json.loads(content)}

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    out["unknown_model"] = "no error"
except openai.NotFoundError as e:
    out["unknown_model"] = {"status": e.status_code, "message": e.message}

try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], temperature=7)
    out["bad_temperature"] = "no error"
except openai.BadRequestError as e:
    out["bad_temperature"] = {"status": e.status_code, "message": e.message}

print(json.dumps(out))
