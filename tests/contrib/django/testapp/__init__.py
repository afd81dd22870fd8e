"""The Django app the tests declare their job models in."""
