"""Worker scripts that the multi-process tests launch (with torchrun or as bare processes),
and `harness`, the launcher the tests call."""
