"""``manage.py dbcancel``."""
