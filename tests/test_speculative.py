"""N-gram speculative decoding (runtime/speculative.py) on a real mlx-lm BatchGenerator.

Proof: greedy tokens, finish reasons, the finished sequence's tokens and KV equal plain
`gen.next()` decoding (1 rank), also when max_tokens or an EOS lands inside an accepted draft;
and under `exolaunch exec -n 2` (this file is also the rank program:
`python -m tests.test_speculative DIR`) both ranks give the 1-process greedy tokens, and the same
sampled tokens (temperature 0.1 and 0.8), with speculation on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from runtime.speculative import Speculator, lookup

# demo-llama:tiny's greedy continuation of LOOP falls into a loop (drafts get accepted); of
# PLAIN it hardly repeats
LOOP = [1, 1850, 303, 638, 205, 1497, 154, 1843, 1744, 1403, 679, 969, 1149]
PLAIN = [1, 901, 17, 1402, 230, 77, 1999, 3, 650, 12, 1120, 88]
MAX_TOKENS = 40


# -- the lookup ----------------------------------------------------------------------------------
def test_lookup_takes_the_longest_suffix_then_the_most_recent_occurrence():
    assert lookup([1, 2, 3, 9, 9, 1, 2, 3], 5) == [9, 9, 1, 2, 3]
    # (2, 3) occurs at 1-2 and 7-8; (8, 2, 3) never: the most recent (2, 3) proposes 8, 2, 3
    assert lookup([1, 2, 3, 4, 5, 6, 7, 2, 3, 8, 2, 3], 3) == [8, 2, 3]
    # the longer match wins over a more recent shorter one
    assert lookup([4, 2, 3, 5, 0, 3, 6, 4, 2, 3], 2) == [5, 0]
    assert lookup([1, 2, 3, 4, 1, 2, 3, 4, 1, 2], 3) == [3, 4, 1]


def test_lookup_limits():
    assert lookup([5, 6, 7], 5) == []  # nothing repeats
    assert lookup([7], 5) == []
    assert lookup([], 5) == []
    # a continuation that reaches the end of the history repeats with the match's period
    assert lookup([7, 7, 7, 7], 5) == [7, 7, 7, 7, 7]
    assert lookup([5, 1, 2, 3, 1, 2], 4) == [3, 1, 2, 3]
    assert lookup([1, 2, 9, 0, 2], 3, lookup_max=4, lookup_min=2) == []  # only a 1-gram repeats
    assert lookup([1, 2, 9, 0, 2], 3, lookup_max=4, lookup_min=1) == [9, 0, 2]
    assert lookup([1, 2, 3, 1, 2, 3], 0) == []
    # lookup_max caps the n-gram: (1, 2, 3) would match at 0, but only 2-grams are looked at
    assert lookup([1, 2, 3, 8, 2, 3, 4, 1, 2, 3], 2, lookup_max=2) == [4, 1]


def test_drafting_pauses_after_misses_and_backs_off():
    from runtime.speculative import MAX_PAUSE, MISSES_BEFORE_PAUSE, _Seq

    s = _Seq(5)
    for _ in range(MISSES_BEFORE_PAUSE):
        assert s.skip == 0
        s.record(5, 0)
    pauses = [s.skip]
    for _ in range(8):  # each retry that misses again doubles the pause, up to MAX_PAUSE
        s.skip = 0
        s.record(5, 0)
        pauses.append(s.skip)
    assert pauses[:3] == [4, 8, 16] and pauses[-1] == MAX_PAUSE
    s.skip = 0
    s.record(5, 2)  # a hit: drafting goes on, and the next misses start over
    assert (s.skip, s.drafts, s.drafted, s.accepted) == (0, 11, 55, 2)
    s.record(5, 0)
    assert s.skip == 0


def test_draft_width_adapts():
    from runtime.speculative import _Seq

    s = _Seq(5)
    widths = []
    for drafted, accepted in [(5, 2), (4, 0), (3, 3), (5, 5), (5, 1), (4, 0), (3, 0), (2, 0), (1, 0)]:
        s.record(drafted, accepted)
        widths.append(s.width)
    assert widths == [4, 3, 5, 5, 4, 3, 2, 1, 1]


def test_bad_settings_are_refused():
    for kw in ({"num_tokens": 0}, {"lookup_min": 0}, {"lookup_max": 1, "lookup_min": 2}):
        with pytest.raises(ValueError, match="speculative"):
            Speculator(**kw)


# -- one rank: a real BatchGenerator ------------------------------------------------------------
@pytest.fixture(scope="module")
def model(demo_model_path):
    import mlx_lm

    return mlx_lm.load(str(demo_model_path))[0]


def decode(model, prompts, spec=None, max_tokens=MAX_TOKENS, stop=None, samplers=None, join=None, caches=None):
    """Decode `prompts` to the end: {uid: (tokens, finish_reason, all_tokens, keys of the finished
    cache's first layer)} and the number of responses per uid in the call that finished it.
    `join` = (after n tokens of the first sequence, prompt) inserts a second sequence mid-stream."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator, StopSequences

    gen = BatchGenerator(model)
    kw = {"stop_sequences": [StopSequences(stop)] * len(prompts)} if stop else {}
    uids = gen.insert(prompts, max_tokens=[max_tokens] * len(prompts), samplers=samplers, caches=caches, **kw)
    out = {u: [] for u in uids}
    done, last_call = {}, {}
    while len(done) < len(out):
        _, rs = spec.next(gen) if spec else gen.next()
        if join and len(out[uids[0]]) >= join[0]:
            out[gen.insert([join[1]], max_tokens=[max_tokens], **kw)[0]] = []
            join = None
        for r in rs:
            assert r.uid not in done, "a response after the sequence finished"
            out[r.uid].append(r.token)
            if r.finish_reason:
                keys = r.prompt_cache[0].keys
                keys = keys[0] if isinstance(keys, tuple) else keys  # quantized: (packed, scales, biases)
                done[r.uid] = (out[r.uid], r.finish_reason, list(r.all_tokens), mx.array(keys))
                last_call[r.uid] = sum(x.uid == r.uid for x in rs)
    return done, last_call


def _same(a, b):
    import mlx.core as mx

    for uid in a:
        ta, fa, alla, ka = a[uid]
        tb, fb, allb, kb = b[uid]
        assert (ta, fa, alla) == (tb, fb, allb)
        assert ka.shape == kb.shape and mx.allclose(ka, kb, atol=1e-5).item(), "finished KV differs"


def test_greedy_loop_is_identical_and_accepts_drafts(model):
    ref, _ = decode(model, [LOOP])
    spec = Speculator()
    got, _ = decode(model, [LOOP], spec)
    _same(got, ref)
    uid = next(iter(got))
    drafted, accepted = spec.stats(uid)
    assert accepted > 0 and drafted >= accepted
    assert (spec.num_draft_tokens, spec.num_accepted_tokens) == (drafted, accepted)
    assert spec.num_drafts >= 1


def test_greedy_without_repetition_is_identical(model):
    ref, _ = decode(model, [PLAIN])
    got, _ = decode(model, [PLAIN], Speculator())
    _same(got, ref)


def _steps(model, prompt):
    """The tokens each speculative call returned, for a plain greedy decode of `prompt`."""
    from mlx_lm.generate import BatchGenerator

    spec, gen, steps = Speculator(), BatchGenerator(model), []
    gen.insert([prompt], max_tokens=[MAX_TOKENS])
    while not (steps and steps[-1] and steps[-1][-1].finish_reason):
        steps.append(spec.next(gen)[1])
    return [[r.token for r in rs] for rs in steps]


def test_quantized_kv_is_trimmed_too(tmp_path):
    """--kv-bits caches (runtime/kv_quant.py) take the verified positions and give back the
    rejected ones like float KV (demo-llama:tiny with 4 heads of 32: mlx quantizes groups of 32)."""
    import mlx_lm

    from runtime import demo_models as dm, kv_quant

    cfg = dm.variant_config("demo-llama", num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    model = mlx_lm.load(str(dm.write_model(cfg, tmp_path / "head32")))[0]
    make = kv_quant.cache_factory(model, 8, 32)
    spec = Speculator()
    ref, _ = decode(model, [LOOP], caches=[make()])
    got, _ = decode(model, [LOOP], spec, caches=[make()])
    (tokens, reason, all_tokens, _), = got.values()
    assert (tokens, reason, all_tokens) == next(iter(ref.values()))[:3]
    assert spec.num_accepted_tokens > 0


def test_max_tokens_inside_an_accepted_draft(model):
    """A limit reached inside a multi-token step (drafts are cut to the tokens left): the same
    tokens, finish and KV as plain decoding."""
    steps = _steps(model, LOOP)
    tokens = [t for s in steps for t in s]
    ends, n = [], 0
    for s in steps:
        if len(s) > 2:
            ends.append(n + len(s) - 1)  # on this step's second-last token
        n += len(s)
    assert ends, f"no step accepted 2 drafts: {steps}"
    for n in ends[:3]:
        got, calls = decode(model, [LOOP], Speculator(), max_tokens=n)
        (out, reason, *_), = got.values()
        assert (out, reason) == (tokens[:n], "length")
        assert max(calls.values()) > 1, "the limit was not reached inside a draft"
        _same(got, decode(model, [LOOP], max_tokens=n)[0])


def test_eos_inside_an_accepted_draft(model):
    """The stop matchers see every emitted token: single-token EOS (each of a few of the output's
    tokens) and a stop sequence that completes inside a draft."""
    steps = _steps(model, LOOP)
    tokens = [t for s in steps for t in s]
    loop = next(s for s in steps if len(s) > 2)[0]
    for stop in [[[t]] for t in dict.fromkeys(tokens[1:5])] + [[[loop] * 4]]:
        got, calls = decode(model, [LOOP], Speculator(), stop=stop)
        (out, reason, *_), = got.values()
        end = next(i for i in range(len(stop[0]) - 1, len(tokens)) if tokens[i + 1 - len(stop[0]):i + 1] == stop[0])
        assert (out, reason) == (tokens[:end + 1], "stop")
        _same(got, decode(model, [LOOP], stop=stop)[0])
    assert max(calls.values()) > 1, "the stop sequence did not complete inside a draft"


def test_a_second_sequence_joining_after_speculative_steps(model):
    """Drafting stops while two sequences run; each still gets its solo greedy tokens."""
    solo = {tuple(p): next(iter(decode(model, [p])[0].values()))[0] for p in (LOOP, PLAIN)}
    spec = Speculator()
    got, _ = decode(model, [LOOP], spec, join=(10, PLAIN))
    first, second = (got[u][0] for u in sorted(got))
    assert first == solo[tuple(LOOP)] and second == solo[tuple(PLAIN)]
    assert spec.num_accepted_tokens > 0


def test_sampling_is_reproducible_with_a_seed(model):
    from runtime.sampling import make_sampler

    runs = [decode(model, [LOOP], Speculator(), samplers=[make_sampler(0.8, 1.0, 0, 7)])[0] for _ in range(2)]
    assert [r[0] for r in runs[0].values()] == [r[0] for r in runs[1].values()]


# -- a draft model (--draft, runtime/draft.py) -----------------------------------------------------
@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A random model of another architecture with demo-llama's tokenizer: a draft that mostly misses."""
    import mlx_lm

    from runtime.demo_models import ensure

    return mlx_lm.load(str(ensure("demo-qwen3", cache_dir=tmp_path_factory.mktemp("draft"), size="tiny")))[0]


def test_the_served_model_as_its_own_draft_is_accepted_and_identical(model):
    from runtime.draft import DraftModel

    ref, _ = decode(model, [PLAIN])
    spec = Speculator(draft=DraftModel(model, vocab_size=2048))
    got, _ = decode(model, [PLAIN], spec)
    _same(got, ref)
    # its greedy tokens are the served model's: all accepted but for float ties between a
    # [1, 1 + k] forward and one token at a time
    assert spec.num_draft_tokens >= MAX_TOKENS // 2
    assert spec.num_accepted_tokens >= 0.9 * spec.num_draft_tokens


def test_another_draft_model_keeps_greedy_output_across_sequences(model, other_model):
    from runtime.draft import DraftModel

    ref, _ = decode(model, [LOOP])
    ref2, _ = decode(model, [PLAIN])
    draft = DraftModel(other_model, vocab_size=2048)
    spec = Speculator(draft=draft)
    got, _ = decode(model, [LOOP], spec)
    _same(got, ref)
    assert spec.num_drafts >= 1
    # the draft's cache held LOOP's tokens: a second sequence trims it back to their common prefix
    got2, _ = decode(model, [PLAIN], spec)
    _same(got2, ref2)
    assert draft.tokens[:len(PLAIN)] == PLAIN


def test_a_draft_token_beyond_the_served_vocabulary_ends_the_draft(model):
    from runtime.draft import DraftModel

    draft = DraftModel(model, vocab_size=2048)
    full = draft.propose(LOOP, 4)
    assert len(full) == 4 and all(0 <= t < 2048 for t in full)
    # a served vocabulary that ends at the highest drafted token: the draft stops before it
    draft.vocab_size = max(full)
    assert draft.propose(LOOP, 4) == full[:full.index(max(full))]


# -- two ranks: tensor parallel under exolaunch exec ----------------------------------------------
def rank_main(model_dir: str) -> None:
    from runtime.sampling import make_sampler
    from runtime.group import finish, init_group
    from runtime.loader import load

    group = init_group()
    model, _, _ = load(Path(model_dir), group, "tensor", Path(model_dir).name)
    spec = Speculator()
    greedy = next(iter(decode(model, [LOOP], spec)[0].values()))[0]
    sampled = {}
    for temp in (0.1, 0.8):  # at 0.1 the sampled tokens fall into the greedy loop and accept drafts
        s = Speculator()
        tokens = next(iter(decode(model, [LOOP], s, samplers=[make_sampler(temp, 0.95, 40, 3)])[0].values()))[0]
        sampled[temp] = (tokens, s.num_accepted_tokens)
    print(json.dumps({"rank": group.rank(), "greedy": greedy, "accepted": spec.num_accepted_tokens,
                      "sampled": [sampled[0.1], sampled[0.8]]}), flush=True)
    finish(group)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_agree_with_one_process(model, demo_model_path):
    from launcher.ports import free_data_port
    from tests.launch_helpers import rank_records, run

    ref = next(iter(decode(model, [LOOP])[0].values()))[0]
    r = run("exec", "-n", "2", "--port", str(free_data_port(2)), "--", "python", "-m", "tests.test_speculative",
            str(demo_model_path), timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = rank_records(r.stdout)
    assert sorted(ranks) == [0, 1]
    assert ranks[0]["greedy"] == ranks[1]["greedy"] == ref
    assert ranks[0]["accepted"] > 0
    assert ranks[0]["sampled"] == ranks[1]["sampled"]
    (cold, cold_accepted), (warm, _) = ranks[0]["sampled"]
    assert len(cold) == len(warm) == MAX_TOKENS and cold_accepted > 0


if __name__ == "__main__":
    rank_main(sys.argv[1])
