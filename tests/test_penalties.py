"""logit_bias, min_p and the penalties (runtime/sampling.py): the processors
against a plain numpy statement of each convention, and the engine's greedy tokens against a
reference decode loop that applies them by hand."""

from __future__ import annotations

from collections import Counter

import mlx.core as mx
import numpy as np
import pytest

from runtime import sampling
from runtime.sampling import make_sampler
from runtime.requests import GenerationRequest, SamplingParams

VOCAB = 12


def reference_logits(logits, prompt, out, *, bias=None, presence=0.0, frequency=0.0, repetition=1.0, window=0):
    """What each convention says, written out: OpenAI's (window 0) counts the output for presence
    and frequency and sees prompt + output for repetition; llama.cpp's counts the last `window`
    tokens of both for all three. Bias first."""
    x = np.array(logits, dtype=np.float64)
    for t, b in (bias or {}).items():
        x[t] += b
    if window:
        counts = Counter((list(prompt) + list(out))[-window:])
        seen = set(counts)
    else:
        counts = Counter(out)
        seen = set(prompt) | set(out)
    if repetition != 1.0:
        for t in seen:
            x[t] = x[t] / repetition if x[t] > 0 else x[t] * repetition
    for t, c in counts.items():
        x[t] -= frequency * c + presence
    return x


def drive(procs, prompt, generated, logits_per_step):
    """Call the processors as mlx-lm's generator does: the context's last entry is the token fed
    to the step (the last prompt token, then each sampled one)."""
    outs = []
    context = list(prompt)
    for step, logits in enumerate(logits_per_step):
        if step:
            context.append(generated[step - 1])
        x = mx.array(np.asarray(logits, dtype=np.float32)[None])
        for p in procs:
            x = p(mx.array(context, dtype=mx.int32), x)
        outs.append(np.array(x[0]))
    return outs


@pytest.mark.parametrize("kw", [
    dict(presence=0.5), dict(frequency=0.7), dict(repetition=1.3), dict(bias={3: 2.5, 7: -100.0}),
    dict(presence=0.4, frequency=-0.3, repetition=0.8, bias={0: 1.0}),
    dict(presence=0.5, frequency=0.5, repetition=1.5, window=3),
    dict(frequency=1.0, repetition=2.0, window=50),
])
def test_processors_follow_each_convention(kw):
    rng = np.random.default_rng(0)
    prompt = [1, 2, 2, 5]
    generated = [5, 5, 9, 1, 5, 11]
    steps = [rng.normal(size=VOCAB) * 3 for _ in generated]
    window = kw.get("window", 0)
    rep = kw.get("repetition", 1.0)
    tail = prompt[-window:] if window else sorted(set(prompt)) if rep != 1.0 else None
    procs = sampling.processors([[t, b] for t, b in kw.get("bias", {}).items()] or None,
                                 kw.get("presence", 0.0), kw.get("frequency", 0.0), rep, tail, window)
    got = drive(procs, prompt, generated, steps)
    for k, logits in enumerate(steps):
        want = reference_logits(logits, prompt, generated[:k], **kw)
        np.testing.assert_allclose(got[k], want, rtol=1e-5, atol=1e-4, err_msg=f"step {k}")


def test_nothing_asked_no_processors():
    assert sampling.processors(None, 0.0, 0.0, 1.0, None, 0) == []


def test_min_p_keeps_only_tokens_near_the_top():
    # probabilities 0.5, 0.3, 0.15, 0.05: min_p 0.5 keeps those >= 0.25, the first two
    logprobs = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]]))
    seen = set()
    for seed in range(200):
        seen.add(int(make_sampler(1.0, 1.0, 0, seed, min_p=0.5)(logprobs).item()))
    assert seen == {0, 1}
    plain = {int(make_sampler(1.0, 1.0, 0, seed)(logprobs).item()) for seed in range(200)}
    assert plain == {0, 1, 2, 3}
    assert int(make_sampler(0.0, 1.0, 0, 0, min_p=0.9)(logprobs).item()) == 0  # greedy: unchanged


# -- the engine, against a decode loop that applies the same rules by hand ---------------------

PROMPT = [10, 11, 12, 13, 14, 10, 11, 12]
N = 32


def reference_tokens(model, prompt, n, **kw):
    tokens, out = list(prompt), []
    for _ in range(n):
        logits = np.array(model(mx.array([tokens]))[0, -1].astype(mx.float32))
        tok = int(np.argmax(reference_logits(logits, prompt, out, **kw)))
        out.append(tok)
        tokens.append(tok)
    return out


def engine_tokens(engine, prompt, n, **params):
    h = engine.submit(GenerationRequest(list(prompt), SamplingParams(max_tokens=n, temperature=0.0,
                                                                     ignore_eos=True, **params)))
    toks = [ev.token for ev in h.iter_sync(60) if hasattr(ev, "token")]
    return toks


