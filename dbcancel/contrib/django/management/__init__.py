"""Management commands of dbcancel's Django app."""
