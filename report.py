"""The paper's results table, plots and synthetic-image previews from every results CSV under RESULTS/.

    python report.py                       # RESULTS/report.md, RESULTS/report.csv, RESULTS/plots/*.png, RESULTS/samples/*.png
    python report.py --results-dir runs/ --output-dir paper/

Rows are methods, columns dataset × split × examples per class; cells are mean ± std over seeds in %, the
best of each column in bold. `val` is the best validation accuracy during training (from the results CSVs);
the test splits come from the test CSVs train_classifier.py writes after training. See semantic_aug/runner/reporting.py.
"""

import argparse
import logging

from semantic_aug.runner.reporting import GRID_COLUMNS, GRID_ROWS, build_report
from semantic_aug.core.utils import HelpFormatter, run_cli


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--results-dir", default="RESULTS",
                        help="folder searched (recursively) for results_*.csv, test/*_results_*.csv and synthetic "
                             "manifests (default: RESULTS)")
    parser.add_argument("--output-dir", default=None,
                        help="where report.md, report.csv, plots/ and samples/ go (default: the results folder)")
    parser.add_argument("--data-dir", default=None,
                        help="dataset folder, for the real images in the sample grids (default: each dataset's own "
                             "default or environment variable, e.g. $FOCUS_DIR)")
    parser.add_argument("--samples", action=argparse.BooleanOptionalAction, default=True,
                        help="draw a sample grid per run that has synthetic images (default: on)")
    parser.add_argument("--grid-rows", type=int, default=GRID_ROWS,
                        help=f"real images per sample grid, spread over the classes (default: {GRID_ROWS})")
    parser.add_argument("--grid-columns", type=int, default=GRID_COLUMNS,
                        help=f"synthetic images shown per real image (default: {GRID_COLUMNS})")
    args = parser.parse_args()
    if args.grid_rows < 1 or args.grid_columns < 1:
        parser.error(f"--grid-rows and --grid-columns must be at least 1, got {args.grid_rows} and {args.grid_columns}")
    return args


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    report = build_report(args.results_dir, args.output_dir, data_dir=args.data_dir, samples=args.samples,
                          grid_rows=args.grid_rows, grid_columns=args.grid_columns)
    print(report.describe())


if __name__ == "__main__":
    run_cli(main, parse_args)
