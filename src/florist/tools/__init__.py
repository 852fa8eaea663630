"""Command implementations behind ``florist aggregate | inspect | demo`` (the CLI only parses arguments)."""
