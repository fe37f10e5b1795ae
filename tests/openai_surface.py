#!/usr/bin/env python3
"""Walks every request field the official `openai` client defines for chat and text
completions and checks that the server honours it (its effect is visible) or refuses it
with a 400 naming it: never that it is dropped. Prints a JSON report; exits 1 on any
failure. Used by tests/http.rs; by hand:

    python3 tests/openai_surface.py http://127.0.0.1:8080/v1 smollm2

A field the installed client knows but this table does not fails the walk: a new field
must be classified before it can be forgotten.
"""
import json
import math
import sys
import typing

import jsonschema
import openai
from openai import OpenAI
from openai.types import completion_create_params as completion_types
from openai.types import embedding_create_params as embedding_types
from openai.types.chat import completion_create_params as chat_types

base_url, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
failures = []
checked = {"chat": {}, "completions": {}}
PROMPT = "once upon a time"
MESSAGES = [{"role": "user", "content": PROMPT}]


def call(endpoint, **kw):
    """One request; returns (text, response). Greedy, 16 tokens, no early end by default."""
    kw.setdefault("model", model)
    if "max_completion_tokens" not in kw:
        kw.setdefault("max_tokens", 16)
    kw.setdefault("temperature", 0)
    extra = kw.pop("extra_body", {})
    extra.setdefault("ignore_eos", True)
    if endpoint == "chat":
        kw.setdefault("messages", MESSAGES)
        r = client.chat.completions.create(**kw, extra_body=extra)
    else:
        kw.setdefault("prompt", PROMPT)
        r = client.completions.create(**kw, extra_body=extra)
    if kw.get("stream"):
        chunks = list(r)
        text = "".join(
            (c.choices[0].delta.content or "") if endpoint == "chat" else c.choices[0].text
            for c in chunks
            if c.choices
        )
        return text, chunks
    choice = r.choices[0]
    return (choice.message.content if endpoint == "chat" else choice.text), r


def refused(endpoint, field, value, **kw):
    """The field with this value must be refused with 400 naming it, streaming or not."""
    for stream in (False, True):
        args = dict(kw)
        if stream:
            args["stream"] = True
        if field in ("top_k", "min_p", "repeat_penalty", "repetition_penalty", "ignore_eos", "foo"):
            args["extra_body"] = {field: value}
        else:
            args[field] = value
        try:
            call(endpoint, **args)
        except openai.BadRequestError as e:
            if e.param != field:
                raise AssertionError(f"{field}={value!r} was refused naming {e.param!r}: {e.message}")
            continue
        raise AssertionError(f"{field}={value!r} (stream={stream}) was accepted, but it is not supported")


def expect(condition, message):
    if not condition:
        raise AssertionError(message)


def greedy(endpoint, **kw):
    return call(endpoint, **kw)[0]


# ---- checks shared by both endpoints -------------------------------------------------------


def check_model(ep):
    greedy(ep)
    try:
        call(ep, model="no-such-model")
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        expect(e.param == "model", f"unknown model named {e.param!r}")


def check_max_tokens(ep, field="max_tokens"):
    _, r = call(ep, **{field: 3})
    expect(r.usage.completion_tokens == 3, f"{field}=3 gave {r.usage.completion_tokens} tokens")
    expect(r.choices[0].finish_reason == "length", "finish_reason is not length")
    refused(ep, field, -1)


def check_max_completion_tokens(ep):
    check_max_tokens(ep, "max_completion_tokens")
    _, r = call(ep, max_tokens=3, max_completion_tokens=3)
    expect(r.usage.completion_tokens == 3, "agreeing limits were not honoured")
    refused(ep, "max_tokens", 5, max_completion_tokens=3)  # two limits that disagree


def check_stop(ep):
    base = greedy(ep)
    cut = next(i for i in range(3, len(base) - 1) if base[i:i + 2].strip())
    stop = base[cut:cut + 2]
    text, r = call(ep, stop=[stop])
    expect(text == base[:base.index(stop)], f"stop {stop!r}: {text!r} from {base!r}")
    expect(r.choices[0].finish_reason == "stop", "finish_reason is not stop")
    refused(ep, "stop", ["a", "b", "c", "d", "e"])


