"""`moe-vlm <command> [flags]`: each command is a module in `moe_vlm.commands`.

  moe-vlm train    --config configs/synthetic_tiny.py --workdir DIR [--stage 1|2|3|all]
  (further commands register below; `moe-vlm <command> --help` lists their flags)
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

# command -> module under moe_vlm.commands (imported lazily: each defines its own flags)
COMMANDS = {
    "train": "train",
    "generate": "generate",
    "chat": "chat",
    "eval": "eval",
    "convert": "convert",
}


def main(argv: Sequence[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    print(f"usage: moe-vlm {{{'|'.join(COMMANDS)}}} [flags]  (moe-vlm <command> --help)",
          file=sys.stderr)
    sys.exit(2)
  from absl import app
  command = argv.pop(1)
  module = importlib.import_module(f"moe_vlm.commands.{COMMANDS[command]}")
  app.run(module.main, argv=[f"moe-vlm {command}"] + argv[1:])


if __name__ == "__main__":
  main()
