"""`pd-local` command line: one sub-command per module, imported only when used.

Each sub-command module exposes `main(argv: list[str]) -> int`; importing it lazily keeps
`pd-local --help` fast and keeps torch out of commands that do not need it (bench, chat).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("pd_local.cli.serve", "launch the server (torchrun: front-end + prefill/decode ranks)"),
    "generate": ("pd_local.cli.generate", "offline batch generation from a JSONL file"),
    "weights": ("pd_local.cli.weights", "fetch the default model or convert a GGUF file"),
    "bench": ("pd_local.loadtest.cli", "load-test any OpenAI-compatible endpoint"),
    "chat": ("pd_local.cli.chat", "interactive streaming chat against a running server"),
}


def _usage() -> str:
    lines = ["usage: pd-local <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "`pd-local <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"pd-local: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
