"""The desap command line and the apps behind it: demo, benchmarks, model zoo."""
