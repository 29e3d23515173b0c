"""Submit a prompt and a chat to a running engine and print the results (blocking client).

python run.py serve                      # in another terminal
python examples/submit.py "The capital of France is" --max-tokens 16
"""

from __future__ import annotations

import argparse
import sys

from engine.client import Client, EngineError


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("prompt", nargs="?", default="The capital of France is")
    ap.add_argument("--addr", default="tcp://127.0.0.1:5555", help="the broker's client address")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()

    try:
        with Client(args.addr, timeout_s=120) as client:
            result = client.generate(args.prompt, max_tokens=args.max_tokens)
            print(f"prompt:     {args.prompt!r}\ncompletion: {result.text!r}")
            print(
                f"  {result.finish_reason}; {result.usage.prompt_tokens} prompt + "
                f"{result.usage.completion_tokens} completion tokens; "
                f"{result.timings.finished_s:.2f} s in {result.num_slices} slice(s)"
            )
            chat = [
                {"role": "system", "content": "Answer in one short sentence."},
                {"role": "user", "content": args.prompt},
            ]
            print(f"chat:       {client.chat(chat, max_tokens=args.max_tokens).text!r}")
    except EngineError as exc:  # RequestRejected, RequestTimeout, Disconnected
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
