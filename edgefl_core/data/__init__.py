"""Datasets (numpy, no download), partitions among devices, and a device's local data."""
