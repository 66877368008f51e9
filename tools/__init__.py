"""Command-line tools of sd_plugin (training, benchmarks, coverage, analysis); ``_``-modules are their machinery."""
