"""What a run shows to people and tools: `report.html` (a self-contained page of plots and tables, written
into every finished run folder and by `tunesmith report RUN`) and experiment trackers (`train.report_to`)."""