def check_stream(ep):
    text, chunks = call(ep, stream=True)
    expect(len(chunks) > 2 and text == greedy(ep), "the stream does not match the whole answer")


def check_stream_options(ep):
    _, chunks = call(ep, stream=True, stream_options={"include_usage": True})
    expect(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16, "no usage chunk")
    _, chunks = call(ep, stream=True, stream_options={"include_usage": False})
    expect(all(c.usage is None for c in chunks), "usage sent though not asked for")
    try:
        call(ep, stream_options={"include_usage": True})
        raise AssertionError("stream_options without stream was accepted")
    except openai.BadRequestError as e:
        expect(e.param == "stream_options", f"named {e.param!r}")


def check_temperature(ep):
    expect(greedy(ep, seed=1) == greedy(ep, seed=2), "temperature 0 is not greedy")
    expect(greedy(ep, temperature=2, seed=1) != greedy(ep), "temperature 2 gave the greedy answer")
    refused(ep, "temperature", 3)


def check_seed(ep):
    a = greedy(ep, temperature=1.5, seed=7)
    expect(a == greedy(ep, temperature=1.5, seed=7), "the same seed gave different answers")
    expect(a != greedy(ep, temperature=1.5, seed=8), "different seeds gave the same answer")


def check_top_p(ep):
    expect(greedy(ep, temperature=2, seed=1, top_p=1e-6) == greedy(ep), "a tiny top_p is not greedy")
    refused(ep, "top_p", 1.5)


def check_penalty(field):
    def check(ep):
        plain = greedy(ep, max_tokens=32)
        expect(greedy(ep, max_tokens=32, **{field: 2.0}) != plain, f"{field}=2 changed nothing")
        refused(ep, field, 3.0)
    return check


def check_logit_bias(ep):
    plain = greedy(ep, max_tokens=4)
    five = greedy(ep, max_tokens=4, logit_bias={"5": 100})
    six = greedy(ep, max_tokens=4, logit_bias={"6": 100})
    expect(five != plain and six != plain and five != six, "a +100 bias did not force its token")
    refused(ep, "logit_bias", {"not-a-token": 1})


def choice_texts(ep, chunks_or_response, n, stream):
    """Each choice's text by index, from a response or a stream of chunks."""
    texts = [""] * n
    if not stream:
        for c in chunks_or_response.choices:
            texts[c.index] = c.message.content if ep == "chat" else c.text
        return texts
    for chunk in chunks_or_response:
        for c in chunk.choices:
            texts[c.index] += (c.delta.content or "") if ep == "chat" else c.text
    return texts


def check_n(ep):
    one = greedy(ep, n=1)
    _, r = call(ep, n=3)
    expect(sorted(c.index for c in r.choices) == [0, 1, 2], f"n=3 gave choices {[c.index for c in r.choices]}")
    expect(choice_texts(ep, r, 3, False) == [one] * 3, "greedy choices differ from the n=1 answer")
    expect(r.usage.completion_tokens == 3 * 16, f"n=3 counted {r.usage.completion_tokens} completion tokens")
    # Sampled choices: seeded (choice i with seed + i), so a repeat gives the same three.
    hot = dict(n=3, temperature=1.5, seed=11)
    _, a = call(ep, **hot)
    _, b = call(ep, **hot)
    texts = choice_texts(ep, a, 3, False)
    expect(texts == choice_texts(ep, b, 3, False), "seeded choices are not reproducible")
    expect(len(set(texts)) > 1, f"sampled choices are all the same: {texts}")
    _, chunks = call(ep, **hot, stream=True, stream_options={"include_usage": True})
    expect(choice_texts(ep, chunks, 3, True) == texts, "streamed choices differ from the whole answer")
    finished = [c.index for chunk in chunks for c in chunk.choices if c.finish_reason]
    expect(sorted(finished) == [0, 1, 2], f"finish reasons streamed for {finished}")
    expect(chunks[-1].usage.completion_tokens == 3 * 16, "streamed usage does not count every choice")
    refused(ep, "n", 0)
    refused(ep, "n", 99)


