"""The `tee-inference` commands: each module adds its parser (`add_parser`) and runs it (`run`).

Parsers import nothing heavy; a command's `run` imports what it needs, so `--help`, `verify` and
`measure` work on an install without the server's web stack.
"""

from __future__ import annotations

import argparse
from typing import TypeAlias

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
