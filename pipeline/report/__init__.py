"""A run's visual report: training curves and one self-contained HTML page."""
