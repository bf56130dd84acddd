"""``python -m desap_ops``: the ``desap`` command line (desap_ops.cli.main)."""
import sys

from desap_ops.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
