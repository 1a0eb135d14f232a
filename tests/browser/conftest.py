"""Browser fixtures live in tests/conftest.py so every solution's tests can use them."""