def check_identifier(field):
    def check(ep):
        greedy(ep, **{field: "caller-1"})
        refused(ep, field, 5)
    return check


def check_extension(field):
    """llama.cpp's sampling extensions, sent through extra_body as its clients do."""
    def check(ep):
        hot = dict(temperature=2, seed=1)
        if field in ("top_k", "min_p"):
            forced = greedy(ep, **hot, extra_body={field: 1})
            expect(forced == greedy(ep), f"{field}=1 at temperature 2 is not greedy")
        elif field == "ignore_eos":
            _, r = call(ep, max_tokens=24, extra_body={"ignore_eos": True})
            expect(r.usage.completion_tokens == 24, "ignore_eos did not generate to the limit")
        else:
            plain = greedy(ep, max_tokens=32)
            penalised = greedy(ep, max_tokens=32, extra_body={field: 5.0})
            expect(penalised != plain, f"{field}=5 changed nothing")
        if field != "ignore_eos":
            refused(ep, field, -1)
    return check


def check_unknown(ep):
    refused(ep, "foo", 1)


COMMON = {
    "model": check_model,
    "max_tokens": check_max_tokens,
    "stop": check_stop,
    "stream": check_stream,
    "stream_options": check_stream_options,
    "temperature": check_temperature,
    "seed": check_seed,
    "top_p": check_top_p,
    "frequency_penalty": check_penalty("frequency_penalty"),
    "presence_penalty": check_penalty("presence_penalty"),
    "logit_bias": check_logit_bias,
    "n": check_n,
    "user": check_identifier("user"),
}
EXTENSIONS = {
    name: check_extension(name) for name in ("top_k", "min_p", "repetition_penalty", "repeat_penalty", "ignore_eos")
}


def accepts(field, good, bad):
    """A field honoured by accepting what the server can do and refusing the rest."""
    def check(ep):
        greedy(ep, **{field: good})
        refused(ep, field, bad)
    return check


def refuses(field, value):
    return lambda ep: refused(ep, field, value)


# ---- chat ------------------------------------------------------------------------------------


def check_messages(ep):
    _, a = call(ep, messages=[{"role": "user", "content": "hi"}])
    _, b = call(ep, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    expect(b.usage.prompt_tokens > a.usage.prompt_tokens, "the system message was not rendered")
    for bad, param in [
        ({"role": "user", "content": "hi", "name": "ann"}, "messages[0].name"),
        ({"role": "wizard", "content": "hi"}, "messages"),
        ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "messages"),
    ]:
        try:
            call(ep, messages=[bad])
            raise AssertionError(f"{bad} was accepted")
        except openai.BadRequestError as e:
            expect(e.param == param, f"{bad} refused naming {e.param!r}")


