"""rlspec's compiler: spec → plan → job graph → bundle. Never imports torch."""

__version__ = "0.1.0"
