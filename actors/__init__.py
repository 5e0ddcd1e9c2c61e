"""Ray actors: thin plain-Python classes made remote at the call site.

Each method is one call into :mod:`obliviate` plus storage I/O; no method logic lives here.
"""
