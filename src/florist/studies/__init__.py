"""The paper comparison: every method on the same federation, a table and plots (florist bench)."""
