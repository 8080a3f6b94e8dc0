"""Fast in-process tests: no subprocess, server, pyflyte or multi-process run (``make test-fast``)."""