def check_chat_logprobs(ep):
    _, r = call(ep, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    expect(len(content) == r.usage.completion_tokens, f"{len(content)} entries for {r.usage.completion_tokens} tokens")
    for e in content:
        tops = [t.logprob for t in e.top_logprobs]
        expect(len(tops) == 3 and tops == sorted(tops, reverse=True), f"top_logprobs not the 3 best: {tops}")
        # Greedy: the chosen token is the most likely one; a distribution sums to at most 1.
        expect(abs(e.logprob - tops[0]) < 1e-6 and e.top_logprobs[0].token == e.token, f"{e} is not the best")
        expect(e.logprob <= 0 and sum(math.exp(t) for t in tops) <= 1 + 1e-4, f"not log-probabilities: {e}")
        expect(bytes(e.bytes).decode("utf-8", "replace") == e.token, f"bytes do not spell {e.token!r}")
    _, chunks = call(ep, logprobs=True, top_logprobs=3, stream=True)
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    expect([(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content],
           "streamed logprobs differ from the whole answer's")
    _, r = call(ep, logprobs=True)
    expect(all(e.top_logprobs == [] for e in r.choices[0].logprobs.content), "alternatives without top_logprobs")
    refused(ep, "logprobs", "yes")


def check_top_logprobs(ep):
    refused(ep, "top_logprobs", 21, logprobs=True)
    refused(ep, "top_logprobs", 2)  # without logprobs: true


def check_completion_logprobs(ep):
    text, r = call(ep, logprobs=2)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    expect(len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n, f"{lp}")
    expect(all(len(t) <= 2 for t in lp.top_logprobs), "more than 2 alternatives")
    expect(lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0, f"offsets {lp.text_offset}")
    expect(all(x <= 0 for x in lp.token_logprobs), f"{lp.token_logprobs}")
    _, chunks = call(ep, logprobs=2, stream=True)
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    expect(streamed == lp.tokens, "streamed tokens differ")
    refused(ep, "logprobs", 6)
    refused(ep, "logprobs", 1, echo=True)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}


def tool_call_of(ep, **kw):
    """(name, arguments, id, finish_reason) of the one call an answer makes, or None; streamed or whole."""
    _, r = call(ep, max_tokens=64, **kw)
    if not kw.get("stream"):
        choice = r.choices[0]
        calls = choice.message.tool_calls
        if not calls:
            return None
        expect(len(calls) == 1 and choice.message.content is None, f"{choice.message}")
        c = calls[0]
        return c.function.name, c.function.arguments, c.id, choice.finish_reason
    name, args, call_id, finish = None, "", None, None
    for chunk in r:
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                expect(d.index == 0, f"call index {d.index}")
                call_id = d.id or call_id
                name = (d.function.name if d.function and d.function.name else None) or name
                args += (d.function.arguments or "") if d.function else ""
            finish = c.finish_reason or finish
    return (name, args, call_id, finish) if name else None


def check_tools(ep):
    named = {"type": "function", "function": {"name": "get_weather"}}
    for stream in (False, True):
        for choice, names in ((named, {"get_weather"}), ("required", {"get_weather", "get_time"})):
            got = tool_call_of(ep, tools=[WEATHER, CLOCK], tool_choice=choice, stream=stream, temperature=1, seed=5)
            expect(got is not None, f"tool_choice={choice} (stream={stream}) made no call")
            name, args, call_id, finish = got
            expect(name in names and call_id.startswith("call_") and finish in ("tool_calls", "length"), f"{got}")
            jsonschema.validate(json.loads(args), SCHEMAS[name])
        _, r = call(ep, tools=[WEATHER], tool_choice="none", stream=stream)
        expect(r is not None, "tool_choice none gave nothing")
    # auto: a call that validates, or text.
    got = tool_call_of(ep, tools=[WEATHER, CLOCK], tool_choice="auto")
    if got:
        jsonschema.validate(json.loads(got[1]), SCHEMAS[got[0]])
    # The loop an agent runs: the call, its result, then the answer.
    name, args, call_id, _ = tool_call_of(ep, tools=[WEATHER], tool_choice=named)
    history = MESSAGES + [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}]},
        {"role": "tool", "tool_call_id": call_id, "content": json.dumps({"sky": "sunny", "degrees": 21})},
    ]
    text, r = call(ep, messages=history, tools=[WEATHER], tool_choice="none")
    expect(r.usage.prompt_tokens > 20 and isinstance(text, str), "the tool result was not taken")
    # Bad tool requests.
    for kw, param in [
        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
               "properties": {"d": {"type": "string", "format": "date"}}}}}]), "tools[0]"),
        (dict(messages=MESSAGES + [{"role": "tool", "content": "x"}]), "messages[1].tool_call_id"),
        (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}), "response_format"),
    ]:
        try:
            call(ep, **kw)
            raise AssertionError(f"{kw} was accepted")
        except openai.BadRequestError as e:
            expect(e.param == param, f"{kw} refused naming {e.param!r}: {e.message}")


def check_tool_choice(ep):
    refused(ep, "tool_choice", "auto")  # without tools
    refused(ep, "tool_choice", "sometimes", tools=[WEATHER])


def check_parallel_tool_calls(ep):
    for flag in (True, False):
        got = tool_call_of(ep, tools=[WEATHER], tool_choice="required", parallel_tool_calls=flag)
        expect(got is not None, "no call")
    refused(ep, "parallel_tool_calls", False)  # without tools


