"""Reports: metrics.json, plots and tables."""
