"""The application layer: the command line, `explain`, `check`, `inspect`, heatmaps and the input reader."""
