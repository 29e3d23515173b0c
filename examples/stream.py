"""Stream tokens as they are generated (asyncio client); Ctrl-C cancels the request.

    python run.py serve                      # in another terminal
    python examples/stream.py "Once upon a time" --max-tokens 64

The blocking client streams the same way:

    with Client() as client, client.stream("Once upon a time") as s:
        for delta in s:
            print(delta.text, end="", flush=True)
    print(s.result.finish_reason)
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from engine.client import AsyncClient, EngineError


async def stream(addr: str, prompt: str, max_tokens: int, temperature: float) -> int:
    async with AsyncClient(addr, timeout_s=120) as client:
        print(prompt, end="", flush=True)
        async with client.stream(prompt, max_tokens=max_tokens, temperature=temperature) as s:
            async for delta in s:  # leaving this loop early would cancel the request
                print(delta.text, end="", flush=True)
        result = s.result
        ttft = result.timings.first_token_s
        print(
            f"\n[{result.finish_reason}; {result.usage.completion_tokens} tokens; first token "
            f"after {ttft if ttft is not None else float('nan'):.3f} s; "
            f"{result.timings.finished_s:.2f} s in all; {result.num_slices} slice(s)]"
        )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("prompt", nargs="?", default="Once upon a time")
    ap.add_argument("--addr", default="tcp://127.0.0.1:5555", help="the broker's client address")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    args = ap.parse_args()
    try:
        return asyncio.run(stream(args.addr, args.prompt, args.max_tokens, args.temperature))
    except EngineError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # asyncio.run cancelled the stream, which sent a Cancel
        print("\n[cancelled]", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
