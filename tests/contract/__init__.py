"""The shared contract tests, run against every backend on every database."""
