"""`pd-local chat`: a streaming terminal chat with any OpenAI-compatible server. `/reset` clears
the history, `/quit` or Ctrl-D leaves, Ctrl-C stops the current answer (aborting it upstream)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterator, TextIO

import httpx


def stream_chat(
    client: httpx.Client, url: str, body: dict[str, object], headers: dict[str, str]
) -> Iterator[tuple[str, dict[str, object] | None]]:
    """Yield (content delta, final timings or None) from a streamed chat completion.

    Raises RuntimeError with the server's error message on an HTTP error or an error event."""
    with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            r.read()
            try:
                msg = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = r.text
            raise RuntimeError(f"HTTP {r.status_code}: {msg}")
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(obj["error"].get("message", "server error"))
            for choice in obj.get("choices", []):
                content = (choice.get("delta") or {}).get("content")
                if content:
                    yield content, None
            ext = obj.get("pd_local")
            if ext:
                yield "", ext.get("timings_ms")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pd-local chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server root (default %(default)s)")
    p.add_argument("--model", default=None, help="model name (default: the server's first model)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--api-key", default=os.environ.get("PD_LOCAL_API_KEY"))
    p.add_argument("--timings", action="store_true", help="print the server's phase timings after each answer")
    return p


def run(args: argparse.Namespace, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    interactive = stdin.isatty()
    with httpx.Client(timeout=httpx.Timeout(None, connect=10.0)) as client:
        try:
            model = args.model or client.get(f"{args.url}/v1/models", headers=headers).json()["data"][0]["id"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
            print(f"pd-local chat: cannot reach a server at {args.url}: {e}", file=sys.stderr)
            return 1
        if interactive:
            print(f"chatting with {model} at {args.url} (/reset, /quit)", file=stdout)
        while True:
            if interactive:
                print("> ", end="", file=stdout, flush=True)
            line = stdin.readline()
            if not line:
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/quit", "/exit"):
                break
            if text == "/reset":
                history = history[:1] if args.system else []
                print("(history cleared)", file=stdout)
                continue
            history.append({"role": "user", "content": text})
            body: dict[str, object] = {"model": model, "messages": history, "stream": True,
                                       "max_tokens": args.max_tokens, "temperature": args.temperature}
            if args.seed is not None:
                body["seed"] = args.seed
            answer = []
            try:
                for delta, timings in stream_chat(client, args.url, body, headers):
                    if delta:
                        answer.append(delta)
                        print(delta, end="", file=stdout, flush=True)
                    if timings and args.timings:
                        print(f"\n  [{', '.join(f'{k} {v:.0f} ms' for k, v in timings.items())}]", end="", file=stdout)
            except KeyboardInterrupt:
                print(" [stopped]", end="", file=stdout)
            except (RuntimeError, httpx.HTTPError) as e:
                print(f"\n[error] {e}", file=stdout)
                history.pop()
                continue
            print(file=stdout, flush=True)
            history.append({"role": "assistant", "content": "".join(answer)})
    return 0


def main(argv: list[str]) -> int:
    return run(_parser().parse_args(argv))
