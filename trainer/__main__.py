"""`python -m tuneloom.trainer [-f JOB.yaml]`: the training pod's entry point.

Without -f the job is read from $TUNELOOM_JOB_FILE, where the operator mounts it.
"""

import argparse
import logging
import os
import sys

from tuneloom.trainer.main import run_from_file


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tuneloom.trainer")
    parser.add_argument("-f", "--file", default=os.environ.get("TUNELOOM_JOB_FILE"), help="FineTuneJob YAML")
    parser.add_argument("--metrics-port", type=int, default=None)
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    if not args.file:
        parser.error("give -f JOB.yaml or set TUNELOOM_JOB_FILE")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_from_file(args.file, metrics_port=args.metrics_port, fresh=args.fresh)


if __name__ == "__main__":
    sys.exit(main())
