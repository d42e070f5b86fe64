"""Subjects, masks, source + regular datasets, frozen-input caches and the Lightning datamodule."""
