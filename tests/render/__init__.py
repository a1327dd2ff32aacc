"""Renderer tests and the strict manifest validators other suites reuse."""
