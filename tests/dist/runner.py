"""Entry point of a distributed-check launch: torchrun ... -m tests.dist.runner --world-size N --out F."""

import argparse
from pathlib import Path

from tests.dist.harness import run


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    run(args.world_size, args.out, args.only)
