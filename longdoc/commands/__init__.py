"""Command groups of the `longdoc` CLI; each module exposes register(subparsers)."""
