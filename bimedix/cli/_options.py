"""The flags several ``bimedix`` commands share, each defined once with one wording.

Every flag is kebab-case; a snake_case spelling an earlier release accepted stays as a hidden alias
(`add_hidden_alias`), so existing command lines keep working. ``bimedix sft`` is not built from these: it
takes TRL's dataclass flags (``--output_dir``, ``--max_length``), which are TRL's contract.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from ..core.conventions import ON_ERROR_POLICIES

SERVER_HOST = "127.0.0.1"
SERVER_PORT = 7860
API_KEY_ENV = "OPENAI_API_KEY"


def add_command(subparsers: argparse._SubParsersAction, name: str, run: Callable[[argparse.Namespace], int],
                **kwargs) -> argparse.ArgumentParser:
    """Add the sub-command ``name``, run by ``run(args)`` (its exit status); ``kwargs`` go to ``add_parser``
    (``help``, ...). ``run``'s docstring is the ``--help`` description."""
    parser = subparsers.add_parser(name, description=" ".join((run.__doc__ or "").split()) or None, **kwargs)
    parser.set_defaults(func=run)
    return parser


def add_hidden_alias(parser, action: argparse.Action, alias: str) -> None:
    """Let ``alias`` (an older spelling) set ``action``'s value too, without listing it in ``--help``.

    Args:
        parser (`argparse.ArgumentParser` or argument group): where ``action`` was added.
        action (`argparse.Action`): what ``parser.add_argument`` returned for the visible flag.
        alias (`str`): the older spelling, e.g. ``"--max_length"``.
    """
    kwargs = {"action": type(action), "dest": action.dest, "default": argparse.SUPPRESS,
              "help": argparse.SUPPRESS}
    if not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        kwargs.update(type=action.type, choices=action.choices, nargs=action.nargs, const=action.const)
    parser.add_argument(alias, **kwargs)


def add_output(parser, what: str, *, required: bool = True, path: bool = True) -> None:
    """``--output``: ``what`` the command writes there (``path=False`` keeps it a plain string)."""
    parser.add_argument("--output", required=required, type=Path if path else None, help=what)


def add_overwrite(parser, command: str) -> None:
    """``--overwrite``: let ``command`` write into a non-empty ``--output`` it did not make."""
    parser.add_argument("--overwrite", action="store_true", help=f"write into a non-empty --output that no "
                        f"{command} made (its other files are kept; inputs are never written)")


def add_seed(parser, default: int, what: str) -> None:
    """``--seed``: the seed of ``what`` (e.g. ``"the sampling"``)."""
    parser.add_argument("--seed", type=int, default=default, help=f"seed of {what} (default: {default})")


def add_review_sampling(parser) -> None:
    """``--fraction``, ``--seed``, ``--threshold``: how `review export` and `review serve` draw the queue."""
    parser.add_argument("--fraction", type=float, default=0.05, help="share of passing records sampled "
                        "(default: 0.05)")
    add_seed(parser, 0, "the sampling")
    parser.add_argument("--threshold", type=float, default=80.0, help="judge score below which every record "
                        "is queued (default: 80)")


def add_translation_options(parser) -> None:
    """``--threshold``, ``--max-rounds``, ``--review-fraction``: the translate-score-refine loop."""
    parser.add_argument("--threshold", type=float, default=80.0, help="judge score a translation must reach "
                        "(0-100, default: 80)")
    parser.add_argument("--max-rounds", type=int, default=3, help="translate + refine rounds per record "
                        "(default: 3)")
    parser.add_argument("--review-fraction", type=float, default=0.05, help="share of passing translations "
                        "queued for human review (default: 0.05)")


def add_on_error(parser, default: str, rejects: str) -> None:
    """``--on-error raise|skip``: what a bad input record does; skipped ones go to ``rejects``."""
    parser.add_argument("--on-error", choices=ON_ERROR_POLICIES, default=default,
                        help=f"on a bad input record: stop at the first, naming file:record:field (raise), "
                             f"or write it with its reason to {rejects} and go on (skip); default: {default}")


def add_include_unreviewed(parser, where: str = "") -> None:
    """``--include-unreviewed``: translations no reviewer approved (yet); ``where`` names the input."""
    parser.add_argument("--include-unreviewed", action="store_true",
                        help=f"{where}use machine translations still pending human review or scoring below "
                             "the judge threshold (default: left out; reviewer-rejected ones never are)")


