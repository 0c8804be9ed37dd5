"""Defaults shared by the command line and the API, in a module that imports nothing heavy."""

DEFAULT_SHARD_SIZE = "5GB"
