"""Command line: ``python -m tamperbench run|prepare-data ...``."""

from __future__ import annotations

import argparse
import sys

from . import config, data, runner, share


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise config.ConfigError(f"override {pair!r} must look like key=value")
        key, value = pair.split("=", 1)
        out[key.strip()] = config.parse_value(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tamperbench")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the notebooks into book/")
    run.add_argument("--profile", help="ci, cpu or gpu (default: the config's default_profile)")
    run.add_argument("--only", action="append", metavar="NOTEBOOK", help="run only this notebook (repeatable)")
    run.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE", help="override a parameter")
    run.add_argument("--force", action="store_true", help="rerun even unchanged notebooks")
    run.add_argument("--book-dir", default=str(runner.BOOK_DIR), help="where executed notebooks go")
    sub.add_parser("prepare-data", help="put the offline datasets in place")
    shr = sub.add_parser("share", help="zip the built report into one archive that opens offline")
    shr.add_argument("html", nargs="?", default=str(runner.BOOK_DIR / "_build" / "html"), help="the built HTML folder")
    shr.add_argument("archive", nargs="?", default=str(runner.BOOK_DIR / "_build" / "tamperbench-report.zip"))
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare-data":
            print(f"Fashion-MNIST ready in {data.prepare_fashion_mnist()}")
            return 0
        if args.command == "share":
            out = share.make_archive(args.html, args.archive)
            print(f"{out} ({out.stat().st_size / 2**20:.1f} MiB): unzip anywhere and open tamperbench-report/index.html")
            return 0
        runner.run(args.profile, args.only, _overrides(args.param), args.force, book_dir=args.book_dir)
    except (config.ConfigError, data.DatasetUnavailable, share.ShareError, KeyError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    except runner.NotebookFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