def check_response_format(ep):
    text = greedy(ep, max_tokens=40, temperature=0.8, seed=3, response_format={"type": "json_object"})
    expect(isinstance(json.loads(text), dict), f"json_object gave {text!r}")
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "legs": {"type": "integer"},
            "kind": {"enum": ["cat", "dog"]},
            "friends": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
            "owner": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/person"}]},
        },
        "required": ["name", "legs", "kind", "friends", "owner"],
        "additionalProperties": False,
        "$defs": {"person": {"type": "object", "properties": {"age": {"type": "number"}}, "required": ["age"]}},
    }
    for seed in range(4):
        for stream in (False, True):
            text = greedy(
                ep, max_tokens=60, temperature=1, seed=seed, stream=stream,
                response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": schema, "strict": True}},
            )
            jsonschema.validate(json.loads(text), schema)
    # A stop sequence would cut the promised document.
    refused(ep, "stop", ["}"], response_format={"type": "json_object"})
    bad = {"type": "object", "properties": {"when": {"type": "string", "format": "date-time"}}}
    refused(ep, "response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": bad}})
    try:
        call(ep, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}})
    except openai.BadRequestError as e:
        expect("format" in e.message and "/properties/when" in e.message, f"the refusal does not say why: {e.message}")


CHAT = {
    **COMMON,
    **EXTENSIONS,
    "messages": check_messages,
    "max_completion_tokens": check_max_completion_tokens,
    "response_format": check_response_format,
    "safety_identifier": check_identifier("safety_identifier"),
    "prompt_cache_key": check_identifier("prompt_cache_key"),
    "metadata": accepts("metadata", {"team": "a"}, {f"k{i}": "v" for i in range(17)}),
    "store": accepts("store", False, True),
    "modalities": accepts("modalities", ["text"], ["text", "audio"]),
    "service_tier": accepts("service_tier", "auto", "flex"),
    "reasoning_effort": accepts("reasoning_effort", "none", "high"),
    "prompt_cache_retention": accepts("prompt_cache_retention", "in_memory", "24h"),
    "prompt_cache_options": accepts("prompt_cache_options", {"mode": "implicit"}, {"mode": "explicit"}),
    "logprobs": check_chat_logprobs,
    "top_logprobs": check_top_logprobs,
    "audio": refuses("audio", {"voice": "alloy", "format": "wav"}),
    "verbosity": refuses("verbosity", "low"),
    "prediction": refuses("prediction", {"type": "content", "content": "hello"}),
    "web_search_options": refuses("web_search_options", {"search_context_size": "low"}),
    "moderation": refuses("moderation", {"model": "omni-moderation-latest"}),
    "tools": check_tools,
    "tool_choice": check_tool_choice,
    "parallel_tool_calls": check_parallel_tool_calls,
    "functions": refuses("functions", [{"name": "f", "parameters": {"type": "object"}}]),
    "function_call": refuses("function_call", "auto"),
    "foo": check_unknown,
}

# ---- completions -----------------------------------------------------------------------------


def check_prompt(ep):
    _, a = call(ep, prompt="hi")
    _, b = call(ep, prompt="hi there, how are you")
    expect(b.usage.prompt_tokens > a.usage.prompt_tokens, "the prompt was not used")
    refused(ep, "prompt", ["one", "two"])


def check_echo(ep):
    expect(greedy(ep, echo=True) == PROMPT + greedy(ep), "echo did not prepend the prompt")


COMPLETIONS = {
    **COMMON,
    **EXTENSIONS,
    "prompt": check_prompt,
    "echo": check_echo,
    "best_of": accepts("best_of", 1, 2),
    "suffix": refuses("suffix", " the end."),
    "logprobs": check_completion_logprobs,
    "foo": check_unknown,
}


def client_fields(params):
    return set(typing.get_type_hints(params.CompletionCreateParamsBase)) | {"stream"}


def walk(name, table, params):
    ep = "chat" if name == "chat" else "completions"
    known = client_fields(params)
    unclassified = known - set(table)
    if unclassified:
        failures.append(f"{name}: fields the client defines but the walk does not classify: {sorted(unclassified)}")
    for field, check in table.items():
        try:
            check(ep)
            checked[name][field] = "ok"
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the walk goes on
            checked[name][field] = "failed"
            failures.append(f"{name}.{field}: {type(e).__name__}: {e}")
    # null means "not given": every optional field the client knows, sent as null, is fine.
    nulls = {f: None for f in known if f not in ("model", "messages", "prompt", "stream", "max_tokens")}
    try:
        call(ep, extra_body={**nulls, "ignore_eos": True})
        checked[name]["<every field null>"] = "ok"
    except Exception as e:  # noqa: BLE001
        failures.append(f"{name}: fields sent as null were refused: {e}")


