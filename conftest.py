"""One set of fixtures for tests/ and parity_tests/: the session's model and export cache, image
files, broken artifact folders (tests/support/fixtures.py), and the fake GPU stack
(tests/support/fake_tensorrt.py)."""

pytest_plugins = ["tests.support.fixtures", "tests.support.fake_tensorrt"]
