"""Command line: ``python -m tamperbench run|sweep|build|list|share|prepare-data ...``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import config, data, runner, share, sweep

OVERRIDES_HELP = """\
overrides (-p KEY=VALUE, repeatable):
  VALUE is YAML: 3 is an int, 0.1 a float, null is None, [1, 5] a list, {eps: 0.2} a mapping.
  A dotted KEY changes one nested value and keeps the others:
    -p attack_suite.fgsm.eps=0.2      (the rest of the suite is unchanged)
    -p particul.epochs=5  -p n_train=null  -p seed=1
  Every value is validated before any notebook starts. A shared value (seed, dataset, model,
  training, attack suite, particul) changed for only some chapters (--only) would make the book
  inconsistent: the runner refuses it, unless the run is a --variant with its own book.
  python -m tamperbench list  shows every notebook's parameters, attacks, detectors, datasets.
"""


SWEEP_HELP = """\
examples:
  python -m tamperbench sweep seeds                        (the sweeps: block of _config.yml)
  python -m tamperbench sweep seeds --profile ci --grid seed=0,1
  python -m tamperbench sweep eps --grid seed=0,1,2 --grid attack_suite.pgd.eps=0.05,0.1 --only 04_detection
  python -m tamperbench sweep seeds --address ray://head:10001   (an existing Ray cluster)
Each point writes to data/results/<profile>/sweeps/<sweep>/<point>/; a rerun skips completed
points; a failed point is reported and the others go on (exit status 1 if any failed). The
tables of all points are under <sweep>/aggregate/, the across-seed intervals in headlines.csv.
"""


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise config.ConfigError(f"override {pair!r} must look like key=value (see --help)")
        key, value = pair.split("=", 1)
        out[key.strip()] = config.parse_value(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tamperbench", description="Run, build and share the tamperbench study.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the notebooks into book/ (or a variant's own book)",
                         epilog=OVERRIDES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--profile", help="ci, cpu or gpu (default: the config's default_profile)")
    run.add_argument("--only", action="append", metavar="NOTEBOOK", help="run only this notebook (repeatable)")
    run.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE", help="override a parameter (see below)")
    run.add_argument("--force", action="store_true", help="rerun even unchanged notebooks")
    run.add_argument("--variant", metavar="NAME", help="write executed notebooks, tables and figures to "
                     "data/results/<profile>/variants/NAME/ and build that variant's own book there")
    run.add_argument("--book-dir", help="where executed notebooks go (default: book/, or the variant's book)")
    run.add_argument("--quiet", action="store_true", help="do not stream each notebook's cells and outputs")
    swp = sub.add_parser("sweep", help="rerun the study over a grid (seeds, parameters) as Ray tasks, then aggregate",
                         epilog=SWEEP_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    swp.add_argument("name", help="a sweep of _config.yml's sweeps: section, or a new name with --grid")
    swp.add_argument("--profile", help="ci, cpu or gpu (default: the sweep's profile, else the default profile)")
    swp.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                     help="a grid key and its values (repeatable; adds to or replaces the config's)")
    swp.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE", help="fix a parameter for every point")
    swp.add_argument("--only", action="append", metavar="NOTEBOOK", help="run only this notebook in each point (repeatable)")
    swp.add_argument("--address", help="an existing Ray cluster (default: $RAY_ADDRESS, else a local Ray instance)")
    swp.add_argument("--cpus-per-point", type=float, help="CPUs each point asks Ray for (default: all of a node's)")
    swp.add_argument("--force", action="store_true", help="rerun points that completed earlier")
    swp.add_argument("--dry-run", action="store_true", help="validate and list the points, run nothing")
    bld = sub.add_parser("build", help="build the HTML report (refuses a book with a failed or missing chapter)")
    bld.add_argument("--variant", metavar="NAME", help="build this variant's book instead of book/")
    bld.add_argument("--profile", help="the variant's profile (default: the config's default_profile)")
    bld.add_argument("--strict", action="store_true", help="warnings are errors (-W -n --keep-going)")
    sub.add_parser("list", help="notebooks and their parameters, profiles, attacks, detectors, datasets")
    sub.add_parser("prepare-data", help="put the offline datasets in place")
    shr = sub.add_parser("share", help="zip the built report into one archive that opens offline")
    shr.add_argument("html", nargs="?", default=str(runner.BOOK_DIR / "_build" / "html"), help="the built HTML folder")
    shr.add_argument("archive", nargs="?", default=str(runner.BOOK_DIR / "_build" / "tamperbench-report.zip"))
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare-data":
            print(f"Fashion-MNIST ready in {data.prepare_fashion_mnist()}")
        elif args.command == "list":
            from . import catalog

            print(catalog.describe())
        elif args.command == "share":
            out = share.make_archive(args.html, args.archive)
            print(f"{out} ({out.stat().st_size / 2**20:.1f} MiB): unzip anywhere and open tamperbench-report/index.html")
        elif args.command == "sweep":
            plan = sweep.plan(args.name, args.profile, sweep.parse_grid(args.grid), _overrides(args.param), args.only,
                              args.cpus_per_point)
            print(f"Sweep {plan.sweep!r} ({plan.profile} profile): {len(plan.points)} point(s), "
                  f"{', '.join(plan.notebooks) if plan.notebooks else 'every notebook'}, each asking Ray for {plan.resources}")
            if args.dry_run:
                for pt in plan.points:
                    print(f"  {pt.name}: {pt.overrides}" + ("  (completed)" if sweep.completed(plan, pt) else ""))
                return 0
            log = sweep.run(plan, address=args.address, force=args.force)
            return 1 if (log.status == "failed").any() else 0
        elif args.command == "build":
            book = runner.BOOK_DIR
            if args.variant:
                book = runner.variant_book_dir(args.profile or config.load().default_profile, args.variant)
            html = runner.build(book, strict=args.strict, require_all=not args.variant)
            print(f"The report: {html / 'index.html'}")
        else:
            if not args.quiet:  # stream each cell's outputs (progress bars included) as it runs
                logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
                logging.getLogger("papermill").setLevel(logging.INFO)
            records = runner.run(args.profile, args.only, _overrides(args.param), args.force,
                                 book_dir=Path(args.book_dir) if args.book_dir else None,
                                 variant=args.variant, progress=not args.quiet)
            if args.variant:
                profile = args.profile or config.load().default_profile
                html = runner.build(runner.variant_book_dir(profile, args.variant), require_all=False)
                print(f"Variant {args.variant!r}: {len(records)} chapter(s); its report: {html / 'index.html'}")
    except (config.ConfigError, data.DatasetUnavailable, share.ShareError, KeyError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    except runner.NotebookFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
