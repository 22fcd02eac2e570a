"""Certification: certified-accuracy tables over the bound methods and PGD, and the
exact MIP for small networks."""
