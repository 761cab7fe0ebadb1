"""Benchmarks: ``edgeswarm bench <area>`` measures this machine; nothing is cached."""

AREAS = ("runtimes", "placement", "agent", "e2e", "snn")
