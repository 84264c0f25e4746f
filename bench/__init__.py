"""`make bench`: the aggregator against a naive peer and a sequential baseline, in one run.

Every side runs in its own process against the same upstreams (another process) under the same
load (a third process); rounds alternate the sides so drift hits them alike. See issue 7 and
``python -m bench --help``.
"""
