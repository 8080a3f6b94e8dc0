"""Benchmarks of the pipeline's hot paths and the GPU rehearsal, run as modules from the repository root
(``python -m benchmarks.device_stages``) so that they import each other as ``benchmarks.X``; see RESULTS.md."""
