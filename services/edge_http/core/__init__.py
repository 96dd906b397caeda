"""The edge's core: admission, the catalog of served models, plans, runs and their events (see edge.py)."""
