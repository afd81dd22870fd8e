"""The migrations of the dbcancel Django app: the worker table."""
