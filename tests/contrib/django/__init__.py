"""Tests of dbcancel.contrib.django, on SQLite, PostgreSQL and MariaDB."""
