"""``python -m lora_jax [demo] [flags]``: runs the demo (lora_jax/examples/demo.py)."""

import sys

from lora_jax.examples import demo


def _main(argv: list[str]) -> int:
  if argv and argv[0] == "demo":
    argv = argv[1:]
  elif argv and not argv[0].startswith("-"):
    print(f"usage: python -m lora_jax [demo] [flags]\nunknown command "
          f"{argv[0]!r}; the only command is 'demo'.", file=sys.stderr)
    return 2
  return demo.cli(argv, prog="python -m lora_jax demo")


if __name__ == "__main__":
  sys.exit(_main(sys.argv[1:]))
