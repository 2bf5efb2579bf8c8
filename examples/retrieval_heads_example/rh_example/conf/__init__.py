"""Hydra configs of this package's plugins, one group per plugin kind (pkg://rh_example.conf)."""
