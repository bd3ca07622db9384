"""The workloads of `kvstore bench e2e`, run inside one vLLM `LLM` (one configuration, one
process). Every function returns plain JSON-able dicts; timing is wall time around vLLM calls
with the engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
from __future__ import annotations

import random
import statistics
import time

from kvstore import trace


def realistic_weights(model) -> None:
    """vLLM's dummy weights are uniform in +-1e-3: every prompt's logits come out nearly flat and
    a bit-exact check cannot fail. Norms to 1, everything else N(0, 0.02), seeded."""
    import torch
    g = torch.Generator(device="cuda").manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.empty_like(p, dtype=torch.float32).normal_(0, 0.02, generator=g).to(p.dtype))


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 120000) for _ in range(n)]


def run_requests(llm, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    """Submits all prompts at once and steps the engine; per request: TTFT (submit -> first
    token) and the generated tokens."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    ids = []
    for prompt in prompts:
        rid = f"r{time.monotonic_ns()}-{len(ids)}"
        engine.add_request(rid, TokensPrompt(prompt_token_ids=prompt), sp)
        ids.append(rid)
    first: dict[str, float] = {}
    out_tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            toks = list(out.outputs[0].token_ids)
            if toks and out.request_id not in first:
                first[out.request_id] = (time.perf_counter() - start) * 1e3
            out_tokens[out.request_id] = toks
    return [{"ttft_ms": first[r], "tokens": out_tokens[r]} for r in ids]


