"""Experiment drivers behind ``attnlab heads <study>``: each trains or loads a subject,
runs one of the papers' interventions and writes its report under docs/results."""
