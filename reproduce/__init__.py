"""The layer above the training scripts: the published tables and rows (published.py), the reproduction
report of a run directory (report.py, which the scripts call at the end of every run) and the launcher
that reproduces a whole table (plan.py, launch.py; the command is tools/reproduce.py).

engine/ never imports this package: a script hands the report to its run directory
(`rundir.open_run(cfg, dist, report=write_run_report)`).
"""