CASES = {
    # the bias lifts prompt token 13 to the top; repetition over the prompt takes it down again
    "openai": (dict(presence_penalty=0.8, frequency_penalty=0.6, repetition_penalty=3.0, logit_bias={13: 4.0}),
               dict(presence=0.8, frequency=0.6, repetition=3.0, bias={13: 4.0})),
    # a window of 3 lets a token 4 back come again, which OpenAI's convention would not
    "llama.cpp": (dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.3, penalty_window=3),
                  dict(presence=0.5, frequency=0.5, repetition=1.3, window=3)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_engine_greedy_tokens_apply_the_penalties(engine, case):
    params, ref = CASES[case]
    want = reference_tokens(engine.model, PROMPT, N, **ref)
    plain = engine_tokens(engine, PROMPT, N)
    assert want != reference_tokens(engine.model, PROMPT, N), "the penalties must change this output"
    other = {k: v for k, v in ref.items() if k != "window"} if "window" in ref else {**ref, "window": 3}
    assert want != reference_tokens(engine.model, PROMPT, N, **other), "and so must the convention"
    assert engine_tokens(engine, PROMPT, N, **params) == want
    # again: the prompt's KV now comes from the prefix cache, the penalties still see it whole
    assert engine_tokens(engine, PROMPT, N, **params) == want
    assert engine_tokens(engine, PROMPT, N) == plain


def test_logit_bias_forces_a_token(engine):
    assert engine_tokens(engine, PROMPT, 6, logit_bias={7: 100.0}) == [7] * 6


# -- the dialects' fields reach the engine: the official SDKs against the same engine --------------

def engine_text(engine, prompt, n, **params) -> str:
    h = engine.submit(GenerationRequest(list(prompt), SamplingParams(max_tokens=n, temperature=0.0,
                                                                     ignore_eos=True, **params)))
    return "".join(getattr(ev, "text", "") or "" for ev in h.iter_sync(60))


def test_openai_fields_are_applied(engine, server):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    params, _ = CASES["openai"]
    r = client.completions.create(
        model="demo-llama", prompt=PROMPT, max_tokens=N, temperature=0,
        presence_penalty=params["presence_penalty"], frequency_penalty=params["frequency_penalty"],
        logit_bias={str(t): b for t, b in params["logit_bias"].items()},
        extra_body={"repetition_penalty": params["repetition_penalty"], "ignore_eos": True})
    assert r.choices[0].text == engine_text(engine, PROMPT, N, **params) != engine_text(engine, PROMPT, N)
    forced = client.completions.create(model="demo-llama", prompt=PROMPT, max_tokens=4, temperature=0.7,
                                       logit_bias={"7": 100}, logprobs=0,
                                       extra_body={"ignore_eos": True, "min_p": 0.05})
    tokens = forced.choices[0].logprobs.tokens
    assert len(tokens) == 4 and len(set(tokens)) == 1


def test_ollama_options_are_applied_over_the_last_n_tokens(engine, server):
    import ollama

    client = ollama.Client(host=server.url, timeout=60)
    params, ref = CASES["llama.cpp"]
    options = {"temperature": 0, "num_predict": N, "repeat_penalty": params["repetition_penalty"],
               "presence_penalty": params["presence_penalty"], "frequency_penalty": params["frequency_penalty"],
               "repeat_last_n": params["penalty_window"]}
    r = client.generate(model="demo-llama", prompt="", raw=True, context=PROMPT, options=options)
    prompt = r.context[:r.prompt_eval_count]
    generated = r.context[r.prompt_eval_count:]
    assert prompt[:len(PROMPT)] == PROMPT and generated
    assert generated == reference_tokens(engine.model, prompt, len(generated), **ref)
    off = client.generate(model="demo-llama", prompt="", raw=True, context=PROMPT,
                          options={**options, "repeat_last_n": 0})  # llama.cpp: no penalties at all
    assert off.context[off.prompt_eval_count:] == reference_tokens(engine.model, prompt, len(off.context) - off.prompt_eval_count)
    assert off.context != r.context


@pytest.mark.slow
def test_two_ranks_apply_them_alike(engine, model_cache):
    # Followers build the processors from the step decision: 2 tensor-parallel ranks give the
    # 1-rank engine's tokens, also when the second request's prompt comes from the prefix cache.
    import openai

    from tests.launch_helpers import ServingCluster

    params, _ = CASES["openai"]
    with ServingCluster("demo-llama:tiny", cache=model_cache) as cluster:
        client = openai.OpenAI(base_url=cluster.base_url, api_key="none", max_retries=0, timeout=120)
        texts = [client.completions.create(
            model="demo-llama:tiny", prompt=PROMPT, max_tokens=N, temperature=0,
            presence_penalty=params["presence_penalty"], frequency_penalty=params["frequency_penalty"],
            logit_bias={str(t): b for t, b in params["logit_bias"].items()},
            extra_body={"repetition_penalty": params["repetition_penalty"], "ignore_eos": True}).choices[0].text
            for _ in range(2)]
        cluster.stop()
    want = engine_text(engine, PROMPT, N, **params)
    assert texts == [want, want]
