"""Worker: run `r1mega convert` with this script's arguments on every rank (torchrun)."""

import sys
import warnings

warnings.filterwarnings("ignore", module=r"megatron\.")

from r1mega.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