def add_model(parser, *, required: bool = True, served: bool = False,
              max_new_tokens: int | None = None) -> None:
    """``--model``, ``--peft``, ``--device`` and, with ``max_new_tokens``, the reply's length and sampling
    (``served``: ``--base-url`` can serve the model instead)."""
    served_help = "; with --base-url, the served model's name" if served else ""
    parser.add_argument("--model", required=required,
                        help=f"model folder or Hub id (the base model when --peft is given){served_help}")
    parser.add_argument("--peft", metavar="ADAPTER",
                        help="PEFT LoRA adapter folder or Hub id trained on --model")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    if max_new_tokens is not None:
        parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                            help=f"reply length limit (default: {max_new_tokens})")
        parser.add_argument("--temperature", type=float, default=0.0,
                            help="reply sampling temperature; 0 decodes greedily (default: 0)")


def add_use_kernels(parser, what: str = "the model", *, when: str = "") -> None:
    """``--use-kernels`` (hidden alias ``--use_kernels``): load ``what`` with transformers' hub kernels."""
    flag = parser.add_argument("--use-kernels", action="store_true",
                               help=f"{when}load {what} with transformers' hub kernels (the `kernels` "
                                    "package; fused RMSNorm/rotary on CUDA, fetched from the Hub or its "
                                    "cache); off by default")
    add_hidden_alias(parser, flag, "--use_kernels")


def add_endpoint(parser, prefix: str = "", *, required: bool = False, model: bool = True,
                 fallback: str | None = None) -> None:
    """``--{prefix}base-url``, ``--{prefix}model``, ``--{prefix}api-key-env``: an OpenAI-compatible endpoint.

    Args:
        parser (`argparse.ArgumentParser` or argument group): where to add the flags.
        prefix (`str`, *optional*): ``"judge-"``, ``"translate-"``, ... for a second endpoint.
        required (`bool`, *optional*, defaults to `False`): the URL and the model must be given.
        model (`bool`, *optional*, defaults to `True`): add ``--{prefix}model`` (else another flag names it).
        fallback (`str`, *optional*): whose values apply when these are not given (``"the judge's"``).
    """
    default = f" (default: {fallback})" if fallback else ""
    parser.add_argument(f"--{prefix}base-url", required=required,
                        help=f"OpenAI-compatible endpoint, e.g. https://api.openai.com/v1{default}")
    if model:
        parser.add_argument(f"--{prefix}model", required=required,
                            help=f"model name sent with each request{default}")
    parser.add_argument(f"--{prefix}api-key-env", default=None if fallback else API_KEY_ENV,
                        help=f"environment variable holding the API key (default: {fallback or API_KEY_ENV})")


def add_server(parser, token_env: str, *, when: str = "") -> None:
    """``--host``, ``--port``, ``--token``: where a web app listens and the secret it asks for."""
    parser.add_argument("--host", default=SERVER_HOST,
                        help=f"{when}address to listen on (default: {SERVER_HOST}, this machine only)")
    parser.add_argument("--port", type=int, default=SERVER_PORT, help=f"{when}port (default: {SERVER_PORT})")
    parser.add_argument("--token", default=os.environ.get(token_env),
                        help=f"{when}shared secret the browser must give (/?token=...); required with a "
                             f"non-local --host (default: ${token_env})")


def add_engine(parser, cache: str) -> None:
    """The request engine of the LLM commands: rate limits, retries, budget, cache, prompts, Batch API.

    Args:
        parser (`argparse.ArgumentParser` or argument group): where to add the flags.
        cache (`str`): where the request cache goes by default, for the help.
    """
    for flag, kind, default, what in (
        ("--concurrency", int, 32, "requests in flight per endpoint"),
        ("--rpm", int, None, "requests-per-minute limit"),
        ("--tpm", int, None, "tokens-per-minute limit"),
        ("--timeout", float, 120.0, "seconds one attempt may take, from connecting to the last byte"),
        ("--max-retries", int, 6, "retries on transient failures"),
        ("--budget-usd", float, None, "stop before the ledger of this run's cache exceeds this"),
        ("--prices", Path, None, 'JSON {"model": {"input": USD/1M, "output": USD/1M}} overrides'),
        ("--cache", Path, None, f"request cache and ledger (default: {cache})"),
        ("--prompts", None, None, "folder with prompt YAMLs overriding the shipped ones"),
        ("--batch-poll-interval", float, 30.0, "seconds between Batch API polls"),
    ):
        parser.add_argument(flag, type=kind, default=default,
                            help=what if default is None else f"{what} (default: {default:g})")
    parser.add_argument("--max-tokens-field", choices=["max_tokens", "max_completion_tokens"],
                        default="max_tokens",
                        help="request field carrying the completion limit (OpenAI reasoning models: "
                             "max_completion_tokens)")
    parser.add_argument("--batch-api", action="store_true",
                        help="use the OpenAI Batch API (half price, slower)")


def add_no_progress(parser) -> None:
    """``--no-progress``."""
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_json(parser) -> None:
    """``--json``: print machine-readable JSON instead of the table."""
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
