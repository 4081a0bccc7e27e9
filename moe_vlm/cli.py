"""`moe-vlm <command> [flags]`: each command is a module in `moe_vlm.commands`.

  moe-vlm train    --config configs/synthetic_tiny.py --workdir DIR [--stage 1|2|3|all]
  (further commands register below; `moe-vlm <command> --help` lists their flags)
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Sequence

# command -> module under moe_vlm.commands (imported lazily: each defines its own flags)
COMMANDS = {
    "train": "train",
    "generate": "generate",
    "chat": "chat",
    "eval": "eval",
    "convert": "convert",
}


def _expose_command_help(module: types.ModuleType) -> None:
  """Makes absl's `--help` (and the usage printed on a UsageError) describe the command.

  absl's `app.usage` prints `__main__`'s docstring and `FLAGS.main_module_help()`, the
  flags registered under the module name `sys.argv[0]`, i.e. flags defined in the script
  itself. Ours are defined in `moe_vlm.commands.<cmd>` (and the shared
  `moe_vlm.commands.infer_flags` it imports), so `--help` listed none of them. Register
  those flags as key flags of the main module and show the command's docstring.
  """
  from absl import flags
  fv = flags.FLAGS
  owners = [module] + [v for v in vars(module).values()
                       if isinstance(v, types.ModuleType) and v is not module
                       and v.__name__.startswith("moe_vlm.commands.")]
  for owner in owners:
    for flag in fv.get_flags_for_module(owner.__name__):
      fv.register_key_flag_for_module(sys.argv[0], flag)
  main_module = sys.modules.get("__main__")
  if main_module is not None and module.__doc__:
    # app.usage %-formats the docstring with sys.argv[0]; keep any literal '%'.
    main_module.__doc__ = module.__doc__.replace("%", "%%")


def main(argv: Sequence[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    print(f"usage: moe-vlm {{{'|'.join(COMMANDS)}}} [flags]  (moe-vlm <command> --help)",
          file=sys.stderr)
    sys.exit(2)
  from absl import app
  command = argv.pop(1)
  module = importlib.import_module(f"moe_vlm.commands.{COMMANDS[command]}")
  _expose_command_help(module)
  app.run(module.main, argv=[f"moe-vlm {command}"] + argv[1:])


if __name__ == "__main__":
  main()
