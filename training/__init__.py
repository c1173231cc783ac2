"""Data preparation and training of the cat/dog classifier (the only package that imports torch)."""
