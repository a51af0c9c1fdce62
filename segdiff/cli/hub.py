"""python -m segdiff.hub push MODEL_DIR org/name [--private] [--message TEXT]: publish a model folder
(`segdiff.hub.publish`)."""

from __future__ import annotations

from ..hub.publish import push
from .common import Parser, command_line


def parser() -> Parser:
    parser = Parser(prog="python -m segdiff.hub", description="Publish a segdiff model on the Hugging Face Hub.")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("push", help="upload a model folder to the Hub, with its model card as README.md")
    up.add_argument("model_dir", help="a segdiff model folder (holding segdiff_card.json)")
    up.add_argument("repo_id", help="the Hub repository, org/name (created when missing)")
    up.add_argument("--private", action="store_true", help="create the repository private")
    up.add_argument("--message", help="the commit message")
    return parser


def command(args) -> None:
    url = push(args.model_dir, args.repo_id, private=args.private, message=args.message)
    print(f"uploaded {args.model_dir}: {url}")


main = command_line(parser, command)
