"""Foundations: the error type and exit codes, the registry, dtypes, process groups, memory
and the version. Everything else in dgmr builds on these; they import nothing of dgmr's."""
