"""Analyses: background work over a folder of files, cancelled and deleted on request."""
