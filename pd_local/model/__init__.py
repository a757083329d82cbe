"""Model code: plain nn.Modules with no knowledge of ranks or requests."""
