"""Reading runs back from their folders: listings, tables, plots, reference numbers.

Modules here read what a run wrote (``qexp.run.record``'s schema, ``.hydra/``); they never import the
training engine.
"""
