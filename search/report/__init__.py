"""Reports from storage alone: Pareto maths, the study view (one front), text, HTML, plots, files."""
