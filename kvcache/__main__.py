"""``python -m kvcache``: the kvcache command line."""

from .cli import main

main()
