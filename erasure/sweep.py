"""``erasure-sweep`` / ``python -m erasure.sweep``: ``python -m erasure.train -m`` (:mod:`erasure.multirun`).

    python -m erasure.sweep recipe=esd method.lr=1e-4,5e-4,1e-3 concept=circle,star output_dir=runs/sweep
"""

from __future__ import annotations

import sys

from erasure import train


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    return train.main(["--multirun", *arguments] if arguments else arguments)


if __name__ == "__main__":
    sys.exit(main())
