"""Processor named by path in the example configuration files."""


def run(job):
    return job.data
