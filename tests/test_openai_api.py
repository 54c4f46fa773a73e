"""The gateway's request parsing (no server): OpenAI bodies -> the Triton scalar inputs and the
OPTIONS object; every refused parameter refused by name; logprobs objects; docs/serving.md's
parameter table against the parser's list."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from streaming_trt.runtime.sampling import SamplingParams
from streaming_trt.serving.openai_api import (CHAT, COMPLETIONS, NEUTRAL, PARAMETERS, BadRequest, chat_logprobs,
                                              completion_logprobs, parse_chat, parse_completion)

MODEL = "streaming-trt"
HI = [{"role": "user", "content": "hi"}]


def chat(**kw):
    return parse_chat({"model": MODEL, "messages": HI, **kw}, MODEL, 4096)


def completion(**kw):
    return parse_completion({"model": MODEL, "prompt": "Once upon", **kw}, MODEL, 4096)


def test_a_plain_request_sends_no_options():
    r = chat()
    assert r["options"] == {} and r["logprobs"] is None and r["stream"] is False
    assert r["sampling"] == {"max_tokens": None, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 0}
    assert r["messages"] == HI


def test_the_new_options_go_to_options_json_with_sampling_params_names():
    r = chat(stop=["\n\n", "END", ""], frequency_penalty=0.5, presence_penalty=-0.25, repetition_penalty=1.1,
             min_p=0.05, seed=7, temperature=0.8, top_p=0.9, top_k=40, max_completion_tokens=12, logprobs=True,
             top_logprobs=3, stream=True, stream_options={"include_usage": True})
    assert r["options"] == {"stop": ["\n\n", "END"], "frequency_penalty": 0.5, "presence_penalty": -0.25,
                            "repetition_penalty": 1.1, "min_p": 0.05, "logprobs": 3}
    assert r["sampling"] == {"max_tokens": 12, "temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 7}
    assert r["stream"] and r["include_usage"]
    # every OPTIONS key but stop / logprobs / raw is a SamplingParams field the server takes by name
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    assert set(r["options"]) - {"stop", "logprobs", "raw"} <= fields
    SamplingParams(**{k: v for k, v in r["options"].items() if k in fields})  # and valid there
    json.dumps(r["options"])  # JSON as sent
    assert chat(stop="###")["options"] == {"stop": ["###"]}
    assert chat(logprobs=True)["options"] == {"logprobs": 0}
    assert chat(logprobs=False, top_k=-1)["options"] == {} and chat(top_k=-1)["sampling"]["top_k"] == 0


def test_completions_ask_for_a_raw_text_turn():
    r = completion(max_tokens=5, logprobs=2, stop=["."])
    assert r["prompt"] == "Once upon" and r["options"] == {"stop": ["."], "logprobs": 2, "raw": True}
    assert completion(prompt=["just one"])["prompt"] == "just one"
    assert completion(echo=False, n=1, best_of=1, suffix="")["prompt"] == "Once upon"


REFUSED_CHAT = [("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
                ("functions", [{"name": "f"}]), ("function_call", "auto"), ("response_format", {"type": "json_object"}),
                ("n", 2), ("logit_bias", {"50256": -100}), ("audio", {"voice": "alloy", "format": "wav"}),
                ("modalities", ["text", "audio"]), ("prediction", {"type": "content", "content": "x"}),
                ("reasoning_effort", "low"), ("verbosity", "low"), ("web_search_options", {}), ("store", True),
                ("service_tier", "flex")]
REFUSED_COMPLETIONS = [("echo", True), ("best_of", 3), ("suffix", "end"), ("n", 3), ("logit_bias", {"1": 5})]


@pytest.mark.parametrize("name,value", REFUSED_CHAT, ids=[n for n, _ in REFUSED_CHAT])
def test_refused_chat_parameters_name_themselves(name, value):
    with pytest.raises(BadRequest, match=f"^{name} is not supported") as e:
        chat(**{name: value})
    assert e.value.param == name and e.value.status == 400


@pytest.mark.parametrize("name,value", REFUSED_COMPLETIONS, ids=[n for n, _ in REFUSED_COMPLETIONS])
def test_refused_completions_parameters_name_themselves(name, value):
    with pytest.raises(BadRequest, match=f"^{name} is not supported") as e:
        completion(**{name: value})
    assert e.value.param == name


def test_neutral_values_of_refused_parameters_are_accepted():
    for name, values in NEUTRAL.items():
        for value in values:
            if CHAT in PARAMETERS[name][0]:
                chat(**{name: value})
            if COMPLETIONS in PARAMETERS[name][0]:
                completion(**{name: value})
    chat(user="u1", metadata={"k": "v"}, parallel_tool_calls=False, safety_identifier="s", prompt_cache_key="k",
         tools=None, n=None)


@pytest.mark.parametrize("kw,param,message", [
    (dict(frequency_penalty=2.5), "frequency_penalty", r"\[-2.0, 2.0\]"),
    (dict(presence_penalty="1"), "presence_penalty", "a number"),
    (dict(repetition_penalty=0), "repetition_penalty", r"\(0.0"),
    (dict(min_p=1.5), "min_p", r"\[0.0, 1.0\]"),
    (dict(temperature=3), "temperature", r"\[0.0, 2.0\]"),
    (dict(top_p=0), "top_p", r"\(0.0, 1.0\]"),
    (dict(seed=1.5), "seed", "an integer"),
    (dict(max_tokens=0), "max_tokens", r"\[1, 4096\]"),
    (dict(max_completion_tokens=10**6), "max_completion_tokens", r"\[1, 4096\]"),
    (dict(stop=[1]), "stop", "strings"),
    (dict(stop=["a"] * 17), "stop", "at most 16"),
    (dict(stop=["a" * 1025]), "stop", "longer than 1024"),
    (dict(temperature=1, repetition_penalty=1e-300), "repetition_penalty", "float32"),
    (dict(top_p=5e-324), "top_p", "float32"),
    (dict(logprobs=1), "logprobs", "true or false"),
    (dict(top_logprobs=3), "top_logprobs", "needs logprobs"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs", r"\[0, 20\]"),
    (dict(stream="yes"), "stream", "true or false"),
    (dict(stream_options={"include_usage": True}), "stream_options", "only allowed with stream"),
    (dict(stream=True, stream_options={"chunk_size": 3}), "stream_options", "not supported"),
    (dict(temprature=0.5), "temprature", "unknown parameter 'temprature'"),
    (dict(prompt="x"), "prompt", "unknown parameter 'prompt' for /v1/chat/completions"),
    (dict(messages=[{"role": "tool", "content": "x"}]), "messages[0].role", "no tool calling"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content", "text only"),
    (dict(messages=[{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}, *HI]),
     "messages[0].tool_calls", "not supported"),
    (dict(messages=[{"role": "assistant", "content": "x"}]), "messages", "last message"),
    (dict(model="gpt-4o"), "model", "not served"),
    (dict(messages=[{"role": "user", "content": "a\ud800b"}]), "messages[0].content", "lone surrogate"),
    (dict(stop=["\udc00"]), "stop", "lone surrogate"),
])
def test_bad_chat_values_name_the_parameter(kw, param, message):
    with pytest.raises(BadRequest, match=message) as e:
        chat(**kw)
    assert e.value.param == param


@pytest.mark.parametrize("kw,param,message", [
    (dict(prompt=["a", "b"]), "prompt", "one request per prompt"),
    (dict(prompt=[1, 2, 3]), "prompt", "token-id prompts"),
    (dict(prompt=""), "prompt", "non-empty"),
    (dict(logprobs=True), "logprobs", "an integer"),
    (dict(logprobs=21), "logprobs", r"\[0, 20\]"),
    (dict(messages=HI), "messages", "unknown parameter 'messages' for /v1/completions"),
    (dict(top_logprobs=2), "top_logprobs", "unknown parameter"),
])
def test_bad_completion_values_name_the_parameter(kw, param, message):
    with pytest.raises(BadRequest, match=message) as e:
        completion(**kw)
    assert e.value.param == param


def test_logprobs_objects():
    tokens = [("Hel", -0.5, [[7, "Hel", -0.5], [9, "He", -1.5]]), ("lo", -0.25, None), ("é", -2.0, [])]
    c = chat_logprobs(tokens)
    assert c["refusal"] is None and [t["token"] for t in c["content"]] == ["Hel", "lo", "é"]
    assert c["content"][0]["top_logprobs"] == [{"token": "Hel", "logprob": -0.5, "bytes": [72, 101, 108]},
                                               {"token": "He", "logprob": -1.5, "bytes": [72, 101]}]
    assert c["content"][2]["bytes"] == [0xC3, 0xA9] and c["content"][1]["top_logprobs"] == []
    o = completion_logprobs(tokens, offset=4)
    assert o["tokens"] == ["Hel", "lo", "é"] and o["token_logprobs"] == [-0.5, -0.25, -2.0]
    assert o["text_offset"] == [4, 7, 9] and o["top_logprobs"][0] == {"Hel": -0.5, "He": -1.5}
    same_text = completion_logprobs([("a", -0.1, [[1, "a", -0.1], [2, "a", -3.0]])])
    assert same_text["top_logprobs"] == [{"a": -0.1}]



def test_docs_table_lists_every_parameter_with_its_fate():
    """docs/serving.md's parameter table and PARAMETERS agree, row for row."""
    text = (Path(__file__).parent.parent / "docs" / "serving.md").read_text()
    table = text.split("### Every OpenAI parameter", 1)[1].split("\n\n", 2)[1]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = (cells[1], cells[2])
    assert set(rows) == set(PARAMETERS)
    for name, (endpoints, fate, _) in PARAMETERS.items():
        where = {"chat": (CHAT,), "completions": (COMPLETIONS,), "both": (CHAT, COMPLETIONS)}[rows[name][0]]
        assert (where, rows[name][1].split(":")[0]) == (tuple(endpoints), fate), name
