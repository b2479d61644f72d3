"""Test support: fixtures, fakes and helpers shared by tests/ and parity_tests/ (no tests here)."""
