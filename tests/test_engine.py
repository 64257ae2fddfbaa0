"""The generation engine: cache equivalence, sampling controls, stop handling, streaming, batching."""
import pytest
import torch

from gptlab.generate.engine import Engine, SamplingParams, sample_token
from gptlab.model.gpt import GPT, GPTConfig


@pytest.fixture(scope="module")
def engine(small_tokenizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", "gpt2", vocab_size=small_tokenizer.vocab_size, block_size=96))
    return Engine(model, small_tokenizer)


@pytest.mark.parametrize("arch", ["gpt1", "gpt2", "gpt3", "modern"])
def test_greedy_with_cache_equals_without(arch, small_tokenizer):
    torch.manual_seed(1)
    model = GPT(GPTConfig.preset("tiny", arch, vocab_size=small_tokenizer.vocab_size, block_size=96,
                                 sparse_band=8))
    eng = Engine(model, small_tokenizer)
    prompts = [small_tokenizer.encode(t) for t in ["To be", "The slings and arrows", "苹果 =>"]]
    params = SamplingParams(max_new_tokens=40, temperature=0, stop_ids=[])
    cached = eng.generate(prompts, params)
    plain = eng.generate(prompts, params, use_cache=False)
    assert [c.ids for c in cached] == [p.ids for p in plain]
    assert all(len(c.ids) == 40 and c.finish_reason == "length" for c in cached)


def test_sampling_controls():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    assert sample_token(logits, SamplingParams(temperature=0), None) == 1
    gen = torch.Generator().manual_seed(0)
    assert all(sample_token(logits, SamplingParams(top_k=1), gen) == 1 for _ in range(20))
    assert all(sample_token(logits, SamplingParams(top_p=0.5), gen) == 1 for _ in range(20))
    picks = {sample_token(logits, SamplingParams(top_k=2, temperature=5.0), gen) for _ in range(200)}
    assert picks == {1, 2}
    with pytest.raises(Exception):
        SamplingParams(top_p=0)
    with pytest.raises(Exception):
        SamplingParams(temperature=-1)


def test_seed_reproducible_regardless_of_batch(engine, small_tokenizer):
    p = small_tokenizer.encode("To be")
    params = SamplingParams(max_new_tokens=20, temperature=1.0, seed=42)
    alone = engine.generate([p], params)[0].ids
    batched = engine.generate([small_tokenizer.encode("Whether"), p], params)[1].ids
    assert alone == batched
    other = engine.generate([p], SamplingParams(max_new_tokens=20, temperature=1.0, seed=43))[0].ids
    assert other != alone


def test_stop_strings_and_ids(engine, small_tokenizer):
    p = [small_tokenizer.encode("To be")]
    full = engine.generate(p, SamplingParams(max_new_tokens=30, temperature=0, stop_ids=[]))[0]
    assert len(full.text) > 4
    stop = full.text[3:5]
    cut = engine.generate(p, SamplingParams(max_new_tokens=30, temperature=0, stop=[stop], stop_ids=[]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    first = full.ids[2]
    by_id = engine.generate(p, SamplingParams(max_new_tokens=30, temperature=0, stop_ids=[first]))[0]
    assert by_id.finish_reason == "stop" and by_id.ids == full.ids[: full.ids.index(first)]


def test_stream_deltas_add_up(engine, small_tokenizer):
    prompt = small_tokenizer.encode("Or to take")
    params = SamplingParams(max_new_tokens=25, temperature=0.9, seed=3, stop=["e t"])
    events = list(engine.stream(prompt, params))
    assert events[-1].finish_reason in ("stop", "length")
    assert "".join(e.text for e in events) == engine.generate([prompt], params)[0].text


def test_sliding_window_keeps_generating(engine, small_tokenizer):
    out = engine.generate([small_tokenizer.encode("To be")], SamplingParams(max_new_tokens=150, temperature=0,
                                                                          stop_ids=[]))[0]
    assert len(out.ids) == 150   # longer than the 96-token window


def test_scheduler_batches_concurrent_requests(engine, small_tokenizer):
    texts = ["To be", "Whether", "The slings", "苹果", "No more", "And by"] * 2
    params = SamplingParams(max_new_tokens=15, temperature=0, stop_ids=[])
    alone = [engine.generate([small_tokenizer.encode(t)], params)[0].text for t in texts]
    sched = engine.scheduler(max_batch=4)
    try:
        reqs = [sched.submit(small_tokenizer.encode(t), params) for t in texts]
        got = [r.result().text for r in reqs]
        assert got == alone
        assert sched.steps < 15 * len(texts)   # steps were shared between requests
        # Cancelling frees the slot.
        long = sched.submit(small_tokenizer.encode("To be"), SamplingParams(max_new_tokens=10_000, temperature=0,
                                                                            stop_ids=[]))
        next(iter(long))
        long.cancel()
        assert list(long)[-1].finish_reason == "cancelled"
        assert sched.busy_slots == 0
    finally:
        sched.close()
