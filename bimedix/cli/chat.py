"""``bimedix chat --model PATH [--peft ADAPTER] [--web]``: streaming bilingual chat in the terminal or a web
page."""

from __future__ import annotations

import argparse
import sys

from ..resources import check_model_folder
from . import _options

_PER_LANGUAGE = object()  # `--system-prompt` given without text


def register(subparsers) -> None:
    parser = _options.add_command(
        subparsers, "chat", run,
        help="chat with a model in the terminal (English or Arabic; /reset, /exit)")
    _options.add_model(parser, max_new_tokens=256)
    parser.add_argument("--system-prompt", "--system", dest="system", nargs="?", const=_PER_LANGUAGE,
                        metavar="TEXT",
                        help="system prompt for every turn; without TEXT, a short one in each turn's "
                             "language saying the model is not a doctor (default: the adapter's training "
                             "system prompt, normally none; the not-medical-advice "
                             "notice is shown to you either way)")
    _options.add_use_kernels(parser)
    parser.add_argument("--web", action="store_true",
                        help="serve a chat page in the browser instead (needs `pip install 'bimedix[web]'`)")
    _options.add_server(parser, "BIMEDIX_CHAT_TOKEN", when="with --web: ")


def run(args: argparse.Namespace) -> int:
    """Streaming multi-turn chat, prompted as the model was trained (the adapter's bimedix_chat.json: template
    and system prompt, normally none); the not-medical-advice notice is printed for you."""
    from ..chat import SYSTEM_PROMPTS, ChatSession, run_chat  # looked up at call time: tests replace run_chat

    check_model_folder(args.model)
    if args.peft:
        check_model_folder(args.peft, "--peft")
    if args.web:
        from ..web.chat_app import TOKEN_ENV
        from ..web.server import check_exposure, check_port, require_web

        require_web()
        check_exposure(args.host, args.token, app="the chat page", token_env=TOKEN_ENV)
        check_port(args.host, args.port)  # both before the model loads, which can take minutes
    # undecodable bytes reach run_chat, which reports and skips the line
    elif hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    if args.system is not None:
        options["system"] = SYSTEM_PROMPTS if args.system is _PER_LANGUAGE else args.system
    session = ChatSession.from_pretrained(args.model, args.peft, device=args.device,
                                          use_kernels=args.use_kernels, **options)
    if args.web:
        session.launch(args.host, args.port, block=True, token=args.token)
    else:
        run_chat(session)
    return 0
