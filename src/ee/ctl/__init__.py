"""eectl: the operators' tool (typed subcommands; the console REPL comes later)."""
