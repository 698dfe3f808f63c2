import sys

from tee_inference.cli import main

if __name__ == "__main__":
    sys.exit(main())
