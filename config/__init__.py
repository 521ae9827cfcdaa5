"""Configuration: the one typed settings object, at the bottom of the import graph."""
