"""``bimedix chat --model PATH [--peft ADAPTER]``: streaming bilingual chat in the terminal."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "chat", help="chat with a model in the terminal (English or Arabic; /reset, /exit)",
        description="Streaming multi-turn chat with the Vicuna template; replies follow the language you write in.")
    parser.add_argument("--model", required=True, help="model folder or Hub id (the base model when --peft is given)")
    parser.add_argument("--peft", metavar="ADAPTER", help="PEFT LoRA adapter folder or Hub id to load on top")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="reply length limit (default: 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily (default: 0)")
    parser.add_argument("--system", help="system prompt for every turn (default: a short one in the user's language)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from ..chat import ChatSession, run_chat

    if hasattr(sys.stdin, "reconfigure"):  # undecodable bytes reach run_chat, which reports and skips the line
        sys.stdin.reconfigure(errors="surrogateescape")
    session = ChatSession.from_pretrained(args.model, args.peft, device=args.device, system=args.system,
                                          max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    run_chat(session)
    return 0
