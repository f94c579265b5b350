"""Research probes: scripts that served one investigation (each named in the results doc that cites it), run as
``python -m experiments.<name>``. Benchmarks measure the package; probes ask a dataset a question."""
