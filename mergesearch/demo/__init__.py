"""Tiny synthetic tasks and experts built locally on the CPU, for the demo and the tests."""
