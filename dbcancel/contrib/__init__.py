"""Integrations with web frameworks, each behind its own optional extra.

Nothing in the core imports this package; each integration imports its framework when it
is imported itself (`dbcancel.contrib.django` needs `pip install dbcancel[django]`).
"""
