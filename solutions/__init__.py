"""The three vertical products. Each solution imports `core` and never another solution."""
