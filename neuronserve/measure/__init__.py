"""What measures: bench, the load generator, statistics, top, the device monitors, /metrics scraping, and the
HTTP probe every operating command shares."""
