"""The kopf operator that reconciles FineTuneJobs into training Jobs."""
