"""The pipeline stages, one LightningModule each (see docs/architecture.md)."""