# ---- embeddings ------------------------------------------------------------------------------


def embed(**kw):
    kw.setdefault("model", model)
    return client.embeddings.create(**kw)


def close(a, b, tolerance=1e-4):
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < tolerance


def refused_embedding(field, value, **kw):
    if field != "input":
        kw.setdefault("input", PROMPT)
    try:
        embed(**kw, **({"extra_body": {field: value}} if field == "foo" else {field: value}))
    except openai.BadRequestError as e:
        expect(e.param == field, f"embeddings {field}={value!r} was refused naming {e.param!r}")
        return
    raise AssertionError(f"embeddings {field}={value!r} was accepted")


def check_embedding_input():
    # The client asks for base64 by default and decodes it; float is asked for explicitly.
    single = embed(input=PROMPT).data[0].embedding
    expect(abs(sum(x * x for x in single) - 1) < 1e-3, "an embedding is not of unit length")
    batch = embed(input=[PROMPT, "the end", PROMPT], encoding_format="float")
    expect([d.index for d in batch.data] == [0, 1, 2], "embeddings are not indexed in order")
    a, b, c = (d.embedding for d in batch.data)
    expect(close(a, c) and close(a, single), "the same text embeds differently in a batch or alone")
    expect(not close(a, b, 1e-3), "two different texts have the same embedding")
    expect(batch.usage.prompt_tokens > 0 and batch.usage.total_tokens == batch.usage.prompt_tokens, "usage")
    expect(close(embed(input=[[1, 2, 3]]).data[0].embedding, embed(input=[1, 2, 3]).data[0].embedding),
           "token-list inputs disagree")
    refused_embedding("input", "")
    refused_embedding("input", [])


def check_encoding_format():
    import base64
    import struct
    raw = client.embeddings.with_raw_response.create(model=model, input=PROMPT, encoding_format="base64")
    encoded = json.loads(raw.text)["data"][0]["embedding"]
    expect(isinstance(encoded, str), "base64 was not a string")
    data = base64.b64decode(encoded)
    decoded = list(struct.unpack(f"<{len(data) // 4}f", data))
    expect(close(decoded, embed(input=PROMPT, encoding_format="float").data[0].embedding), "base64 != float")
    refused_embedding("encoding_format", "hex")


def check_dimensions():
    size = len(embed(input=PROMPT).data[0].embedding)
    expect(len(embed(input=PROMPT, dimensions=size).data[0].embedding) == size, "native dimensions refused")
    refused_embedding("dimensions", size - 1)


EMBEDDINGS = {
    "input": check_embedding_input,
    "model": lambda: expect(embed(input=PROMPT).model == model, "the model is not named"),
    "encoding_format": check_encoding_format,
    "dimensions": check_dimensions,
    "user": lambda: embed(input=PROMPT, user="caller-1"),
    "foo": lambda: refused_embedding("foo", 1),
}


def walk_embeddings():
    checked["embeddings"] = {}
    unclassified = set(typing.get_type_hints(embedding_types.EmbeddingCreateParams)) - set(EMBEDDINGS)
    if unclassified:
        failures.append(f"embeddings: fields the client defines but the walk does not classify: {sorted(unclassified)}")
    for field, check in EMBEDDINGS.items():
        try:
            check()
            checked["embeddings"][field] = "ok"
        except Exception as e:  # noqa: BLE001
            checked["embeddings"][field] = "failed"
            failures.append(f"embeddings.{field}: {type(e).__name__}: {e}")


walk("chat", CHAT, chat_types)
walk("completions", COMPLETIONS, completion_types)
walk_embeddings()
print(json.dumps({"openai_version": openai.__version__, "checked": checked, "failures": failures}, indent=1))
sys.exit(1 if failures else 0)
