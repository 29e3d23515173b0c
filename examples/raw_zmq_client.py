"""A complete client in a page, from docs/PROTOCOL.md alone: pyzmq and msgpack, no engine code.

python examples/raw_zmq_client.py "The capital of France is" --max-tokens 16
"""

from __future__ import annotations

import argparse
import sys
import uuid

import msgpack
import zmq


def generate(sock: zmq.Socket, prompt: str, max_tokens: int, timeout_s: float) -> dict:
    """Submit one streaming request, print its text as it comes, return its Finished map."""
    request_id = uuid.uuid4().hex  # choose the id: replies are routed by it
    submit = {
        "type": "submit",
        "request_id": request_id,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
    }
    sock.send(msgpack.packb(submit))  # one frame: one msgpack map
    while True:
        if not sock.poll(timeout_s * 1000):  # give up: tell the engine to free the request
            sock.send(msgpack.packb({"type": "cancel", "request_id": request_id}))
            raise TimeoutError(f"no reply within {timeout_s} s: is `python run.py serve` up?")
        reply = msgpack.unpackb(sock.recv())
        if reply.get("request_id") not in (request_id, None):
            continue  # a reply of another request on this socket
        kind = reply["type"]
        if kind == "error":
            raise RuntimeError(f"rejected ({reply['code']}): {reply['message']}")
        if kind == "delta":
            print(reply["text"], end="", flush=True)
        elif kind == "finished":
            print()
            return reply
        # "accepted": reply["prompt_tokens"] is the prompt's length in tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("prompt", nargs="?", default="The capital of France is")
    ap.add_argument("--addr", default="tcp://127.0.0.1:5555")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each reply")
    args = ap.parse_args()

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)  # DEALER, not REQ: one request gets many replies
    sock.linger = 0
    sock.connect(args.addr)
    try:
        done = generate(sock, args.prompt, args.max_tokens, args.timeout)
        usage, timings = done["usage"], done["timings"]
        print(
            f"[{done['finish_reason']}; {usage['prompt_tokens']} prompt + "
            f"{usage['completion_tokens']} completion tokens; {timings['finished_s']:.2f} s]"
        )
        sock.send(msgpack.packb({"type": "get_stats"}))
        if sock.poll(args.timeout * 1000):
            stats = msgpack.unpackb(sock.recv())
            print(
                f"[engine: {stats['policy']}, {stats['num_workers']} worker(s), "
                f"{stats['num_waiting']} waiting, {stats['num_running']} running]"
            )
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        sock.close(linger=0)
        ctx.term()


if __name__ == "__main__":
    sys.exit(main())