def single_prompt(llm, lengths: list[int], prompts: int, before_reload=None) -> dict:
    """first / GPU hit / reload TTFT per length; reload must equal the GPU hit bit for bit."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    import torch

    sp = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5)

    def ttft(ids, timeline=None):
        torch.cuda.synchronize()
        if timeline is not None:
            trace.start()
        t = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], sp, use_tqdm=False)[0]
        dt = (time.perf_counter() - t) * 1e3
        if timeline is not None:  # host marks of the connector, ms after generate() was called
            timeline.extend((name, round((ns * 1e-9 - t) * 1e3, 3)) for name, ns in trace.stop())
            timeline.append(("generate.done", round(dt, 3)))
        o = out.outputs[0]
        top = sorted(((int(tok), float(lp.logprob)) for tok, lp in o.logprobs[0].items()), key=lambda x: -x[1])
        return dt, [int(o.token_ids[0])] + [v for pair in top for v in pair]

    rng = random.Random(7)
    result = {}
    for length in lengths:
        n = length + 1  # k chunks + 1: a reload and a GPU hit both compute only the last token
        ttft(_tokens(rng, n))  # warm-up for this shape
        rows = []
        for i in range(prompts):
            ids = _tokens(rng, n)
            first, _ = ttft(ids)
            timelines = {"gpu_hit": [], "reload": []} if i == prompts - 1 else {}
            hit, hit_out = ttft(ids, timelines.get("gpu_hit"))
            llm.reset_prefix_cache()
            if before_reload:
                before_reload()
            reload, reload_out = ttft(ids, timelines.get("reload"))
            rows.append({"first_ms": first, "gpu_hit_ms": hit, "reload_ms": reload, "exact": reload_out == hit_out,
                         **({"timeline": timelines} if timelines else {})})
        result[str(length)] = rows
        print(f"  single {length}: " + ", ".join(f"{k}={statistics.median(r[k] for r in rows):.1f}"
                                              for k in ("first_ms", "gpu_hit_ms", "reload_ms"))
              + f", exact {sum(r['exact'] for r in rows)}/{len(rows)}", flush=True)
    return result


def _percentile(values, q: float) -> float:
    """The value at rank floor(q * n) of the sorted values (the largest for small n)."""
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def concurrency(llm, system_tokens: int, suffix_tokens: int, batch_sizes: list[int], before_reload=None) -> dict:
    """N requests at once sharing a system prompt (stored by an earlier request, then dropped from
    the GPU), each with its own suffix: TTFT p50/p99 and prefill tokens/s."""
    rng = random.Random(11)
    result = {}
    for n in batch_sizes:
        system = _tokens(rng, system_tokens)
        run_requests(llm, [system + _tokens(rng, suffix_tokens)], max_tokens=1)  # stores the system prompt
        llm.reset_prefix_cache()
        if before_reload:
            before_reload()
        prompts = [system + _tokens(rng, suffix_tokens) for _ in range(n)]
        t = time.perf_counter()
        rows = run_requests(llm, prompts, max_tokens=1)
        wall = time.perf_counter() - t
        ttfts = [r["ttft_ms"] for r in rows]
        result[str(n)] = {"ttft_p50_ms": statistics.median(ttfts), "ttft_p99_ms": _percentile(ttfts, 0.99),
                          "prefill_tokens_per_s": sum(len(p) for p in prompts) / wall, "wall_s": wall}
        print(f"  concurrency {n}: p50 {result[str(n)]['ttft_p50_ms']:.1f} ms, p99 {result[str(n)]['ttft_p99_ms']:.1f} ms,"
              f" {result[str(n)]['prefill_tokens_per_s']:.0f} prefill tok/s", flush=True)
    return result


def multi_turn(llm, users: int, turns: int, context_tokens: int, question_tokens: int, answer_tokens: int) -> dict:
    """Users take turns round-robin; each turn's prompt is the user's whole history (earlier
    prompts and answers) plus a new question. Requests run one at a time."""
    rng = random.Random(13)
    history = [_tokens(rng, context_tokens) for _ in range(users)]
    ttfts, first_turns, rows, timelines = [], [], [], []
    t = time.perf_counter()
    for turn in range(turns):
        for u in range(users):
            prompt = history[u] + _tokens(rng, question_tokens)
            traced = turn == 1 and u < 3  # host timelines of a few GPU-hit turns
            if traced:
                trace.start()
                t0 = time.perf_counter()
            row = run_requests(llm, [prompt], max_tokens=answer_tokens)[0]
            if traced:
                timelines.append([(name, round((ns * 1e-9 - t0) * 1e3, 3)) for name, ns in trace.stop()]
                                 + [("ttft", round(row["ttft_ms"], 3))])
            (first_turns if turn == 0 else ttfts).append(row["ttft_ms"])
            rows.append([turn, u, len(prompt), round(row["ttft_ms"], 3)])
            history[u] = prompt + row["tokens"]
    total = time.perf_counter() - t
    every = ttfts + first_turns
    # The first turn of each user has nothing to reuse anywhere (a cold prefill in every
    # configuration): reported apart as well, so the tail of the turns that can reuse shows.
    result = {"requests": len(every), "ttft_p50_ms": statistics.median(every), "ttft_p99_ms": _percentile(every, 0.99),
              "later_turns_ttft_p50_ms": statistics.median(ttfts) if ttfts else None,
              "later_turns_ttft_p99_ms": _percentile(ttfts, 0.99) if ttfts else None,
              "first_turn_ttft_p50_ms": statistics.median(first_turns), "first_turn_ttft_max_ms": max(first_turns),
              "total_s": total, "final_context_tokens": statistics.mean(len(h) for h in history),
              "turns": {"columns": ["turn", "user", "prompt_tokens", "ttft_ms"], "rows": rows},
              "timelines_turn1": timelines}
    print(f"  multi-turn: p50 {result['ttft_p50_ms']:.1f} ms, p99 {result['ttft_p99_ms']:.1f} ms, total {total:.1f} s; "
          f"turns 2..{turns}: p50 {result['later_turns_ttft_p50_ms']:.1f} ms, p99 {result['later_turns_ttft_p99_ms']:.1f} ms; "
          f"first turns (cold): p50 {result['first_turn_ttft_p50_ms']:.1f} ms, max {result['first_turn_ttft_max_ms']:.1f} ms",
          flush=True)
    return result


def prefix_cache_metrics(llm) -> dict:
    """vLLM's own prefix-cache counters (GPU and connector/external), as it reports them."""
    out = {}
    try:
        for m in llm.get_metrics():
            if "prefix_cache" in m.name and hasattr(m, "value"):
                out[m.name] = m.value
    except Exception as e:  # noqa: BLE001 - metrics are informative only
        out["error"] = repr(e)
    return out
