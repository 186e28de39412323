"""Command-line tools on the engine and the node (chat console, ...)."""
