"""`manage.py dbcancel`."""
