"""Benchmarks; a package so tests can import `bench.http_bench`."""
